"""Container metadata from the runtimes' own APIs, over their Unix sockets.

Standard-library HTTP/1.1 on asyncio (no client package): podman's libpod API
and Docker's Engine API answer the same few calls — a list at start, an
inspect for a container we meet before its events, and the /events stream
that keeps the cache current. Every call is time-bounded; a socket that is
missing, slow or answering 500 is counted and retried, and rows keep flowing
with the container id alone meanwhile.

CRI (containerd, CRI-O) is not spoken here: it needs gRPC stubs generated from
the CRI proto; `decode_cri_status` reads the JSON form of its
ContainerStatus/PodSandboxStatus responses (crictl inspect), covered by
recorded responses in the tests.
"""
from __future__ import annotations

import asyncio
import calendar
import json
import logging
import os
import re
import time
import urllib.parse
from typing import AsyncIterator

from vajrad.enrich.containers import ContainerInfo
from vajrad.errors import VajraError

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 2.0        # one request/response
CONNECT_TIMEOUT_S = 1.0
RETRY_S = 1.0               # between attempts to reach a missing or failed socket
MAX_BODY = 64 * 1024 * 1024


class RuntimeApiError(VajraError):
    """A runtime API call failed: the socket, the HTTP exchange, or its status."""

    def __init__(self, runtime: str, what: str, status: int = 0):
        super().__init__(f"{runtime}: {what}")
        self.runtime, self.status = runtime, status


# --- HTTP/1.1 over a Unix socket -------------------------------------------------------
async def _open(sock: str, runtime: str):
    try:
        return await asyncio.wait_for(asyncio.open_unix_connection(sock, limit=1 << 20), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as e:
        raise RuntimeApiError(runtime, f"cannot connect to {sock}: {e!r}") from e


async def _head(reader, runtime: str) -> tuple[int, dict]:
    line = await reader.readline()
    if not line:
        raise RuntimeApiError(runtime, "connection closed before a response")
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise RuntimeApiError(runtime, f"not an HTTP response: {line[:80]!r}")
    headers = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


async def _chunks(reader) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


def _request(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: d\r\nUser-Agent: vajrad\r\nConnection: close\r\n\r\n".encode()


async def http_json(sock: str, path: str, runtime: str, timeout: float = CALL_TIMEOUT_S):
    """GET path; the decoded JSON body. RuntimeApiError with the status on >= 400."""
    async def call():
        reader, writer = await _open(sock, runtime)
        try:
            writer.write(_request("GET", path))
            await writer.drain()
            status, headers = await _head(reader, runtime)
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = b"".join([c async for c in _chunks(reader)])
            elif "content-length" in headers:
                body = await reader.readexactly(min(int(headers["content-length"]), MAX_BODY))
            else:
                body = await reader.read(MAX_BODY)
        finally:
            writer.close()
        if status >= 400:
            raise RuntimeApiError(runtime, f"GET {path}: HTTP {status} {body[:200]!r}", status)
        try:
            return json.loads(body)
        except ValueError as e:
            raise RuntimeApiError(runtime, f"GET {path}: body is not JSON: {e}") from e
    try:
        return await asyncio.wait_for(call(), timeout)
    except asyncio.TimeoutError as e:
        raise RuntimeApiError(runtime, f"GET {path}: no answer in {timeout}s") from e
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        raise RuntimeApiError(runtime, f"GET {path}: {e!r}") from e


async def http_stream(sock: str, path: str, runtime: str, on_open=None) -> AsyncIterator[dict]:
    """GET path and yield each JSON object of a streamed body (the /events
    streams send one object per line, chunked). Ends when the server does."""
    reader, writer = await _open(sock, runtime)
    try:
        writer.write(_request("GET", path))
        await writer.drain()
        status, headers = await asyncio.wait_for(_head(reader, runtime), CALL_TIMEOUT_S)
        if status >= 400:
            raise RuntimeApiError(runtime, f"GET {path}: HTTP {status}", status)
        if on_open is not None:
            on_open()
        decoder, buf = json.JSONDecoder(), ""
        source = _chunks(reader) if headers.get("transfer-encoding", "").lower() == "chunked" \
            else _raw(reader)
        async for data in source:
            buf += data.decode("utf-8", "replace")
            while True:
                buf = buf.lstrip()
                if not buf:
                    break
                try:
                    obj, end = decoder.raw_decode(buf)
                except ValueError:
                    break           # an object split across chunks: wait for the rest
                buf = buf[end:]
                if isinstance(obj, dict):
                    yield obj
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        raise RuntimeApiError(runtime, f"event stream {path}: {e!r}") from e
    finally:
        writer.close()


async def _raw(reader) -> AsyncIterator[bytes]:
    while True:
        data = await reader.read(65536)
        if not data:
            return
        yield data


# --- decoding ----------------------------------------------------------------------------
_FRACTION = re.compile(r"\.\d+")


def unix_time(value) -> int:
    """Seconds since the epoch from an int or an RFC 3339 string (nanosecond
    fractions and offsets as Go writes them); 0 for Go's zero time."""
    if isinstance(value, (int, float)):
        return int(value)
    if not value or value.startswith("0001-01-01"):
        return 0
    text = _FRACTION.sub("", value.strip())
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)([+-]\d\d):?(\d\d)", text)
    if not m:
        return 0
    base = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    sign = 1 if m.group(2)[0] == "+" else -1
    return base - sign * (int(m.group(2)[1:]) * 3600 + int(m.group(3)) * 60)


def decode_podman_inspect(doc: dict) -> ContainerInfo:
    """GET /libpod/containers/{id}/json."""
    state = doc.get("State") or {}
    config = doc.get("Config") or {}
    return ContainerInfo(
        id=doc["Id"], runtime="podman", name=doc.get("Name", ""),
        image=doc.get("ImageName") or config.get("Image", ""), image_id=doc.get("Image", ""),
        state=state.get("Status", ""), pid=state.get("Pid") or 0, labels=config.get("Labels") or {},
        privileged=int(bool((doc.get("HostConfig") or {}).get("Privileged"))),
        created=unix_time(doc.get("Created")), started=unix_time(state.get("StartedAt")),
        pod_uid=doc.get("Pod", ""), complete=True)


def decode_podman_list(doc: dict) -> ContainerInfo:
    """One entry of GET /libpod/containers/json?all=true."""
    names = doc.get("Names") or [""]
    return ContainerInfo(
        id=doc["Id"], runtime="podman", name=names[0], image=doc.get("Image", ""),
        image_id=doc.get("ImageID", ""), state=doc.get("State", ""), pid=doc.get("Pid") or 0,
        labels=doc.get("Labels") or {}, created=unix_time(doc.get("Created")),
        started=unix_time(doc.get("StartedAt")), pod_uid=doc.get("Pod", ""),
        pod_name=doc.get("PodName", ""), complete=True)


def decode_docker_inspect(doc: dict) -> ContainerInfo:
    """GET /containers/{id}/json (Docker Engine API)."""
    state = doc.get("State") or {}
    config = doc.get("Config") or {}
    return ContainerInfo(
        id=doc["Id"], runtime="docker", name=doc.get("Name", "").lstrip("/"), image=config.get("Image", ""),
        image_id=doc.get("Image", ""), state=state.get("Status", ""), pid=state.get("Pid") or 0,
        labels=config.get("Labels") or {},
        privileged=int(bool((doc.get("HostConfig") or {}).get("Privileged"))),
        created=unix_time(doc.get("Created")), started=unix_time(state.get("StartedAt")), complete=True)


def decode_docker_list(doc: dict) -> ContainerInfo:
    """One entry of GET /containers/json?all=1."""
    names = doc.get("Names") or [""]
    return ContainerInfo(
        id=doc["Id"], runtime="docker", name=names[0].lstrip("/"), image=doc.get("Image", ""),
        image_id=doc.get("ImageID", ""), state=doc.get("State", ""), labels=doc.get("Labels") or {},
        created=unix_time(doc.get("Created")), complete=True)


# What the streams call an action, to container_events' five.
ACTIONS = {"create": "create", "start": "start", "stop": "stop", "die": "die", "died": "die",
           "remove": "delete", "destroy": "delete", "delete": "delete", "kill": None}
# Event attributes that are not labels.
_NOT_LABELS = {"name", "image", "containerExitCode", "exitCode", "podId", "signal", "execID"}


def decode_event(runtime: str, ev: dict) -> tuple[str | None, ContainerInfo, int] | None:
    """(action or None, what the event says about the container, exit code)
    from one /events object (podman and Docker share this shape)."""
    if (ev.get("Type") or ev.get("type")) != "container":
        return None
    actor = ev.get("Actor") or {}
    cid = actor.get("ID") or ev.get("id") or ""
    if not cid:
        return None
    attrs = actor.get("Attributes") or {}
    action = (ev.get("Action") or ev.get("status") or "").split(":")[0]
    labels = {k: v for k, v in attrs.items() if k not in _NOT_LABELS}
    when = int(ev.get("time") or 0)
    info = ContainerInfo(id=cid, runtime=runtime, name=attrs.get("name", ""), image=attrs.get("image", ""),
                         labels=labels, pod_uid=attrs.get("podId", ""),
                         complete=bool(attrs.get("name") and attrs.get("image")))
    kind = ACTIONS.get(action)
    if kind == "create":
        info.created = when
    elif kind == "start":
        info.started, info.state = when, "running"
    elif kind == "die":
        info.state = "exited"
    elif kind == "delete":
        info.deleted, info.state = when or int(time.time()), "removed"
    code = attrs.get("containerExitCode", attrs.get("exitCode", ""))
    return kind, info, int(code) if str(code).lstrip("-").isdigit() else 0


def decode_cri_status(container_status: dict, sandbox_status: dict | None = None,
                      runtime: str = "containerd") -> ContainerInfo:
    """The JSON form of CRI ContainerStatusResponse (and PodSandboxStatusResponse)."""
    st = container_status.get("status") or container_status
    labels = dict(st.get("labels") or {})
    if sandbox_status:
        sb = sandbox_status.get("status") or sandbox_status
        meta = sb.get("metadata") or {}
        labels.setdefault("io.kubernetes.pod.name", meta.get("name", ""))
        labels.setdefault("io.kubernetes.pod.namespace", meta.get("namespace", ""))
        labels.setdefault("io.kubernetes.pod.uid", meta.get("uid", ""))
    meta = st.get("metadata") or {}
    image = (st.get("image") or {}).get("image", "")
    state = {"CONTAINER_CREATED": "created", "CONTAINER_RUNNING": "running",
             "CONTAINER_EXITED": "exited"}.get(st.get("state", ""), "unknown")
    info = ContainerInfo(id=st["id"], runtime=runtime, name=labels.get("io.kubernetes.container.name")
                         or meta.get("name", ""), image=image, image_id=st.get("imageRef", ""),
                         state=state, labels=labels, created=int(st.get("createdAt", 0) or 0) // 1_000_000_000,
                         started=int(st.get("startedAt", 0) or 0) // 1_000_000_000, complete=True)
    info.pod_labels()
    return info


# --- the clients -----------------------------------------------------------------------
class Runtime:
    """One runtime's API: what to call and how to read it."""
    name = ""
    list_path = ""
    events_path = ""

    def __init__(self, socket_path: str):
        self.socket = socket_path
        self.calls = 0
        self.errors = 0             # failed calls: socket missing, timeout, HTTP >= 400
        self.last_error = ""
        self.connected = False      # the event stream is open
        self.ever_connected = False
        self.events = 0
        self.last_event_ns = 0      # for since= on reconnect: events missed while away are replayed

    def available(self) -> bool:
        return os.path.exists(self.socket)

    def inspect_path(self, cid: str) -> str:
        raise NotImplementedError

    def decode_list(self, doc: dict) -> ContainerInfo:
        raise NotImplementedError

    def decode_inspect(self, doc: dict) -> ContainerInfo:
        raise NotImplementedError

    async def get(self, path: str):
        self.calls += 1
        try:
            return await http_json(self.socket, path, self.name)
        except RuntimeApiError as e:
            self.errors += 1
            self.last_error = str(e)
            raise

    async def list(self) -> list[ContainerInfo]:
        return [self.decode_list(d) for d in await self.get(self.list_path)]

    async def inspect(self, cid: str) -> ContainerInfo | None:
        try:
            return self.decode_inspect(await self.get(self.inspect_path(cid)))
        except RuntimeApiError as e:
            if e.status == 404:         # gone already: its events say what it was
                return None
            raise

    async def pod_name(self, pod_id: str) -> str:
        return ""

    def stream_path(self) -> str:
        path = self.events_path
        if self.last_event_ns:
            since = self.last_event_ns / 1e9
            path += "&since=" + urllib.parse.quote(f"{since:.9f}")
        return path

    def stats(self) -> dict:
        return {"socket": self.socket, "available": self.available(), "connected": self.connected,
                "calls": self.calls, "errors": self.errors, "events": self.events,
                "last_error": self.last_error}


class Podman(Runtime):
    name = "podman"
    list_path = "/v4.0.0/libpod/containers/json?all=true"
    events_path = "/v4.0.0/libpod/events?stream=true&filters=" + urllib.parse.quote('{"type":["container"]}')

    def inspect_path(self, cid: str) -> str:
        return f"/v4.0.0/libpod/containers/{cid}/json"

    decode_list = staticmethod(decode_podman_list)
    decode_inspect = staticmethod(decode_podman_inspect)

    async def pod_name(self, pod_id: str) -> str:
        try:
            return (await self.get(f"/v4.0.0/libpod/pods/{pod_id}/json")).get("Name", "")
        except RuntimeApiError:
            return ""


class Docker(Runtime):
    name = "docker"
    list_path = "/containers/json?all=1"
    events_path = "/events?filters=" + urllib.parse.quote('{"type":["container"]}')

    def inspect_path(self, cid: str) -> str:
        return f"/containers/{cid}/json"

    decode_list = staticmethod(decode_docker_list)
    decode_inspect = staticmethod(decode_docker_inspect)

    def stream_path(self) -> str:
        path = self.events_path
        if self.last_event_ns:
            path += f"&since={self.last_event_ns // 1_000_000_000}"
        return path

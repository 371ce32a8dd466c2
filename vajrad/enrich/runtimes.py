"""Container metadata from the runtimes' own APIs, over their Unix sockets.

podman's libpod API and Docker's Engine API: standard-library HTTP/1.1 on
asyncio (no client package). They answer the same few calls: a list at start,
an inspect for a container we meet before its events, and the /events stream
that keeps the cache current.

containerd (its CRI plugin) and CRI-O: the CRI gRPC API (runtime.v1) through
python3-grpcio with raw-bytes calls, the messages encoded and decoded by
field number (vajrad/enrich/protowire.py; no generated stubs):
ListContainers and ListPodSandbox at start, ContainerStatus and
PodSandboxStatus for what we meet, and GetContainerEvents where the runtime
has it, else ListContainers and ListPodSandbox every CRI_POLL_S compared
with the previous answers (Debian 12's containerd 1.6 has no
GetContainerEvents). Without python3-grpcio CRI is
off and status says why.

Every call is time-bounded; a socket that is missing, slow or failing is
counted and retried, and rows keep flowing with the container id alone
meanwhile.
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

from vajrad.enrich import protowire as pw
from vajrad.enrich.containers import ContainerInfo
from vajrad.errors import VajraError

try:                        # python3-grpcio: CRI only; podman and Docker need nothing
    import grpc
    import grpc.aio
    GRPC_MISSING = ""
except ImportError as _e:    # pragma: no cover - depends on the host
    grpc = None
    GRPC_MISSING = f"python3-grpcio is not installed ({_e})"

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


# --- the clients -----------------------------------------------------------------------
class Runtime:
    """One runtime's API: what to call and how to read it."""
    name = ""
    aliases: tuple[str, ...] = ()   # other runtime names of cgroup layouts this client answers for
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

    async def get(self, path: str, missing_ok: bool = False):
        """GET path's JSON. Failures are counted, except a 404 the caller
        expects (a container removed already: `--rm` ones are, at once)."""
        self.calls += 1
        try:
            return await http_json(self.socket, path, self.name)
        except RuntimeApiError as e:
            if not (missing_ok and e.status == 404):
                self.errors += 1
                self.last_error = str(e)
            raise

    async def list(self) -> list[ContainerInfo]:
        return [self.decode_list(d) for d in await self.get(self.list_path)]

    async def inspect(self, cid: str) -> ContainerInfo | None:
        try:
            return self.decode_inspect(await self.get(self.inspect_path(cid), missing_ok=True))
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

    async def follow_events(self) -> AsyncIterator[tuple[str | None, ContainerInfo, int, int]]:
        """(action or None, what the event says, exit code, unix time) for
        each event of the /events stream, until it ends or fails."""
        async for ev in http_stream(self.socket, self.stream_path(), self.name):
            self.events += 1
            self.last_event_ns = int(ev.get("timeNano") or 0) or self.last_event_ns
            decoded = decode_event(self.name, ev)
            if decoded is not None:
                yield (*decoded, int(ev.get("time") or time.time()))
        self.last_error = "event stream ended"

    def serves(self, runtime: str) -> bool:
        """Whether containers whose cgroup names `runtime` are this client's."""
        return runtime == self.name

    async def close(self) -> None:
        """Per-call connections: nothing held between calls."""

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


# --- CRI (containerd, CRI-O) over gRPC ---------------------------------------------------
# runtime.v1.RuntimeService of kubernetes/cri-api. Messages are encoded and
# decoded by field number (vajrad/enrich/protowire.py); the numbers used are
# named where they are read.
CRI_SERVICE = "/runtime.v1.RuntimeService/"
CRI_POLL_S = 1.0            # ListContainers interval when the runtime has no GetContainerEvents
CRI_SANDBOXES_MAX = 4096
CRI_STATES = {0: "created", 1: "running", 2: "exited", 3: "unknown"}       # ContainerState
CRI_EVENTS = {0: "create", 1: "start", 2: "die", 3: "delete"}              # ContainerEventType
GRPC_NOT_FOUND, GRPC_UNIMPLEMENTED = 5, 12


def _ns_to_s(value: int) -> int:
    return value // 1_000_000_000 if value > 0 else 0


def decode_cri_container(fields: dict, runtime: str) -> tuple[ContainerInfo, str]:
    """One Container of ListContainersResponse (containers = 1): id = 1,
    pod_sandbox_id = 2, metadata = 3 (name = 1), image = 4 (ImageSpec image = 1),
    image_ref = 5, state = 6, created_at = 7 (ns), labels = 8. The image is
    what the client asked for (kubelet passes the image id), so not complete:
    ContainerStatus names it. (info, sandbox id)."""
    labels = pw.str_map(fields, 8)
    info = ContainerInfo(
        id=pw.text(fields, 1), runtime=runtime,
        name=labels.get("io.kubernetes.container.name") or pw.text(pw.sub(fields, 3), 1),
        image=pw.text(pw.sub(fields, 4), 1), image_id=pw.text(fields, 5),
        state=CRI_STATES.get(pw.integer(fields, 6), "unknown"), labels=labels,
        created=_ns_to_s(pw.integer(fields, 7)))
    info.pod_labels()
    return info, pw.text(fields, 2)


def decode_cri_status(status: dict, runtime: str, verbose: dict | None = None) -> tuple[ContainerInfo, int, str]:
    """A ContainerStatus message: id = 1, metadata = 2 (name = 1), state = 3,
    created_at = 4, started_at = 5, finished_at = 6 (ns), exit_code = 7,
    image = 8 (ImageSpec image = 1), image_ref = 9, labels = 12; and, when
    given, the "info" JSON of a verbose ContainerStatusResponse (info = 2):
    pid, sandboxID, privileged (containerd: config.linux.security_context;
    CRI-O: top level). (info, exit code, sandbox id)."""
    labels = pw.str_map(status, 12)
    extra = verbose or {}
    security = ((extra.get("config") or {}).get("linux") or {}).get("security_context") or {}
    privileged = bool(security.get("privileged") or extra.get("privileged"))
    info = ContainerInfo(
        id=pw.text(status, 1), runtime=runtime,
        name=labels.get("io.kubernetes.container.name") or pw.text(pw.sub(status, 2), 1),
        image=pw.text(pw.sub(status, 8), 1), image_id=pw.text(status, 9),
        state=CRI_STATES.get(pw.integer(status, 3), "unknown"), pid=int(extra.get("pid") or 0),
        labels=labels, privileged=int(privileged), created=_ns_to_s(pw.integer(status, 4)),
        started=_ns_to_s(pw.integer(status, 5)), complete=True)
    info.pod_labels()
    return info, pw.integer(status, 7), str(extra.get("sandboxID") or extra.get("sandboxId") or "")


def decode_cri_sandbox(status: dict) -> dict:
    """A PodSandboxStatus message: id = 1, metadata = 2 (PodSandboxMetadata:
    name = 1, uid = 2, namespace = 3), state = 3 (0 ready, 1 not ready),
    created_at = 4 (ns), labels = 7."""
    meta = pw.sub(status, 2)
    return {"id": pw.text(status, 1), "name": pw.text(meta, 1), "uid": pw.text(meta, 2),
            "namespace": pw.text(meta, 3), "ready": pw.integer(status, 3) == 0,
            "created": _ns_to_s(pw.integer(status, 4)), "labels": pw.str_map(status, 7)}


def decode_cri_pod_sandbox(fields: dict) -> dict:
    """One PodSandbox of ListPodSandboxResponse (items = 1): id = 1, metadata = 2,
    state = 3, created_at = 4, labels = 5; as decode_cri_sandbox."""
    meta = pw.sub(fields, 2)
    return {"id": pw.text(fields, 1), "name": pw.text(meta, 1), "uid": pw.text(meta, 2),
            "namespace": pw.text(meta, 3), "ready": pw.integer(fields, 3) == 0,
            "created": _ns_to_s(pw.integer(fields, 4)), "labels": pw.str_map(fields, 5)}


def sandbox_info(sandbox: dict, runtime: str) -> ContainerInfo:
    """A pod sandbox's own container (the pause process, in its cgroup beside
    the pod's containers): the pod's columns, no container name or image."""
    info = ContainerInfo(id=sandbox["id"], runtime=runtime, state="running" if sandbox["ready"] else "exited",
                         labels=dict(sandbox["labels"]), created=sandbox["created"], complete=True)
    apply_sandbox(info, sandbox)
    return info


def apply_sandbox(info: ContainerInfo, sandbox: dict) -> None:
    """The pod of a container whose labels do not say it (a CRI client other than kubelet)."""
    if not info.pod_name:
        info.pod_name, info.pod_namespace = sandbox["name"], sandbox["namespace"]
    if not info.pod_uid:
        info.pod_uid = sandbox["uid"]


def decode_cri_event(fields: dict, runtime: str) -> tuple[str | None, ContainerInfo, int, int]:
    """One ContainerEventResponse of GetContainerEvents: container_id = 1,
    container_event_type = 2, created_at = 3 (ns), pod_sandbox_status = 4,
    containers_statuses = 5 (repeated ContainerStatus, the pod's)."""
    cid = pw.text(fields, 1)
    action = CRI_EVENTS.get(pw.integer(fields, 2))
    when = _ns_to_s(pw.integer(fields, 3)) or int(time.time())
    info, code = ContainerInfo(id=cid, runtime=runtime), 0
    for status in pw.repeated(fields, 5):
        if pw.text(status, 1) == cid:
            info, code, _ = decode_cri_status(status, runtime)
    if 4 in fields:
        sandbox = decode_cri_sandbox(pw.sub(fields, 4))
        if sandbox["id"] == cid:            # the sandbox's own event (containerd sends them too)
            info = sandbox_info(sandbox, runtime)
        else:
            apply_sandbox(info, sandbox)
    if action == "delete":
        info.deleted, info.state = when, "removed"
    return action, info, code if action == "die" else 0, when


class Cri(Runtime):
    """containerd's CRI plugin or CRI-O, over the CRI gRPC API (python3-grpcio,
    raw-bytes calls: no generated stubs). Events from GetContainerEvents where
    the runtime has it (containerd >= 1.7, CRI-O >= 1.26), else from
    ListContainers every CRI_POLL_S compared with the previous answer."""
    aliases = ("cri",)

    def __init__(self, name: str, socket_path: str):
        super().__init__(socket_path)
        self.name = name
        self._channel = None
        self._seen: dict[str, str] = {}         # container id -> state at the last list
        self._pending: list[tuple] = []          # events found by a list, yielded first
        self._sandboxes: dict[str, dict] = {}
        self.event_source = ""                   # "GetContainerEvents" or "polling", once known

    def available(self) -> bool:
        if grpc is None:
            self.last_error = GRPC_MISSING
            return False
        return super().available()

    def serves(self, runtime: str) -> bool:
        return runtime == self.name or runtime in self.aliases

    def _chan(self):
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                f"unix://{os.path.abspath(self.socket)}",
                options=[("grpc.max_receive_message_length", MAX_BODY), ("grpc.enable_http_proxy", 0)])
        return self._channel

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    def _error(self, method: str, e: Exception, expected: tuple[int, ...] = ()) -> RuntimeApiError:
        """The typed error of a failed call, counted unless its gRPC status is
        one the caller expects: NOT_FOUND for an id that is a sandbox or a
        container just removed, UNIMPLEMENTED for GetContainerEvents on a
        runtime that predates it."""
        if grpc is not None and isinstance(e, grpc.aio.AioRpcError):
            err = RuntimeApiError(self.name, f"{method}: {e.code().name}: {e.details()}", e.code().value[0])
        elif isinstance(e, asyncio.TimeoutError):
            err = RuntimeApiError(self.name, f"{method}: no answer in {CALL_TIMEOUT_S}s")
        else:
            err = RuntimeApiError(self.name, f"{method}: {e!r}")
        if err.status not in expected:
            self.errors += 1
            self.last_error = str(err)
        return err

    async def call(self, method: str, request: bytes = b"", missing_ok: bool = False) -> dict:
        """One unary call, bounded by CALL_TIMEOUT_S; the parsed response."""
        self.calls += 1
        try:
            rpc = self._chan().unary_unary(CRI_SERVICE + method)
            reply = await asyncio.wait_for(rpc(request, timeout=CALL_TIMEOUT_S), CALL_TIMEOUT_S + 0.5)
            return pw.parse(reply)
        except (asyncio.TimeoutError, pw.ProtoError, OSError) as e:
            raise self._error(method, e) from e
        except Exception as e:
            if grpc is not None and isinstance(e, grpc.aio.AioRpcError):
                raise self._error(method, e, (GRPC_NOT_FOUND,) if missing_ok else ()) from e
            raise

    async def _status(self, cid: str) -> tuple[ContainerInfo, int] | None:
        """ContainerStatus (request: container_id = 1, verbose = 2), with the
        pod from PodSandboxStatus when the labels lack it; None when gone."""
        try:
            reply = await self.call("ContainerStatus", pw.string(1, cid) + pw.uint(2, 1), missing_ok=True)
        except RuntimeApiError as e:
            if e.status == GRPC_NOT_FOUND:
                return None
            raise
        try:
            verbose = json.loads(pw.str_map(reply, 2).get("info") or "{}")
        except ValueError:
            verbose = {}
        info, code, sandbox_id = decode_cri_status(pw.sub(reply, 1), self.name,
                                                   verbose if isinstance(verbose, dict) else {})
        if sandbox_id and not (info.pod_name and info.pod_uid):
            sandbox = await self._sandbox(sandbox_id)
            if sandbox:
                apply_sandbox(info, sandbox)
        return info, code

    async def _sandbox(self, sandbox_id: str) -> dict | None:
        """PodSandboxStatus (pod_sandbox_id = 1; response status = 1), cached."""
        known = self._sandboxes.get(sandbox_id)
        if known is None:
            try:
                reply = await self.call("PodSandboxStatus", pw.string(1, sandbox_id), missing_ok=True)
            except RuntimeApiError as e:
                if e.status == GRPC_NOT_FOUND:
                    return None
                raise
            if len(self._sandboxes) >= CRI_SANDBOXES_MAX:
                self._sandboxes.clear()
            known = self._sandboxes[sandbox_id] = decode_cri_sandbox(pw.sub(reply, 1))
        return known

    async def inspect(self, cid: str) -> ContainerInfo | None:
        """A container, or a pod sandbox (its cgroup looks like a container's)."""
        found = await self._status(cid)
        if found is not None:
            return found[0]
        sandbox = await self._sandbox(cid)
        return sandbox_info(sandbox, self.name) if sandbox else None

    async def _list_entries(self) -> dict[str, ContainerInfo]:
        reply = await self.call("ListContainers")
        entries = (decode_cri_container(c, self.name)[0] for c in pw.repeated(reply, 1))
        return {info.id: info for info in entries if info.id}

    async def list(self) -> list[ContainerInfo]:
        """Every pod sandbox not seen before, and every container as
        ContainerStatus tells it. Containers known before and missing now
        (removed while the runtime was away) are queued as delete events."""
        out = await self._new_sandboxes()
        entries = await self._list_entries()
        for cid in entries:
            found = await self._status(cid)
            if found is not None:
                out.append(found[0])
        now = int(time.time())
        self._pending = [("delete", ContainerInfo(cid, self.name, state="removed", deleted=now), 0, now)
                         for cid in self._seen if cid not in entries]
        self._seen = {info.id: info.state for info in out if info.id in entries}
        return out

    async def follow_events(self) -> AsyncIterator[tuple[str | None, ContainerInfo, int, int]]:
        for ev in self._pending:
            self.events += 1
            yield ev
        self._pending = []
        if self.event_source != "polling":
            try:
                async for ev in self._event_stream():
                    yield ev
                self.last_error = "event stream ended"
                return
            except RuntimeApiError as e:
                if e.status != GRPC_UNIMPLEMENTED:
                    raise
                self.event_source = "polling"
                log.info("%s: no GetContainerEvents; polling ListContainers every %.1fs", self.name, CRI_POLL_S)
        while True:
            await asyncio.sleep(CRI_POLL_S)
            async for ev in self._poll():
                self.events += 1
                yield ev

    async def _event_stream(self) -> AsyncIterator[tuple]:
        self.calls += 1
        try:
            stream = self._chan().unary_stream(CRI_SERVICE + "GetContainerEvents")(b"")
            async for reply in stream:
                self.event_source = "GetContainerEvents"
                self.events += 1
                action, info, code, when = decode_cri_event(pw.parse(reply), self.name)
                if info.id:
                    yield action, info, code, when
        except (pw.ProtoError, OSError) as e:
            raise self._error("GetContainerEvents", e) from e
        except Exception as e:
            if grpc is not None and isinstance(e, grpc.aio.AioRpcError):
                raise self._error("GetContainerEvents", e, (GRPC_UNIMPLEMENTED,)) from e
            raise

    async def _new_sandboxes(self) -> list[ContainerInfo]:
        """Pod sandboxes not seen before (ListPodSandbox). A sandbox's pause
        process runs before the runtime will answer PodSandboxStatus for it
        (containerd stores the sandbox once it runs), so the lookup its first
        row triggers can come too early: the list tells it within a poll."""
        reply = await self.call("ListPodSandbox")
        found, listed = [], set()
        for fields in pw.repeated(reply, 1):
            sandbox = decode_cri_pod_sandbox(fields)
            listed.add(sandbox["id"])
            if sandbox["id"] and sandbox["id"] not in self._sandboxes:
                if len(self._sandboxes) >= CRI_SANDBOXES_MAX:
                    self._sandboxes.clear()
                self._sandboxes[sandbox["id"]] = sandbox
                found.append(sandbox_info(sandbox, self.name))
        now = int(time.time())
        for sid in [s for s in self._sandboxes if s not in listed]:     # removed: gone from `containers` too
            del self._sandboxes[sid]
            found.append(ContainerInfo(sid, self.name, state="removed", deleted=now))
        return found

    async def _poll(self) -> AsyncIterator[tuple]:
        """The changes between two ListContainers answers, as events; new pod
        sandboxes as metadata without an event. A container created and
        removed between two polls has no events (its rows still get its
        metadata: the resolver asks ContainerStatus at once)."""
        now = int(time.time())
        for info in await self._new_sandboxes():
            yield None, info, 0, now
        entries = await self._list_entries()
        for cid, entry in entries.items():
            before = self._seen.get(cid)
            if before == entry.state:
                continue
            found = await self._status(cid)
            info, code = found if found else (entry, 0)
            if before is None:
                yield "create", info, 0, info.created or now
            if info.state in ("running", "exited") and before in (None, "created"):
                yield "start", info, 0, info.started or now
            if info.state == "exited" and before != "exited":
                yield "die", info, code, now
            self._seen[cid] = info.state
        for cid in [c for c in self._seen if c not in entries]:
            del self._seen[cid]
            yield "delete", ContainerInfo(cid, self.name, state="removed", deleted=now), 0, now

    def stats(self) -> dict:
        s = super().stats()
        s["event_source"] = self.event_source
        return s

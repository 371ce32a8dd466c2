"""Runtime metadata decoding and the HTTP-over-Unix-socket client, without a
runtime: Docker Engine and containerd/CRI-O do not run on the test machines,
so their answers are recorded responses (tests/data/runtime_responses.json)
and a small asyncio server on a Unix socket in the test's directory stands in
for dockerd, serving them as dockerd does (Content-Length bodies, a chunked
/events stream), plus the failures: HTTP 500, a socket that never answers, a
missing socket. podman's own API is exercised for real in test_containers.py."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from vajrad.enrich import runtimes as rt
from vajrad.enrich.containers import CgroupMap, ContainerResolver

DATA = json.load(open(os.path.join(os.path.dirname(__file__), "data", "runtime_responses.json")))
WEB = DATA["docker_inspect"]["Id"]
QUICK = DATA["docker_events"][0]["Actor"]["ID"]


def test_unix_time():
    assert rt.unix_time("2023-11-14T22:13:20.123456789Z") == 1700000000
    assert rt.unix_time("2023-11-15T00:13:20+02:00") == 1700000000
    assert rt.unix_time("0001-01-01T00:00:00Z") == 0
    assert rt.unix_time(1700000000) == 1700000000
    assert rt.unix_time("garbage") == 0


def test_docker_inspect_and_list():
    info = rt.decode_docker_inspect(DATA["docker_inspect"])
    assert (info.id, info.name, info.image, info.runtime, info.pid, info.privileged) == \
        (WEB, "web-1", "nginx:1.25", "docker", 4242, 1)
    assert info.image_id.startswith("sha256:a875") and info.created == 1700000000 and info.started == 1700000001
    info.pod_labels()
    assert (info.pod_name, info.pod_namespace, info.pod_uid) == ("web-0", "shop", "0f2b3c1a-8e7d-4a5b-9c6d-1e2f3a4b5c6d")
    listed = rt.decode_docker_list(DATA["docker_list"][0])
    assert (listed.name, listed.image, listed.state, listed.labels) == \
        ("web-1", "nginx:1.25", "running", {"com.docker.compose.project": "shop"})


def test_docker_events():
    decoded = [rt.decode_event("docker", e) for e in DATA["docker_events"]]
    assert decoded[2] is None                                   # a network event
    actions = [(d[0], d[1].name, d[1].image, d[2]) for d in decoded if d]
    assert actions == [("create", "quick", "busybox:1.36", 0), ("start", "quick", "busybox:1.36", 0),
                       ("die", "quick", "busybox:1.36", 3), ("delete", "quick", "busybox:1.36", 0)]
    assert decoded[0][1].labels == {"tier": "batch"} and decoded[0][1].complete
    assert decoded[4][1].deleted == 1700000101


def test_cri_status_with_its_sandbox():
    info = rt.decode_cri_status(DATA["cri_container_status"], DATA["cri_sandbox_status"])
    assert (info.name, info.image, info.state, info.runtime) == ("app", "registry.k8s.io/pause:3.9", "running",
                                                                  "containerd")
    assert (info.pod_name, info.pod_namespace, info.pod_uid) == \
        ("api-5c9f7", "prod", "7a1b2c3d-4e5f-6789-abcd-ef0123456789")
    assert (info.created, info.started) == (1700000200, 1700000201)


class FakeDockerd:
    """Serves the recorded responses on a Unix socket, as dockerd frames them."""

    def __init__(self, path: str):
        self.path = path
        self.requests: list[str] = []
        self.server = None

    async def start(self):
        self.server = await asyncio.start_unix_server(self.handle, self.path)

    async def handle(self, reader, writer):
        line = (await reader.readline()).decode()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        path = line.split(" ")[1]
        self.requests.append(path)
        if path.startswith("/containers/json"):
            await self.reply(writer, 200, DATA["docker_list"])
        elif path == f"/containers/{WEB}/json":
            await self.reply(writer, 200, DATA["docker_inspect"])
        elif path.startswith("/containers/") and "broken" in path:
            await self.reply(writer, 500, {"message": "runtime exploded"})
        elif path.startswith("/containers/") and "slow" in path:
            await asyncio.sleep(30)
        elif path.startswith("/containers/"):
            await self.reply(writer, 404, {"message": "No such container"})
        elif path.startswith("/events"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            for ev in DATA["docker_events"]:
                body = (json.dumps(ev) + "\n").encode()
                half = len(body) // 2             # an object split across chunks
                for part in (body[:half], body[half:]):
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def reply(self, writer, status, doc):
        body = json.dumps(doc).encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (status, len(body), body))

    def close(self):
        self.server.close()


def run(coro):
    return asyncio.run(coro)


def test_docker_client_against_recorded_dockerd(tmp_path):
    async def scenario():
        fake = FakeDockerd(str(tmp_path / "docker.sock"))
        await fake.start()
        client = rt.Docker(fake.path)
        listed = await client.list()
        inspected = await client.inspect(WEB)
        gone = await client.inspect("f" * 64)                  # 404: None, not an error
        events = [e async for e in rt.http_stream(fake.path, client.stream_path(), "docker")]
        with pytest.raises(rt.RuntimeApiError) as broken:
            await client.inspect("broken")
        fake.close()
        return client, listed, inspected, gone, events, broken.value

    client, listed, inspected, gone, events, broken = run(scenario())
    assert [c.id for c in listed] == [WEB] and inspected.name == "web-1" and gone is None
    assert [e["Action"] for e in events] == ["create", "start", "connect", "die", "destroy"]
    assert broken.status == 500 and "runtime exploded" in str(broken)
    assert client.errors == 2 and client.calls == 4          # the 404 and the 500 are counted


def test_slow_and_missing_sockets_are_bounded_errors(tmp_path):
    async def scenario():
        fake = FakeDockerd(str(tmp_path / "docker.sock"))
        await fake.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(rt.RuntimeApiError, match="no answer in 0.3s"):
            await rt.http_json(fake.path, "/containers/slow/json", "docker", timeout=0.3)
        took = loop.time() - t0
        fake.close()
        with pytest.raises(rt.RuntimeApiError, match="cannot connect"):
            await rt.http_json(str(tmp_path / "absent.sock"), "/containers/json", "docker")
        return took

    assert run(scenario()) < 5


def test_events_fill_the_resolver():
    cmap = CgroupMap("")
    cmap.mkdir(501, f"/system.slice/docker-{QUICK}.scope")
    resolver = ContainerResolver(cmap)
    resolver.sources["docker"] = object()
    assert resolver.lookup(501)[1] is False
    for ev in DATA["docker_events"]:
        decoded = rt.decode_event("docker", ev)
        if decoded:
            resolver.learn(decoded[1])
    values, complete = resolver.lookup(501)
    assert complete and values[:4] == (QUICK, "quick", "busybox:1.36", "docker")
    # deleted, and still resolvable (for REMOVED_TTL_S)
    assert QUICK not in resolver.containers and resolver.by_id(QUICK)[0][1] == "quick"

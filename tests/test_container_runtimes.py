"""Runtime metadata decoding and the clients, without a runtime daemon: the
Docker Engine answers recorded in tests/data/runtime_responses.json, served
by a small asyncio server on a Unix socket in the test's directory as dockerd
serves them (Content-Length bodies, a chunked /events stream), plus the
failures a real dockerd will not show on demand: HTTP 500, a socket that
never answers, a missing socket. CRI: protobuf bytes containerd answered
(tests/data/cri_responses.json), and a gRPC server standing in for a runtime
that has GetContainerEvents (containerd 1.6, Debian 12's, has not). The real
runtimes run in test_containers.py (podman), test_docker.py (dockerd) and
test_containerd.py (containerd's CRI)."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from vajrad.enrich import protowire as pw
from vajrad.enrich import runtimes as rt
from vajrad.enrich.containers import CgroupMap, ContainerResolver

DATA = json.load(open(os.path.join(os.path.dirname(__file__), "data", "runtime_responses.json")))
WEB = DATA["docker_inspect"]["Id"]
QUICK = DATA["docker_events"][0]["Actor"]["ID"]
CRI = json.load(open(os.path.join(os.path.dirname(__file__), "data", "cri_responses.json")))


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


def test_cri_decoding_of_recorded_containerd_answers():
    """Protobuf bytes containerd 1.6's CRI plugin answered (recorded from
    tests/test_containerd.py's private containerd)."""
    cid, sid, uid, image = CRI["container_id"], CRI["sandbox_id"], CRI["uid"], CRI["image"]
    version = pw.parse(bytes.fromhex(CRI["Version"]))
    assert (pw.text(version, 2), pw.text(version, 4)) == ("containerd", "v1")

    listed = [rt.decode_cri_container(c, "containerd")
              for c in pw.repeated(pw.parse(bytes.fromhex(CRI["ListContainers"])), 1)]
    assert len(listed) == 1
    entry, sandbox_id = listed[0]
    assert (entry.id, entry.name, entry.image, entry.state, sandbox_id) == (cid, "app", image, "exited", sid)
    assert (entry.pod_name, entry.pod_namespace, entry.pod_uid) == ("api-5c9f7", "prod", uid)
    assert entry.image_id.startswith("sha256:") and entry.created > 1_700_000_000

    reply = pw.parse(bytes.fromhex(CRI["ContainerStatus"]))
    info, code, no_sandbox = rt.decode_cri_status(pw.sub(reply, 1), "containerd")
    assert (info.id, info.name, info.image, info.state, info.runtime, code, no_sandbox) == \
        (cid, "app", image, "exited", "containerd", 0, "")
    assert info.complete and info.started >= info.created > 1_700_000_000
    assert info.labels["io.kubernetes.container.name"] == "app" and info.pod_uid == uid

    sandbox = rt.decode_cri_sandbox(pw.sub(pw.parse(bytes.fromhex(CRI["PodSandboxStatus"])), 1))
    assert (sandbox["id"], sandbox["name"], sandbox["namespace"], sandbox["uid"], sandbox["ready"]) == \
        (sid, "api-5c9f7", "prod", uid, True)
    items = pw.repeated(pw.parse(bytes.fromhex(CRI["ListPodSandbox"])), 1)
    assert [rt.decode_cri_pod_sandbox(i) for i in items] == [sandbox]
    pause = rt.sandbox_info(sandbox, "containerd")
    assert (pause.id, pause.name, pause.image, pause.pod_name, pause.pod_uid, pause.complete) == \
        (sid, "", "", "api-5c9f7", uid, True)


def test_cri_verbose_info_and_labels_missing():
    """The verbose info JSON (containerd's shape, CRI-O's "privileged") gives
    pid, privileged and the sandbox; a container whose labels do not name its
    pod gets it from the sandbox."""
    status = pw.parse(pw.string(1, "c" * 64) + pw.message(2, pw.string(1, "job")) + pw.uint(3, 2)
                      + pw.uint(7, -1 & 0xFFFFFFFFFFFFFFFF) + pw.message(8, pw.string(1, "busybox:1.36")))
    verbose = {"sandboxID": "s" * 64, "pid": 4321,
               "config": {"linux": {"security_context": {"privileged": True}}}}
    info, code, sandbox_id = rt.decode_cri_status(status, "cri-o", verbose)
    assert (info.name, info.image, info.state, info.pid, info.privileged, code, sandbox_id) == \
        ("job", "busybox:1.36", "exited", 4321, 1, -1, "s" * 64)
    assert rt.decode_cri_status(status, "cri-o", {"privileged": True})[0].privileged == 1
    rt.apply_sandbox(info, {"name": "cron-1", "namespace": "ops", "uid": "u-1"})
    assert (info.pod_name, info.pod_namespace, info.pod_uid) == ("cron-1", "ops", "u-1")


def test_cri_container_events_decode():
    """ContainerEventResponse (GetContainerEvents, containerd >= 1.7): the
    container's status among the pod's, the pod from its sandbox status."""
    cid = "e" * 64
    status = pw.string(1, cid) + pw.message(2, pw.string(1, "web")) + pw.uint(3, 2) + pw.uint(7, 3) \
        + pw.message(8, pw.string(1, "nginx:1.25"))
    other = pw.string(1, "f" * 64) + pw.message(2, pw.string(1, "sidecar"))
    sandbox = pw.string(1, "a" * 64) + pw.message(2, pw.string(1, "web-0") + pw.string(2, "u-9")
                                                   + pw.string(3, "shop"))
    event = pw.string(1, cid) + pw.uint(2, 2) + pw.uint(3, 1_700_000_300_000_000_000) + pw.message(4, sandbox) \
        + pw.message(5, other) + pw.message(5, status)
    action, info, code, when = rt.decode_cri_event(pw.parse(event), "containerd")
    assert (action, info.name, info.image, info.pod_name, info.pod_namespace, info.pod_uid, code, when) == \
        ("die", "web", "nginx:1.25", "web-0", "shop", "u-9", 3, 1_700_000_300)
    action, info, code, when = rt.decode_cri_event(pw.parse(pw.string(1, cid) + pw.uint(2, 3)), "containerd")
    assert (action, info.state, code) == ("delete", "removed", 0) and info.deleted == when
    created = rt.decode_cri_event(pw.parse(pw.string(1, cid)), "containerd")    # type 0 is not sent
    assert created[0] == "create"
    # A sandbox's own event: the pod's columns, complete without a name or image.
    sid = "a" * 64
    action, info, _, _ = rt.decode_cri_event(pw.parse(pw.string(1, sid) + pw.uint(2, 1) + pw.message(4, sandbox)),
                                             "containerd")
    assert (action, info.id, info.name, info.pod_name, info.pod_uid, info.state, info.complete) == \
        ("start", sid, "", "web-0", "u-9", "running", True)


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
    assert client.errors == 1 and client.calls == 4          # the 500; a 404 (gone already) is not a failure


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


class FakeCri:
    """A CRI runtime on a Unix socket (grpcio, raw bytes): GetContainerEvents
    streams `events` when `streams`, else answers UNIMPLEMENTED as
    containerd 1.6 does; ContainerStatus of "slow" never answers in time."""

    def __init__(self, path: str, events: list[bytes], streams: bool):
        self.path, self.events, self.streams = path, events, streams
        self.server = None

    async def start(self):
        import grpc

        async def empty_list(request, context):
            return b""

        async def status(request, context):
            cid = pw.text(pw.parse(request), 1)
            if cid == "slow":
                await asyncio.sleep(30)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"container {cid} not found")

        async def events(request, context):
            if not self.streams:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method GetContainerEvents not implemented")
            for ev in self.events:
                yield ev
            await asyncio.sleep(30)     # the stream stays open, as a runtime's does

        handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in
                    (("ListContainers", empty_list), ("ListPodSandbox", empty_list), ("ContainerStatus", status),
                     ("PodSandboxStatus", status))}
        handlers["GetContainerEvents"] = grpc.unary_stream_rpc_method_handler(events)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("runtime.v1.RuntimeService",
                                                                                   handlers),))
        self.server.add_insecure_port(f"unix://{self.path}")
        await self.server.start()

    async def stop(self):
        await self.server.stop(None)


needs_grpc = pytest.mark.skipif(rt.grpc is None, reason=rt.GRPC_MISSING)


@needs_grpc
@pytest.mark.parametrize("streams", [True, False])
def test_cri_client_event_stream_or_polling(tmp_path, streams):
    """With GetContainerEvents the client follows it; without (UNIMPLEMENTED)
    it polls, and the missing method is not counted as an error. Unknown ids
    (NOT_FOUND) are None, not errors; a call that hangs is bounded."""
    cid = "d" * 64
    status = pw.string(1, cid) + pw.message(2, pw.string(1, "web")) + pw.uint(3, 1) \
        + pw.message(8, pw.string(1, "nginx:1.25"))
    events = [pw.string(1, cid) + pw.message(5, status),
              pw.string(1, cid) + pw.uint(2, 1) + pw.message(5, status)]

    async def scenario():
        fake = FakeCri(str(tmp_path / "cri.sock"), events, streams)
        await fake.start()
        client = rt.Cri("containerd", fake.path)
        try:
            listed = await client.list()
            got = []

            async def follow():
                async for ev in client.follow_events():
                    got.append(ev)
                    if len(got) == 2:
                        return
            if streams:
                await asyncio.wait_for(follow(), 10)
            else:
                with pytest.raises(asyncio.TimeoutError):      # polling an empty runtime: nothing comes
                    await asyncio.wait_for(follow(), rt.CRI_POLL_S * 2.5)
            missing = await client.inspect("f" * 64)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(rt.RuntimeApiError, match="DEADLINE_EXCEEDED|no answer"):
                await client.inspect("slow")
            took = loop.time() - t0
        finally:
            await client.close()
            await fake.stop()
        return client, listed, got, missing, took

    client, listed, got, missing, took = run(scenario())
    assert listed == [] and missing is None and took < rt.CALL_TIMEOUT_S + 1
    assert client.errors == 1 and client.last_error.startswith("containerd: ContainerStatus:")   # the slow call
    if streams:
        assert client.event_source == "GetContainerEvents"
        assert [(a, i.name, i.image, i.state) for a, i, _, _ in got] == \
            [("create", "web", "nginx:1.25", "running"), ("start", "web", "nginx:1.25", "running")]
    else:
        assert client.event_source == "polling" and got == []


def test_cri_without_grpcio_is_unavailable_with_the_reason(monkeypatch, tmp_path):
    """python3-grpcio is installed here; its absence is simulated: CRI is off
    and status says why."""
    sock = tmp_path / "containerd.sock"
    sock.touch()
    monkeypatch.setattr(rt, "grpc", None)
    monkeypatch.setattr(rt, "GRPC_MISSING", "python3-grpcio is not installed (test)")
    client = rt.Cri("containerd", str(sock))
    assert client.available() is False
    assert client.stats()["last_error"] == "python3-grpcio is not installed (test)"

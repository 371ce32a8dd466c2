"""Container context on file_events and log_events rows, without a runtime:
the real ContainerResolver over a real cgroup made here (named as podman
names a container's), and the collectors' own attribution paths fed rows as
the store hands them over. tests/test_containers.py covers the same with
podman."""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from types import SimpleNamespace

import pytest

from conftest import needs_root
from vajrad.collectors.fim import rules as fim_rules
from vajrad.collectors.fim.file_events import FimWatcher
from vajrad.collectors.logs.collector import LogCollector
from vajrad.collectors.logs.settings import LogsConfig
from vajrad.enrich.containers import CgroupMap, ContainerInfo, ContainerResolver, cgroup2_mount
from vajrad.tables import TABLES

CID = uuid.uuid4().hex * 2
CONTEXT = {"container_id": CID, "container_name": "web", "container_image": "localhost/web:1",
           "container_runtime": "podman", "pod_name": "", "pod_namespace": "", "pod_uid": "",
           "pid_namespace": 4026532001, "mnt_namespace": 4026532002, "net_namespace": 4026532003}


def bpf_row(target: str, syscall: str, eid: int, pid: int, **context) -> dict:
    """A committed bpf_file_events row, as observe() receives it."""
    return TABLES["bpf_file_events"].row(
        ntime=str(time.monotonic_ns()), syscall=syscall, eid=eid, pid=pid, path="/bin/busybox",
        file_path=target, dest_path="", exit_code="0", flags="O_WRONLY|O_CREAT|O_APPEND", **context)


def test_file_events_take_the_context_of_the_call_behind_the_change(tmp_path):
    rules = fim_rules.parse({"file_paths": {"w": [f"{tmp_path}/%%"]}}, "test")
    watcher = FimWatcher(rules, 1 << 20, causes=True)
    inside, host, unseen = (str(tmp_path / n) for n in ("inside", "host", "unseen"))
    watcher.observe("bpf_file_events", [
        bpf_row(inside, "unlink", 7, 4242, **CONTEXT),
        bpf_row(host, "unlink", 8, 99, **{**dict.fromkeys(CONTEXT, ""), "pid_namespace": 1, "mnt_namespace": 2,
                                           "net_namespace": 3})])
    now = time.monotonic_ns()
    for path in (inside, host, unseen):
        watcher._record(path, "DELETED", 0, now)
    rows = {r["target_path"]: r for _, r, _, _ in watcher._pending}
    assert all(set(r) == set(TABLES["file_events"].column_names) - {"eid", "host_identifier", "is_open"}
               for r in rows.values())
    assert {k: rows[inside][k] for k in CONTEXT} == CONTEXT and rows[inside]["bpf_eid"] == 7
    assert rows[host]["container_id"] == "" and rows[host]["pid_namespace"] == 1
    # No call seen: empty, as a host process's, namespaces unknown.
    assert rows[unseen]["bpf_eid"] is None and rows[unseen]["container_id"] == "" \
        and rows[unseen]["pid_namespace"] is None


def test_log_writer_from_bpf_file_events_carries_its_container(tmp_path):
    logs = LogCollector(LogsConfig(), store=None, rescan_interval_ms=1000)
    target = str(tmp_path / "app.log")
    logs.observe("bpf_file_events", [bpf_row(target, "openat", 3, 4242, ancestry="[]", **CONTEXT)])
    writer = logs._writer_of(SimpleNamespace(path=target, key="file:1:1", dev=1, ino=1))
    assert writer == {"writer_pid": 4242, "writer_path": "/bin/busybox",
                                                "writer_ancestry": "[]", **CONTEXT}


@pytest.fixture
def podman_like_cgroup():
    """A real cgroup named as podman names a container's, under a parent of
    our own; removed (after its processes) at the end."""
    root = cgroup2_mount()
    if os.geteuid() != 0 or not root:
        pytest.skip("needs root and a cgroup2 mount")
    parent = os.path.join(root, f"vajra-test-{uuid.uuid4().hex[:8]}")
    leaf = os.path.join(parent, f"libpod-{CID}")
    os.makedirs(leaf)
    try:
        yield root, leaf
    finally:
        for d in (leaf, parent):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.05)


@needs_root
def test_log_writer_found_through_proc_is_resolved_to_its_container(tmp_path, podman_like_cgroup):
    """The /proc fallback: a process in the container's cgroup holds the log
    open; its cgroup resolves through the containers unit's resolver, its
    namespaces from /proc/PID/ns."""
    root, leaf = podman_like_cgroup
    log_path = tmp_path / "held.log"
    log_path.write_text("")
    writer = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {leaf}/cgroup.procs && exec sleep 60 3>>{log_path}"])
    try:
        deadline = time.monotonic() + 10
        while str(writer.pid) not in open(f"{leaf}/cgroup.procs").read().split() or \
                not any(os.path.realpath(f"/proc/{writer.pid}/fd/{fd}") == str(log_path)
                        for fd in os.listdir(f"/proc/{writer.pid}/fd")):
            assert time.monotonic() < deadline, "the writer never settled in its cgroup"
            time.sleep(0.05)
        resolver = ContainerResolver(CgroupMap(root))
        resolver.cgroups.walk()
        resolver.sources["podman"] = object()           # a runtime answered once ...
        resolver.learn(ContainerInfo(CID, "podman", name="web", image="localhost/web:1", complete=True))
        logs = LogCollector(LogsConfig(), store=None, rescan_interval_ms=1000, containers=resolver)
        st = os.stat(log_path)
        found = logs._writer_of(SimpleNamespace(
            path=str(log_path), key=f"file:{st.st_dev}:{st.st_ino}", dev=st.st_dev, ino=st.st_ino))
        assert found["writer_pid"] == writer.pid
        assert (found["container_id"], found["container_name"], found["container_image"],
                found["container_runtime"]) == (CID, "web", "localhost/web:1", "podman")
        assert found["pid_namespace"] == os.stat(f"/proc/{writer.pid}/ns/pid").st_ino
        # And a host process holding a log open: empty container columns.
        assert resolver.by_pid(os.getpid())[0][0] == ""
    finally:
        writer.kill()
        writer.wait()

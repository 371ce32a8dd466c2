"""Container context on real events, with a real runtime: podman with runc and
the cgroupfs manager, its API service started here on a private socket, an
image imported from a busybox rootfs built here (no registry is reachable).

Everything made here (containers, pods, the image, the API service) is
removed at the end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

from conftest import needs_bpf, needs_root
from harness import private_runtime, unique_program, wait_runtime_connected, wait_unix_socket
from images import BUSYBOX, busybox_rootfs, rootfs_tar

pytestmark = [needs_bpf, needs_root]

PODMAN = ["podman", "--runtime=runc", "--cgroup-manager=cgroupfs"]
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1000:1000"]
TAG = uuid.uuid4().hex[:8]
IMAGE = f"localhost/vajra-test-busybox:{TAG}"


def _installed() -> str | None:
    """podman and runc, installed from Debian if missing; None, or why not."""
    missing = [p for p, b in (("podman", "podman"), ("runc", "runc"), ("busybox-static", BUSYBOX))
               if not shutil.which(b) and not os.path.exists(b)]
    if missing:
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", *missing],
                           capture_output=True, text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode:
            return f"cannot install {missing}: {r.stderr[-300:]}"
    if not os.path.exists(BUSYBOX) or b"ELF" not in open(BUSYBOX, "rb").read(4):
        return "no static busybox"
    return None


def podman(*args, check=True, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, check=check, timeout=timeout)


class Runtime:
    """The image, the API service and what the tests create, for cleanup."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.socket = os.path.join(workdir, "podman.sock")
        self.service: subprocess.Popen | None = None
        self.containers: list[str] = []
        self.pods: list[str] = []

    def build_image(self) -> None:
        root = busybox_rootfs(os.path.join(self.workdir, "rootfs"))
        podman("import", rootfs_tar(root, os.path.join(self.workdir, "rootfs.tar")), IMAGE)

    def start_service(self) -> None:
        self.service = subprocess.Popen([*PODMAN, "system", "service", "--time=0", f"unix://{self.socket}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        wait_unix_socket(self.socket, what="podman system service")

    def stop_service(self) -> None:
        if self.service is not None:
            os.killpg(self.service.pid, signal.SIGTERM)
            try:
                self.service.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.service.pid, signal.SIGKILL)
                self.service.wait()
            self.service = None
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def name(self, what: str) -> str:
        name = f"vajra-{what}-{uuid.uuid4().hex[:8]}"
        self.containers.append(name)
        return name

    def inspect(self, name: str) -> dict:
        return json.loads(podman("inspect", name).stdout)[0]

    def cleanup(self) -> None:
        self.stop_service()
        for name in self.containers:
            podman("rm", "-f", "-t", "0", name, check=False)
        for pod in self.pods:
            podman("pod", "rm", "-f", "-t", "0", pod, check=False)
        podman("rmi", "-f", IMAGE, check=False)


@pytest.fixture(scope="module")
def runtime():
    yield from private_runtime(_installed, Runtime, "vajra-containers-", prepare=('build_image', 'start_service'))


def wait_connected(d, timeout=30) -> dict:
    return wait_runtime_connected(d, "podman", timeout)


@pytest.fixture
def daemon(daemon_factory, runtime):
    d = daemon_factory(f"--podman_socket={runtime.socket}", "--docker_socket=")
    wait_connected(d)
    return d


def execs_in(cid: str, cmdline: str = "/bin/true"):
    """The exec of the container's command (runc's own `runc init` execs in
    the container's cgroup first)."""
    return lambda e: e["syscall"] == "exec" and e["container_id"] == cid and e["cmdline"] == cmdline


def test_short_lived_container_exec_row(daemon, runtime):
    """/bin/true in a container lives well under 100 ms: its exec row still
    names the container as `podman inspect` does."""
    name = runtime.name("true")
    podman("run", "--name", name, *LIMITS, IMAGE, "/bin/true")
    info = runtime.inspect(name)
    cid = info["Id"]
    rows = daemon.wait_events(execs_in(cid), timeout=20)
    assert rows, daemon.call("status")["collectors"]["containers"]
    row = rows[0]
    assert row["cmdline"] == "/bin/true" and row["path"] == "/bin/busybox"
    assert (row["container_id"], row["container_name"], row["container_image"], row["container_runtime"]) == \
        (cid, info["Name"], info["ImageName"], "podman")
    assert (row["pod_name"], row["pod_namespace"], row["pod_uid"]) == ("", "", "")
    # Its own pid and mount namespaces, not ours.
    assert row["pid_namespace"] and row["pid_namespace"] != os.stat("/proc/self/ns/pid").st_ino
    assert row["mnt_namespace"] and row["mnt_namespace"] != os.stat("/proc/self/ns/mnt").st_ino
    assert row["net_namespace"] and row["net_namespace"] != os.stat("/proc/self/ns/net").st_ino
    # Host processes carry no container.
    host = daemon.wait_events(lambda e: e["syscall"] == "exec" and e["path"].endswith("/podman"))
    assert host and all(h["container_id"] == "" and h["container_name"] == "" for h in host)
    assert host[0]["pid_namespace"] == os.stat("/proc/self/ns/pid").st_ino


def test_kubelet_labels_give_pod_columns(daemon, runtime):
    """A container created as kubelet does through CRI (its io.kubernetes.pod.*
    labels) gets the pod columns; a podman pod gives its name and id."""
    pod_uid = str(uuid.uuid4())
    name = runtime.name("k8s")
    podman("run", "--name", name, *LIMITS, "--label", "io.kubernetes.pod.name=web-7d4b9c",
           "--label", "io.kubernetes.pod.namespace=shop", "--label", f"io.kubernetes.pod.uid={pod_uid}",
           IMAGE, "/bin/true")
    cid = runtime.inspect(name)["Id"]
    row = daemon.wait_events(execs_in(cid), timeout=20)[0]
    assert (row["container_name"], row["pod_name"], row["pod_namespace"], row["pod_uid"]) == \
        (name, "web-7d4b9c", "shop", pod_uid)

    pod = f"vajra-pod-{uuid.uuid4().hex[:8]}"
    runtime.pods.append(pod)
    pod_id = podman("pod", "create", "--name", pod, "--infra=false").stdout.strip()
    member = runtime.name("member")
    podman("run", "--pod", pod, "--name", member, *LIMITS, IMAGE, "/bin/true")
    mid = runtime.inspect(member)["Id"]
    row = daemon.wait_events(execs_in(mid), timeout=20)[0]
    assert (row["container_name"], row["pod_name"], row["pod_uid"]) == (member, pod, pod_id)


def test_socket_and_file_rows_of_a_long_running_container(daemon_factory, runtime, workdir):
    """A container that keeps running: its connect and its writes to a watched
    file carry it too, and it is in `containers` while it runs."""
    watched = os.path.join(workdir, "shared")
    os.mkdir(watched)
    config = os.path.join(workdir, "vajra-fim.conf")
    with open(config, "w") as f:
        json.dump({"options": {}, "file_paths": {"shared": [watched + "/%%"]}}, f)
    d = daemon_factory(f"--podman_socket={runtime.socket}", "--docker_socket=", f"--config_path={config}")
    wait_connected(d)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        name = runtime.name("long")
        # Paths in rows are as the process sees them (its mount namespace):
        # the directory is mounted at the same path inside.
        script = f"while true; do touch {watched}/beat; echo hi | nc -w 1 127.0.0.1 {port}; sleep 0.2; done"
        podman("run", "-d", "--network=host", "-v", f"{watched}:{watched}", "--name", name, *LIMITS, IMAGE,
               "/bin/sh", "-c", script)
        cid = runtime.inspect(name)["Id"]
        conns = d.wait_events(lambda e: e["syscall"] == "connect" and e["remote_port"] == port
                              and e["container_id"] == cid, table="bpf_socket_events", timeout=20)
        assert conns, "no connect row carries the container"
        assert (conns[0]["container_name"], conns[0]["container_image"], conns[0]["container_runtime"]) == \
            (name, IMAGE, "podman")
        files = d.wait_events(lambda e: e["file_path"] == os.path.join(watched, "beat") and e["container_id"] == cid,
                              table="bpf_file_events", timeout=20)
        assert files, [(e["file_path"], e["container_id"][:12], e["syscall"]) for e in
                       d.wait_events(lambda e: True, table="bpf_file_events", timeout=1)][:10]
        assert files[0]["container_name"] == name and files[0]["pid_namespace"] != \
            os.stat("/proc/self/ns/pid").st_ino
        live = [r for r in d.call("table/read", {"table": "containers"})["rows"] if r["id"] == cid]
        assert live and live[0]["name"] == name and live[0]["state"] == "running" and live[0]["cgroup_id"] == \
            conns[0]["cid"]
        podman("rm", "-f", "-t", "0", name)
    events = d.wait_events(lambda e: e["container_id"] == cid and e["action"] == "delete",
                           table="container_events", timeout=20)
    assert events and events[0]["container_name"] == name
    actions = [e["action"] for e in d.wait_events(lambda e: e["container_id"] == cid, table="container_events")]
    assert {"create", "start", "die", "delete"} <= set(actions), actions


def test_runtime_away_rows_flow_and_are_filled_when_it_returns(daemon_factory, runtime, workdir):
    """With podman's API service stopped, a container's exec row waits for its
    metadata while other rows keep flowing; when the service is back, the row
    is stored with name and image filled."""
    d = daemon_factory(f"--podman_socket={runtime.socket}", "--docker_socket=", "--container_fill_wait_ms=60000")
    wait_connected(d)
    runtime.stop_service()
    try:
        name = runtime.name("late")
        podman("run", "--name", name, *LIMITS, IMAGE, "/bin/true")
        cid = runtime.inspect(name)["Id"]
        marker = unique_program(workdir, f"vajra-marker-{uuid.uuid4().hex[:8]}")
        subprocess.run([marker], check=True)
        assert d.wait_events(lambda e: e["path"] == marker and e["syscall"] == "exec"), "host rows stopped flowing"
        assert not d.wait_events(execs_in(cid), timeout=1), "stored before its metadata came"
        assert d.call("status")["collectors"]["containers"]["runtimes"]["podman"]["connected"] is False
    finally:
        runtime.start_service()
    row = d.wait_events(execs_in(cid), timeout=30)[0]
    assert (row["container_name"], row["container_image"]) == (name, IMAGE)
    assert d.call("status")["collectors"]["containers"]["rows_filled_late"] >= 1


def test_runtime_away_past_the_bound_stores_the_id_alone(daemon_factory, runtime):
    d = daemon_factory(f"--podman_socket={runtime.socket}", "--docker_socket=", "--container_fill_wait_ms=300")
    wait_connected(d)
    runtime.stop_service()
    try:
        name = runtime.name("timeout")
        podman("run", "--name", name, *LIMITS, IMAGE, "/bin/true")
        cid = runtime.inspect(name)["Id"]
        row = d.wait_events(execs_in(cid), timeout=20)[0]
        assert (row["container_id"], row["container_runtime"], row["container_name"]) == (cid, "podman", "")
        assert d.call("status")["collectors"]["containers"]["fill_timeouts"] >= 1
    finally:
        runtime.start_service()
    # Back: the container is known by name from then on.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = [r for r in d.call("table/read", {"table": "containers"})["rows"] if r["id"] == cid]
        if live and live[0]["name"] == name:
            break
        time.sleep(0.2)
    assert live and live[0]["name"] == name and live[0]["image"] == IMAGE


def test_container_events_name_who_ran_the_container(daemon, runtime, workdir):
    """`podman run` from a shell: the create and start rows carry the OCI
    runtime that made the container's cgroup, and its ancestry reaches that
    shell through the processes it was born to (conmon's double fork)."""
    name = runtime.name("actor")
    shell = subprocess.run(["/bin/sh", "-c", f"{' '.join(PODMAN)} run --name {name} {' '.join(LIMITS)} {IMAGE} "
                            "/bin/true; echo $$"], capture_output=True, text=True, check=True)
    shell_pid = int(shell.stdout.split()[-1])
    cid = runtime.inspect(name)["Id"]
    rows = daemon.wait_events(lambda e: e["container_id"] == cid and e["action"] == "start",
                              table="container_events", timeout=20)
    assert rows
    row = rows[0]
    assert row["pid"] and row["path"].endswith("runc"), row
    lineage = json.loads(row["ancestry"])
    assert any(a["path"].endswith("/podman") for a in lineage), lineage
    assert shell_pid in [a["pid"] for a in lineage], lineage


def test_file_log_and_ancestry_rows_of_a_container(daemon_factory, runtime, workdir):
    """A long-running container with a host directory bind-mounted: its
    writes to a watched file give file_events rows with its container
    columns; its lines in followed log files give log_events rows with them,
    whether the writer is known from bpf_file_events (under file_paths) or
    found through /proc (not watched: the fallback resolves its cgroup); the
    ancestry of its processes names it where the chain enters it."""
    watched = os.path.join(workdir, "watched")
    logs = os.path.join(workdir, "logs")
    os.mkdir(watched)
    os.mkdir(logs)
    config = os.path.join(workdir, "vajra-ctx.conf")
    with open(config, "w") as f:
        json.dump({"options": {}, "file_paths": {"watched": [watched + "/%%"]},
                   "log_files": {"seen": {"paths": [watched + "/*.log"], "start_at": "beginning"},
                                 "held": {"paths": [logs + "/*.log"], "start_at": "beginning"}}}, f)
    d = daemon_factory(f"--podman_socket={runtime.socket}", "--docker_socket=", f"--config_path={config}")
    wait_connected(d)
    name = runtime.name("ctx")
    # app.log is opened anew for each line (bpf_file_events sees each open);
    # held.log is opened once and kept open (only /proc can tell its writer).
    script = (f"exec 3>>{logs}/held.log; i=0; while true; do i=$((i+1)); echo state $i > {watched}/state; "
              f"echo line $i >> {watched}/app.log; echo held $i >&3; sleep 0.3; done")
    podman("run", "-d", "-v", f"{workdir}:{workdir}", "--name", name, *LIMITS, IMAGE, "/bin/sh", "-c", script)
    info = runtime.inspect(name)
    cid, main_pid = info["Id"], info["State"]["Pid"]
    context = (cid, name, IMAGE, "podman")

    def columns(row):
        return (row["container_id"], row["container_name"], row["container_image"], row["container_runtime"])

    changes = d.wait_events(lambda e: e["target_path"] == os.path.join(watched, "state")
                            and e["action"] == "UPDATED" and e["bpf_eid"], table="file_events", timeout=20)
    assert changes, d.wait_events(lambda e: True, table="file_events", timeout=1)[:5]
    assert columns(changes[0]) == context
    assert changes[0]["pid"] == main_pid
    assert changes[0]["pid_namespace"] == os.stat(f"/proc/{main_pid}/ns/pid").st_ino != \
        os.stat("/proc/self/ns/pid").st_ino
    cause = d.wait_events(lambda e: e["eid"] == changes[0]["bpf_eid"], table="bpf_file_events", timeout=5)
    assert cause and columns(cause[0]) == context and cause[0]["pid"] == changes[0]["pid"]

    for category in ("seen", "held"):
        lines = d.wait_events(lambda e: e["category"] == category and e["action"] == "line"
                              and e["writer_pid"], table="log_events", timeout=20)
        assert lines, (category, d.call("status")["collectors"]["logs"])
        assert columns(lines[0]) == context, (category, lines[0])
        assert lines[0]["writer_pid"] == main_pid and lines[0]["pid_namespace"] and \
            lines[0]["pid_namespace"] != os.stat("/proc/self/ns/pid").st_ino, lines[0]

    # `sleep`, forked by the container's shell: its chain runs from the
    # container's shell out through conmon and podman to this test.
    execs = d.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                          and e["cmdline"] == "sleep 0.3", timeout=20)
    assert execs
    chain = json.loads(execs[0]["ancestry"])
    assert chain[0]["pid"] == main_pid and chain[0]["container_id"] == cid, chain
    host = [a for a in chain if a["path"].endswith("/podman") or a["pid"] == os.getpid()]
    assert len(host) >= 2 and all(a["container_id"] == "" for a in host), chain
    assert all(a["container_id"] in (cid, "") for a in chain)
    # host processes' own rows: ancestry entries all ""
    marker = unique_program(workdir, f"vajra-marker-{uuid.uuid4().hex[:8]}")
    subprocess.run([marker], check=True)
    mine = d.wait_events(lambda e: e["path"] == marker and e["syscall"] == "exec")
    assert mine and all(a["container_id"] == "" for a in json.loads(mine[0]["ancestry"]))
    podman("rm", "-f", "-t", "0", name)

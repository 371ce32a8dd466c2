"""Container context through CRI, with a real containerd: a private containerd
(Debian's, its CRI plugin built in) started here with its own config, root,
state and socket under a temporary directory; an image built here from a
busybox rootfs and imported with `ctr -n k8s.io images import`, which also
serves as the pod sandbox (pause) image. Pods and containers are made through
the CRI gRPC API as kubelet makes them: the io.kubernetes.* labels, the
kubelet cgroupfs layout (cgroup_parent /kubepods/besteffort/pod<uid>), and
the host network (no CNI plugin is needed).

This host's root lacks CAP_SYS_RESOURCE, so CRI's sandbox oom_score_adj of
-998 cannot be set: `restrict_oom_score_adj` keeps it at containerd's own.

Everything made here is removed at the end: pods and containers through CRI,
then containerd and any shim of it, mounts under its root, the cgroups."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from conftest import needs_bpf, needs_root
from harness import (pids_whose_cmdline, private_runtime, remove_empty_dirs, wait_runtime_connected,
                     wait_unix_socket)
from images import BUSYBOX, busybox_rootfs, docker_archive
from vajrad.enrich.containers import parse_cgroup_path

pytestmark = [needs_bpf, needs_root]

TAG = uuid.uuid4().hex[:8]
IMAGE = f"localhost/vajra-test-busybox:{TAG}"
RUN_DIR = "/run/containerd"
BINARIES = (("containerd", "containerd"), ("ctr", "containerd"), ("containerd-shim-runc-v2", "containerd"),
            ("runc", "runc"))


def _installed() -> str | None:
    """containerd, runc, busybox and python3-grpcio, installed from Debian if
    missing; None, or why not."""
    missing = {pkg for binary, pkg in BINARIES if not shutil.which(binary)}
    if not os.path.exists(BUSYBOX):
        missing.add("busybox-static")
    try:
        import grpc  # noqa: F401
    except ImportError:
        missing.add("python3-grpcio")
    if missing:
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *sorted(missing)],
                           capture_output=True, text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode:
            return f"cannot install {sorted(missing)}: {r.stderr[-300:]}"
    return None


CONFIG = """version = 2
root = "{w}/root"
state = "{w}/state"
# Only what CRI with runc and overlayfs needs here.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.native", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{w}/containerd.sock"
[ttrpc]
  address = "{w}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{w}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    Root = "{w}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{w}/cni/bin"
    conf_dir = "{w}/cni/conf"
"""


class Containerd:
    """The private containerd, what the tests make in it, and its cleanup."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.socket = os.path.join(workdir, "containerd.sock")
        self.log = os.path.join(workdir, "containerd.log")
        self.process: subprocess.Popen | None = None
        self.cri = None
        self.sandboxes: list[str] = []
        self.cgroup_parents: list[str] = []
        # The shims' sockets go to /run/containerd/s whatever the config says.
        self.made_run_dir = not os.path.exists(RUN_DIR)
        # runc's cgroups of pods without a cgroup parent: /k8s.io/<id>
        self.made_namespace_cgroup = not any(os.path.isdir(os.path.join(r, "k8s.io")) for r in _cgroup_roots())

    def start(self) -> None:
        with open(os.path.join(self.workdir, "config.toml"), "w") as f:
            f.write(CONFIG.format(w=self.workdir, image=IMAGE))
        self.start_daemon()
        root = busybox_rootfs(os.path.join(self.workdir, "rootfs"))
        archive = docker_archive(root, os.path.join(self.workdir, "image.tar"), IMAGE, ["/bin/sleep", "1000000"])
        self.ctr("images", "import", archive)
        from cri_pods import CriClient
        self.cri = CriClient(self.socket)

    def start_daemon(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(["containerd", "--config", os.path.join(self.workdir, "config.toml")],
                                            stdout=log, stderr=log, start_new_session=True)
        try:
            wait_unix_socket(self.socket, lambda: self.process.poll() is None, what="containerd")
        except AssertionError as e:
            raise AssertionError(f"{e}: {self.tail()}") from None

    def stop_daemon(self) -> None:
        """containerd alone: its shims, and so the containers, keep running."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def ctr(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", self.socket, "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, check=True, timeout=60)

    def tail(self) -> str:
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-15:])
        except OSError:
            return ""

    def pod(self, name: str, namespace: str = "shop", kubelet_cgroup: bool = True) -> tuple[str, bytes, dict]:
        """A pod sandbox as kubelet makes one with the cgroupfs driver (or
        with no cgroup parent, as other CRI clients may): (id, its config,
        its identity)."""
        uid = str(uuid.uuid4())
        parent = f"/kubepods/besteffort/pod{uid}" if kubelet_cgroup else ""
        if parent:
            self.cgroup_parents.append(parent)
        config = self.cri.sandbox_config(name, namespace, uid, parent)
        sid = self.cri.run_pod_sandbox(config)
        self.sandboxes.append(sid)
        return sid, config, {"name": name, "namespace": namespace, "uid": uid}

    def run(self, sandbox: tuple, name: str, command: list[str]) -> str:
        sid, config, pod = sandbox
        cid = self.cri.create_container(sid, config, name, IMAGE, command, pod)
        self.cri.start_container(cid)
        return cid

    def cleanup(self) -> None:
        if self.cri is not None:
            for sid in self.sandboxes:
                for step in (self.cri.stop_pod_sandbox, self.cri.remove_pod_sandbox):
                    try:
                        step(sid)
                    except Exception:       # noqa: BLE001 - cleanup goes on; what is left is swept below
                        pass
            self.cri.close()
        self.stop_daemon()
        # Shims outlive containerd by design: any of ours still there (its
        # -address is our socket) is ended, by pid.
        for pid in pids_whose_cmdline(lambda cmdline: self.socket.encode() in cmdline.split(b"\0")):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _unmount_under(self.workdir)
        _remove_cgroups(self.cgroup_parents)
        if self.made_namespace_cgroup:
            for root in _cgroup_roots():
                try:
                    os.rmdir(os.path.join(root, "k8s.io"))
                except OSError:
                    pass
        if self.made_run_dir:            # only the empty directories the shims left
            remove_empty_dirs(RUN_DIR)


def _unmount_under(directory: str) -> None:
    """Mounts containerd left under its root and state (overlay rootfs, the
    sandbox's /dev/shm), deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(directory.rstrip("/") + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _cgroup_roots() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split(" - ")[1].split()[0] in ("cgroup", "cgroup2")]


def _remove_cgroups(parents: list[str]) -> None:
    """The pods' cgroups (and /kubepods/besteffort, /kubepods when empty) in
    every hierarchy runc made them in."""
    for root in _cgroup_roots():
        for parent in parents:
            path = root + parent
            for d in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
                if not os.path.isdir(d) or d == root:
                    continue
                for child in sorted((os.path.join(d, c) for c in os.listdir(d)
                                     if os.path.isdir(os.path.join(d, c))), reverse=True):
                    if d == path:           # a container cgroup runc did not remove
                        try:
                            os.rmdir(child)
                        except OSError:
                            pass
                try:
                    os.rmdir(d)
                except OSError:
                    pass                # not empty: another pod's, or a real kubelet's


@pytest.fixture(scope="module")
def containerd():
    yield from private_runtime(_installed, Containerd, "vajra-containerd-")


def wait_connected(d, timeout=30) -> dict:
    return wait_runtime_connected(d, "containerd", timeout)


@pytest.fixture
def daemon(daemon_factory, containerd):
    d = daemon_factory(f"--containerd_socket={containerd.socket}", "--podman_socket=", "--docker_socket=",
                       "--crio_socket=")
    wait_connected(d)
    return d


def containers_row(d, cid: str, want=lambda r: True, timeout=20) -> dict:
    deadline = time.monotonic() + timeout
    rows = []
    while time.monotonic() < deadline:
        rows = [r for r in d.call("table/read", {"table": "containers"})["rows"] if r["id"] == cid]
        if rows and want(rows[0]):
            return rows[0]
        time.sleep(0.1)
    raise AssertionError(f"containers row of {cid}: {rows}")


def test_short_lived_cri_container_exec_row(daemon, containerd):
    """/bin/true in a pod made as kubelet makes it: its exec row carries the
    container, its image, containerd and the pod from kubelet's labels; its
    cgroup path (containerd with the cgroupfs driver) resolves."""
    sandbox = containerd.pod("web-7d4b9c")
    pod = sandbox[2]
    cid = containerd.run(sandbox, "app", ["/bin/true"])
    rows = daemon.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                              and e["cmdline"] == "/bin/true", timeout=20)
    assert rows, (daemon.call("status")["collectors"]["containers"], containerd.tail())
    row = rows[0]
    assert (row["container_id"], row["container_name"], row["container_image"], row["container_runtime"]) == \
        (cid, "app", IMAGE, "containerd")
    assert (row["pod_name"], row["pod_namespace"], row["pod_uid"]) == (pod["name"], pod["namespace"], pod["uid"])
    assert row["pid_namespace"] != os.stat("/proc/self/ns/pid").st_ino
    # Host network, as asked: the host's network namespace.
    assert row["net_namespace"] == os.stat("/proc/self/ns/net").st_ino

    live = containers_row(daemon, cid, lambda r: r["state"] == "exited")
    assert live["cgroup_path"] == f"/kubepods/besteffort/pod{pod['uid']}/{cid}"
    found = parse_cgroup_path(live["cgroup_path"])
    assert (found.container_id, found.layout, found.pod_uid) == (cid, "kubepods-cgroupfs", pod["uid"])
    assert (live["name"], live["image"], live["runtime"], live["pod_name"]) == ("app", IMAGE, "containerd",
                                                                                pod["name"])
    assert json.loads(live["labels"])["io.kubernetes.container.name"] == "app"
    assert live["image_id"].startswith("sha256:") and live["created"] > 0

    # containerd 1.6 has no GetContainerEvents: the container's events come from polling.
    events = daemon.wait_events(lambda e: e["container_id"] == cid and e["action"] == "die",
                                table="container_events", timeout=20)
    assert events and events[0]["exit_code"] == 0 and events[0]["container_name"] == "app"
    assert events[0]["pod_uid"] == pod["uid"]
    stats = daemon.call("status")["collectors"]["containers"]["runtimes"]["containerd"]
    assert stats["event_source"] in ("polling", "GetContainerEvents") and stats["errors"] == 0, stats


def test_long_running_cri_container_and_its_sandbox(daemon, containerd):
    """A container that keeps running: `containers` has it running with its
    pid; its shell's children carry it; the pod's sandbox (pause) process,
    in its own cgroup of the pod, carries the pod but no container name; when
    the pod is removed the container's delete event comes."""
    sandbox = containerd.pod("worker-0", namespace="batch")
    pod = sandbox[2]
    cid = containerd.run(sandbox, "loop", ["/bin/sh", "-c", "while true; do sleep 0.2; done"])
    rows = daemon.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                              and e["cmdline"] == "sleep 0.2", timeout=20)
    assert rows and (rows[0]["container_name"], rows[0]["pod_namespace"]) == ("loop", "batch")
    live = containers_row(daemon, cid, lambda r: r["state"] == "running" and r["pid"])
    with open(f"/proc/{live['pid']}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[:2] == [b"/bin/sh", b"-c"]

    # The sandbox's pause process (the image's /bin/sleep here) ran in /kubepods/.../pod<uid>/<sandbox id>.
    sid = sandbox[0]
    pause = daemon.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == sid, timeout=20)
    assert pause and (pause[0]["container_name"], pause[0]["pod_name"], pause[0]["pod_uid"],
                      pause[0]["container_runtime"]) == ("", "worker-0", pod["uid"], "containerd")
    # (not the unit's fill_timeouts: rows of other cgroups that look like
    # containers, from whatever else runs on the host, may count there)

    containerd.cri.stop_pod_sandbox(sid)
    # Polled: a stop and a removal within one interval would show as the delete alone.
    died = daemon.wait_events(lambda e: e["container_id"] == cid and e["action"] == "die",
                              table="container_events", timeout=20)
    assert died and died[0]["exit_code"] == 137, died       # SIGKILL: StopPodSandbox gives no grace
    containerd.cri.remove_pod_sandbox(sid)
    containerd.sandboxes.remove(sid)
    deleted = daemon.wait_events(lambda e: e["container_id"] == cid and e["action"] == "delete",
                                 table="container_events", timeout=20)
    assert deleted and deleted[0]["container_name"] == "loop", (
        daemon.call("status")["collectors"]["containers"],
        daemon.wait_events(lambda e: e["container_id"] == cid, table="container_events", timeout=0.1))
    actions = {e["action"] for e in daemon.wait_events(lambda e: e["container_id"] == cid,
                                                        table="container_events")}
    assert {"create", "start", "die", "delete"} <= actions, actions


def test_cri_pod_without_a_cgroup_parent(daemon, containerd):
    """A pod made by a CRI client that gives no cgroup parent: containerd puts
    its containers at /k8s.io/<id> (its namespace), which resolves to
    containerd; the pod comes from the labels."""
    sandbox = containerd.pod("plain", namespace="tools", kubelet_cgroup=False)
    cid = containerd.run(sandbox, "once", ["/bin/true"])
    rows = daemon.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                              and e["cmdline"] == "/bin/true", timeout=20)
    assert rows and (rows[0]["container_name"], rows[0]["container_runtime"], rows[0]["pod_name"],
                     rows[0]["pod_uid"]) == ("once", "containerd", "plain", sandbox[2]["uid"])
    live = containers_row(daemon, cid)
    assert live["cgroup_path"] == f"/k8s.io/{cid}"
    assert parse_cgroup_path(live["cgroup_path"]).layout == "containerd-cgroupfs"


def test_containerd_away_rows_flow_with_the_id_alone(daemon_factory, containerd, workdir):
    """containerd's socket answering nothing (the daemon is given a path where
    no runtime listens): rows of a CRI container's cgroup still flow, with the
    id; the failures are counted in status."""
    d = daemon_factory(f"--containerd_socket={workdir}/absent.sock", "--podman_socket=", "--docker_socket=",
                       "--crio_socket=")
    cid = containerd.run(containerd.pod("lonely"), "app", ["/bin/true"])
    rows = d.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                         and e["cmdline"] == "/bin/true", timeout=20)
    assert rows and (rows[0]["container_runtime"], rows[0]["container_name"]) == ("cri", "")
    stats = d.call("status")["collectors"]["containers"]["runtimes"]["containerd"]
    assert stats["available"] is False and stats["connected"] is False


def test_containerd_back_fills_rows_of_a_running_container(daemon_factory, containerd):
    """vajrad started while containerd is stopped (its containers running on
    under their shims): the container's rows flow at once with its id and
    `cri`, nothing held; when containerd is back, vajrad connects, lists it,
    and its next rows carry its name and pod. Last in the module: it
    restarts the module's containerd."""
    sandbox = containerd.pod("survivor", namespace="ops")
    cid = containerd.run(sandbox, "loop", ["/bin/sh", "-c", "while true; do sleep 0.2; done"])
    containerd.stop_daemon()
    try:
        d = daemon_factory(f"--containerd_socket={containerd.socket}", "--podman_socket=", "--docker_socket=",
                           "--crio_socket=")
        alone = d.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                              and e["cmdline"] == "sleep 0.2", timeout=20)
        assert alone and (alone[0]["container_runtime"], alone[0]["container_name"], alone[0]["pod_uid"]) == \
            ("cri", "", sandbox[2]["uid"])                  # the pod uid from the kubepods path
        stats = d.call("status")["collectors"]["containers"]
        assert stats["runtimes"]["containerd"]["connected"] is False and stats["fill_timeouts"] == 0
    finally:
        containerd.start_daemon()
    wait_connected(d)
    filled = d.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                           and e["cmdline"] == "sleep 0.2" and e["container_name"] == "loop", timeout=20)
    assert filled and (filled[0]["container_runtime"], filled[0]["pod_name"], filled[0]["pod_namespace"]) == \
        ("containerd", "survivor", "ops")

"""Container context with a real Docker Engine: Debian's dockerd started here,
private to the test, and kept off the host's network configuration:
`--iptables=false --ip6tables=false --ip-forward=false --ip-masq=false
--bridge=none` (no docker0, no rules), its data root, exec root (where it
starts its own containerd), pid file, config file and API socket under a
temporary directory; containers with `--network none`; an image built here
from a busybox rootfs and `docker load`ed (no registry is reachable).

Everything made here is removed at the end: containers, the image, dockerd
and its containerd, mounts under its roots, the /docker cgroups runc made,
the shims' empty /run/containerd/s, and the trust key dockerd writes to
/etc/docker when there was none. The last
test checks that the host's iptables rules are as they were."""
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
from harness import pids_whose_cmdline, private_runtime, remove_empty_dirs
from images import BUSYBOX, busybox_rootfs, docker_archive

pytestmark = [needs_bpf, needs_root]

TAG = uuid.uuid4().hex[:8]
IMAGE = f"localhost/vajra-test-busybox:{TAG}"
SHIM_RUN_DIR = "/run/containerd"
TRUST_KEY = "/etc/docker/key.json"      # dockerd 20.10 writes it whatever its other paths


def _installed() -> str | None:
    missing = [p for p, b in (("docker.io", "dockerd"), ("docker.io", "docker")) if not shutil.which(b)]
    if not os.path.exists(BUSYBOX):
        missing.append("busybox-static")
    if missing:
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *sorted(set(missing))],
                           capture_output=True, text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode:
            return f"cannot install {sorted(set(missing))}: {r.stderr[-300:]}"
    return None


def _iptables() -> str:
    """The host's rules (iptables-save without its timestamp comments), or "" without iptables."""
    if not shutil.which("iptables-save"):
        return ""
    out = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


class Dockerd:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.socket = os.path.join(workdir, "docker.sock")
        self.log = os.path.join(workdir, "dockerd.log")
        self.process: subprocess.Popen | None = None
        self.containers: list[str] = []
        self.had_trust_key = os.path.exists(TRUST_KEY)
        self.had_docker_cgroup = os.path.isdir("/sys/fs/cgroup/unified/docker") or \
            os.path.isdir("/sys/fs/cgroup/docker")
        self.firewall = _iptables()
        # The shims of dockerd's containerd put their sockets in /run/containerd/s whatever its paths.
        self.made_run_dir = not os.path.exists(SHIM_RUN_DIR)

    def start(self) -> None:
        config = os.path.join(self.workdir, "daemon.json")
        with open(config, "w") as f:
            f.write("{}\n")
        w = self.workdir
        argv = ["dockerd", f"--config-file={config}", "--iptables=false", "--ip6tables=false",
                "--ip-forward=false", "--ip-masq=false", "--bridge=none", f"--data-root={w}/data",
                f"--exec-root={w}/exec", f"--pidfile={w}/docker.pid", f"--host=unix://{self.socket}"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dockerd exited {self.process.returncode}: {self.tail()}")
            if os.path.exists(self.socket) and self.docker("version", check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"dockerd did not come up: {self.tail()}")
        root = busybox_rootfs(os.path.join(w, "rootfs"))
        self.docker("load", "-i", docker_archive(root, os.path.join(w, "image.tar"), IMAGE, ["/bin/sh"]))

    def docker(self, *args, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", f"--host=unix://{self.socket}", *args], capture_output=True, text=True,
                              check=check, timeout=60)

    def name(self, what: str) -> str:
        name = f"vajra-{what}-{uuid.uuid4().hex[:8]}"
        self.containers.append(name)
        return name

    def inspect(self, name: str) -> dict:
        return json.loads(self.docker("inspect", name).stdout)[0]

    def tail(self) -> str:
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-15:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for name in self.containers:
                self.docker("rm", "-f", name, check=False)
            self.docker("rmi", "-f", IMAGE, check=False)
            os.killpg(self.process.pid, signal.SIGTERM)     # dockerd stops its containerd
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in pids_whose_cmdline(lambda cmdline: self.workdir.encode() in cmdline):  # a containerd or shim left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(self.workdir + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        if not self.had_docker_cgroup:
            with open("/proc/self/mountinfo") as f:
                roots = [line.split()[4] for line in f if line.split(" - ")[1].split()[0] in ("cgroup", "cgroup2")]
            for root in roots:
                remove_empty_dirs(os.path.join(root, "docker"))
        if self.made_run_dir:            # only the empty directories the shims left
            remove_empty_dirs(SHIM_RUN_DIR)
        if not self.had_trust_key:
            try:
                os.unlink(TRUST_KEY)
            except FileNotFoundError:
                pass


@pytest.fixture(scope="module")
def dockerd():
    yield from private_runtime(_installed, Dockerd, "vajra-dockerd-")


@pytest.fixture
def daemon(daemon_factory, dockerd):
    d = daemon_factory(f"--docker_socket={dockerd.socket}", "--podman_socket=", "--containerd_socket=",
                       "--crio_socket=")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = d.call("status")["collectors"]["containers"]
        if stats["runtimes"]["docker"]["connected"]:
            return d
        time.sleep(0.1)
    raise AssertionError(f"never connected to dockerd: {stats}")


def test_short_lived_docker_container_exec_row(daemon, dockerd):
    """`docker run --network none … /bin/true`: its exec row names the
    container as `docker inspect` does; its cgroup is Docker's cgroupfs one."""
    name = dockerd.name("true")
    dockerd.docker("run", "--network", "none", "--name", name, "--label", "tier=batch", IMAGE, "/bin/true")
    info = dockerd.inspect(name)
    cid = info["Id"]
    rows = daemon.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                              and e["cmdline"] == "/bin/true", timeout=20)
    assert rows, (daemon.call("status")["collectors"]["containers"], dockerd.tail())
    row = rows[0]
    assert (row["container_id"], row["container_name"], row["container_image"], row["container_runtime"]) == \
        (cid, info["Name"].lstrip("/"), info["Config"]["Image"], "docker")
    assert row["path"] == "/bin/busybox" and (row["pod_name"], row["pod_uid"]) == ("", "")
    assert row["pid_namespace"] != os.stat("/proc/self/ns/pid").st_ino
    assert row["net_namespace"] != os.stat("/proc/self/ns/net").st_ino          # --network none: its own

    live = [r for r in daemon.call("table/read", {"table": "containers"})["rows"] if r["id"] == cid]
    assert live and live[0]["cgroup_path"] == f"/docker/{cid}"
    assert live[0]["image_id"] == info["Image"] and json.loads(live[0]["labels"])["tier"] == "batch"
    events = daemon.wait_events(lambda e: e["container_id"] == cid and e["action"] == "die",
                                table="container_events", timeout=20)
    assert events and events[0]["exit_code"] == 0 and events[0]["container_name"] == info["Name"].lstrip("/")


def test_removed_at_once_container_is_named_from_the_events(daemon, dockerd):
    """`docker run --rm`: the container is gone before anyone could inspect
    it; its exec row still has its name and image (from the event stream),
    and its delete event comes."""
    name = dockerd.name("rm")
    cid = dockerd.docker("run", "--rm", "--network", "none", "--name", name, "--cidfile",
                         os.path.join(dockerd.workdir, f"{name}.cid"), IMAGE, "/bin/true").stdout.strip() or \
        open(os.path.join(dockerd.workdir, f"{name}.cid")).read().strip()
    assert dockerd.docker("inspect", name, check=False).returncode != 0          # gone
    rows = daemon.wait_events(lambda e: e["syscall"] == "exec" and e["container_id"] == cid
                              and e["cmdline"] == "/bin/true", timeout=20)
    assert rows and (rows[0]["container_name"], rows[0]["container_image"], rows[0]["container_runtime"]) == \
        (name, IMAGE, "docker")
    deleted = daemon.wait_events(lambda e: e["container_id"] == cid and e["action"] == "delete",
                                 table="container_events", timeout=20)
    assert deleted and deleted[0]["container_name"] == name


def test_host_firewall_untouched(dockerd):
    """dockerd ran (and still runs) without changing the host's iptables rules."""
    assert dockerd.process.poll() is None
    assert _iptables() == dockerd.firewall

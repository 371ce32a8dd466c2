"""Containers benchmark: short-lived containers each running /bin/true,
started at a fixed rate against a real vajrad, through one of the runtimes
the tests run for real: podman (runc, cgroupfs; its API service),
Docker (the tests' private dockerd) or containerd through CRI (the tests'
private containerd; one pod, kubelet's labels and cgroupfs layout, containers
created and started through the CRI API by a few threads). Reports how many
exec rows were resolved to their container id, how many got name and image,
the delay of the late fill, and vajrad's CPU against the same window with
/bin/true run on the host at the same rate, and idle.

`python -m bench containers --container-rate 20 --container-duration 30
[--container-runtime podman|docker|containerd]`. A container start costs the
runtime (podman, conmon, runc; dockerd; containerd and its shim) far more CPU
than vajrad spends on it: on a small machine the achieved rate is below the
asked one, and is reported.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from exec_bench import cpu_seconds, exec_at_rate  # noqa: E402  (also puts tests/ on sys.path)
from harness import Daemon  # noqa: E402

import test_containerd as tcd  # noqa: E402  (the tests' private containerd)
import test_containers as tc  # noqa: E402  (the tests' image, API service and cleanup)
import test_docker as td  # noqa: E402  (the tests' private dockerd)

MAX_IN_FLIGHT = 32


def _window(d: Daemon, seconds: float, load) -> tuple[float, object]:
    pid = d.proc.pid
    c0, t0 = cpu_seconds(pid), time.monotonic()
    out = load()
    took = max(time.monotonic() - t0, seconds)
    return round(100 * (cpu_seconds(pid) - c0) / took, 2), out


class Podman:
    image = tc.IMAGE

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.rt = tc.Runtime(workdir)

    def prepare(self) -> str | None:
        why = tc._installed()
        if why:
            return why
        self.rt.build_image()
        self.rt.start_service()
        return None

    def flags(self) -> list[str]:
        return [f"--podman_socket={self.rt.socket}", "--docker_socket=", "--containerd_socket=", "--crio_socket="]

    def wait_connected(self, d: Daemon) -> None:
        tc.wait_connected(d)

    def launch(self, name: str):
        """Starts the container; a handle for done(), ok() and cid()."""
        return _Run([*tc.PODMAN, "run", "--rm", "--cidfile", self._cidfile(name), "--name", name, *tc.LIMITS,
                     tc.IMAGE, "/bin/true", name], self.workdir, name)

    def _cidfile(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.cid")

    def cleanup(self) -> None:
        left = subprocess.run([*tc.PODMAN, "ps", "-a", "-q", "--filter", "name=vbench-"], capture_output=True,
                              text=True).stdout.split()
        if left:
            subprocess.run([*tc.PODMAN, "rm", "-f", "-t", "0", *left], capture_output=True)
        self.rt.cleanup()


class Docker(Podman):
    image = td.IMAGE

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.rt = None

    def prepare(self) -> str | None:
        why = td._installed()
        if why:
            return why
        self.rt = td.Dockerd(self.workdir)
        self.rt.start()
        return None

    def flags(self) -> list[str]:
        return [f"--docker_socket={self.rt.socket}", "--podman_socket=", "--containerd_socket=", "--crio_socket="]

    def wait_connected(self, d: Daemon) -> None:
        _wait_runtime(d, "docker")

    def launch(self, name: str):
        return _Run(["docker", f"--host=unix://{self.rt.socket}", "run", "--rm", "--network", "none", "--cidfile",
                     self._cidfile(name), "--name", name, td.IMAGE, "/bin/true", name], self.workdir, name)

    def cleanup(self) -> None:
        if self.rt is not None:
            self.rt.cleanup()


class Containerd(Podman):
    """One pod; each container created and started through CRI by a pool of
    threads (CRI has no `run`), removed with the pod at the end."""
    image = tcd.IMAGE

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.rt = None
        self.pool = ThreadPoolExecutor(8)

    def prepare(self) -> str | None:
        why = tcd._installed()
        if why:
            return why
        self.rt = tcd.Containerd(self.workdir)
        self.rt.start()
        self.pod = self.rt.pod("vbench")
        return None

    def flags(self) -> list[str]:
        return [f"--containerd_socket={self.rt.socket}", "--podman_socket=", "--docker_socket=", "--crio_socket="]

    def wait_connected(self, d: Daemon) -> None:
        tcd.wait_connected(d)

    def launch(self, name: str):
        return _Future(self.pool.submit(self.rt.run, self.pod, name, ["/bin/true", name]))

    def cleanup(self) -> None:
        self.pool.shutdown(wait=True)
        if self.rt is not None:
            self.rt.cleanup()


class _Run:
    def __init__(self, argv: list[str], workdir: str, name: str):
        self.err = os.path.join(workdir, f"{name}.err")
        self.cidfile = os.path.join(workdir, f"{name}.cid")
        with open(self.err, "w") as errors:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def wait(self) -> None:
        self.proc.wait(120)

    def ok(self) -> bool:
        return self.proc.returncode == 0        # podman may fail under load after writing the cidfile

    def error(self) -> str:
        with open(self.err) as f:
            return f.read()[-200:]

    def cid(self) -> str | None:
        try:
            with open(self.cidfile) as f:
                return f.read().strip()
        except OSError:
            return None


class _Future:
    def __init__(self, future):
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        self.future.exception(120)

    def ok(self) -> bool:
        return self.future.exception() is None

    def error(self) -> str:
        return repr(self.future.exception())[-200:]

    def cid(self) -> str | None:
        return self.future.result() if self.ok() else None


def _wait_runtime(d: Daemon, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.call("status")["collectors"]["containers"]["runtimes"][name]["connected"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"never connected to {name}")


def run_containers(driver, rate: int, seconds: float, tag: str) -> tuple[list[tuple[str, object]], float, list]:
    """Starts a container running `/bin/true TAG-i` at `rate`/s, at most
    MAX_IN_FLIGHT starting at once; returns (name, handle) of each that
    started, the rate achieved, and samples of the failures."""
    running, launched = [], []
    total = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(total):
        due = t0 + i / rate
        while True:
            running = [r for r in running if not r.done()]
            delay = due - time.monotonic()
            if len(running) < MAX_IN_FLIGHT and delay <= 0:
                break
            time.sleep(min(max(delay, 0.005), 0.05))
        name = f"vbench-{tag}-{i}"
        handle = driver.launch(name)
        running.append(handle)
        launched.append((name, handle))
    for handle in running:
        handle.wait()
    achieved = total / (time.monotonic() - t0)
    ok = [(n, h) for n, h in launched if h.ok()]
    failed = [h.error() for _, h in launched if not h.ok()]
    return ok, achieved, failed


DRIVERS = {"podman": Podman, "docker": Docker, "containerd": Containerd}


def run(args) -> dict:
    rate, seconds = args.container_rate, args.container_duration
    runtime = getattr(args, "container_runtime", "podman")
    workdir = tempfile.mkdtemp(prefix="vajra-bench-containers-")
    os.chmod(workdir, 0o755)
    driver = DRIVERS[runtime](workdir)
    d = None
    try:
        why = driver.prepare()
        if why:
            return {"skipped": why}
        # Each container makes tens of process rows (the runtime's own): keep them all for the count.
        d = Daemon(workdir, *driver.flags(), "--events_max=0").start()
        driver.wait_connected(d)
        tag = uuid.uuid4().hex[:6]
        idle_cpu, _ = _window(d, seconds, lambda: time.sleep(seconds))
        host_cpu, _ = _window(d, seconds, lambda: exec_at_rate(rate, seconds, f"vbench-host-{tag}"))
        load_cpu, (started, achieved, failed) = _window(d, seconds,
                                                        lambda: run_containers(driver, rate, seconds, tag))
        expected = {name: handle.cid() for name, handle in started if handle.cid()}
        # Every exec row of our /bin/true, once the daemon has stored them all.
        rows: dict[str, dict] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(rows) < len(expected):
            with d.client() as c:
                for e in c.iter_events({"start_time": 0}, "bpf_process_events"):
                    if e["syscall"] == "exec" and e["cmdline"].startswith(f"/bin/true vbench-{tag}-"):
                        rows[e["cmdline"].split(" ", 1)[1]] = e
            time.sleep(0.5)
        resolved = sum(1 for n, r in rows.items() if r["container_id"] == expected.get(n))
        filled = sum(1 for n, r in rows.items() if r["container_name"] == n and r["container_image"] == driver.image)
        status = d.call("status")["collectors"]["containers"]
        process = d.call("status")["collectors"]["process"]
        return {
            "runtime": runtime, "asked_rate": rate, "achieved_rate": round(achieved, 1), "seconds": seconds,
            "containers_run": len(expected), "runtime_failures": len(failed),
            "runtime_failure_sample": failed[:2], "exec_rows": len(rows),
            "resolved_pct": round(100 * resolved / max(len(rows), 1), 2),
            "name_image_filled_pct": round(100 * filled / max(len(rows), 1), 2),
            "rows_filled_late": status["rows_filled_late"], "fill_timeouts": status["fill_timeouts"],
            "fill_p99_ms": status["fill_p99_ms"], "metadata_lag_p99_ms": status["metadata_lag_p99_ms"],
            "unresolved_cgroups": status["unresolved_cgroups"],
            "runtime_api": status["runtimes"].get(runtime),
            "process_rows": process["captured"], "kernel_lost": process["kernel_lost"],
            "vajrad_cpu_pct": {"idle": idle_cpu, "host_true_same_rate": host_cpu, "containers": load_cpu},
        }
    finally:
        if d is not None:
            d.stop()
        driver.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

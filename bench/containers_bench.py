"""Containers benchmark: short-lived containers (podman, runc, cgroupfs) each
running /bin/true, started at a fixed rate against a real vajrad with
podman's API service; reports how many exec rows were resolved to their
container id, how many got name and image, the delay of the late fill, and
vajrad's CPU against the same window with /bin/true run on the host at the
same rate, and idle.

`python -m bench containers --container-rate 20 --container-duration 30`.
A container start costs podman, conmon and runc far more CPU than vajrad
spends on it: on a small machine the achieved rate is below the asked one,
and is reported.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid

from exec_bench import cpu_seconds, exec_at_rate  # noqa: E402  (also puts tests/ on sys.path)
from harness import Daemon  # noqa: E402

import test_containers as tc  # noqa: E402  (the tests' image, API service and cleanup)

MAX_IN_FLIGHT = 32


def _window(d: Daemon, seconds: float, load) -> tuple[float, object]:
    pid = d.proc.pid
    c0, t0 = cpu_seconds(pid), time.monotonic()
    out = load()
    took = max(time.monotonic() - t0, seconds)
    return round(100 * (cpu_seconds(pid) - c0) / took, 2), out


def run_containers(rt: tc.Runtime, rate: int, seconds: float, tag: str) -> tuple[list[tuple[str, str]], float]:
    """Starts `podman run --rm IMAGE /bin/true TAG-i` at `rate`/s, at most
    MAX_IN_FLIGHT at once; returns (name, cidfile) of each and the rate achieved."""
    started, running, procs = [], [], []
    total = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(total):
        due = t0 + i / rate
        while True:
            running = [p for p in running if p.poll() is None]
            delay = due - time.monotonic()
            if len(running) < MAX_IN_FLIGHT and delay <= 0:
                break
            time.sleep(min(max(delay, 0.005), 0.05))
        name = f"vbench-{tag}-{i}"
        cidfile = os.path.join(rt.workdir, f"{name}.cid")
        errors = open(os.path.join(rt.workdir, f"{name}.err"), "w")
        running.append(subprocess.Popen([*tc.PODMAN, "run", "--rm", "--cidfile", cidfile, "--name", name,
                                         *tc.LIMITS, tc.IMAGE, "/bin/true", name],
                                        stdout=subprocess.DEVNULL, stderr=errors))
        errors.close()
        procs.append(running[-1])
        started.append((name, cidfile))
    for p in running:
        p.wait(120)
    achieved = total / (time.monotonic() - t0)
    # Only containers whose run succeeded (podman may fail under load after writing the cidfile).
    ok = [s for s, p in zip(started, procs) if p.returncode == 0]
    failed = [open(os.path.join(rt.workdir, f"{n}.err")).read()[-200:] for (n, _), p in zip(started, procs)
              if p.returncode != 0]
    return ok, achieved, failed


def run(args) -> dict:
    why = tc._installed()
    if why:
        return {"skipped": why}
    rate, seconds = args.container_rate, args.container_duration
    workdir = tempfile.mkdtemp(prefix="vajra-bench-containers-")
    os.chmod(workdir, 0o755)
    rt = tc.Runtime(workdir)
    d = None
    try:
        rt.build_image()
        rt.start_service()
        # Each podman run makes ~100 process rows: keep them all for the count.
        d = Daemon(workdir, f"--podman_socket={rt.socket}", "--docker_socket=", "--events_max=0").start()
        tc.wait_connected(d)
        tag = uuid.uuid4().hex[:6]
        idle_cpu, _ = _window(d, seconds, lambda: time.sleep(seconds))
        host_cpu, _ = _window(d, seconds, lambda: exec_at_rate(rate, seconds, f"vbench-host-{tag}"))
        load_cpu, (started, achieved, failed) = _window(d, seconds, lambda: run_containers(rt, rate, seconds, tag))
        expected = {}
        for name, cidfile in started:
            try:
                expected[name] = open(cidfile).read().strip()
            except OSError:
                pass                        # podman failed to start it
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
        filled = sum(1 for n, r in rows.items() if r["container_name"] == n and r["container_image"] == tc.IMAGE)
        status = d.call("status")["collectors"]["containers"]
        process = d.call("status")["collectors"]["process"]
        return {
            "asked_rate": rate, "achieved_rate": round(achieved, 1), "seconds": seconds,
            "containers_run": len(expected), "podman_failures": len(failed),
            "podman_failure_sample": failed[:2], "exec_rows": len(rows),
            "resolved_pct": round(100 * resolved / max(len(rows), 1), 2),
            "name_image_filled_pct": round(100 * filled / max(len(rows), 1), 2),
            "rows_filled_late": status["rows_filled_late"], "fill_timeouts": status["fill_timeouts"],
            "fill_p99_ms": status["fill_p99_ms"], "metadata_lag_p99_ms": status["metadata_lag_p99_ms"], "unresolved_cgroups": status["unresolved_cgroups"],
            "process_rows": process["captured"], "kernel_lost": process["kernel_lost"],
            "vajrad_cpu_pct": {"idle": idle_cpu, "host_true_same_rate": host_cpu, "containers": load_cpu},
        }
    finally:
        if d is not None:
            d.stop()
        left = subprocess.run([*tc.PODMAN, "ps", "-a", "-q", "--filter", "name=vbench-"], capture_output=True,
                              text=True).stdout.split()
        if left:
            subprocess.run([*tc.PODMAN, "rm", "-f", "-t", "0", *left], capture_output=True)
        rt.cleanup()
        subprocess.run(["rm", "-rf", workdir])

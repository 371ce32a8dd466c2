"""Exec benchmark, after Sysmon for Linux's perftest: exec /bin/true at a
fixed rate for a fixed time against a real vajrad, and report loss, vajrad's
CPU and memory, exec-to-visible latency through event/list, and time to READY.

Two phases in one run: the load window, where nothing but the load touches
the daemon (CPU, RSS and loss are measured there), then a shorter latency
window at the same rate with a client polling event/list every 10 ms.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from harness import Daemon  # noqa: E402  (the tests' real-daemon launcher)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK      # utime + stime


def memory_kib(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def exec_at_rate(rate: int, seconds: float, tag: str, on_spawn=None) -> int:
    """posix_spawn /bin/true `tag-N` on a fixed schedule; returns how many ran."""
    total = int(rate * seconds)
    t0 = time.monotonic()
    children = 0
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        os.posix_spawn("/bin/true", ["/bin/true", f"{tag}-{i}"], os.environ)
        if on_spawn:
            on_spawn(i)
        children += 1
        while children:                 # reap without blocking
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children -= 1
    while children:
        os.wait()
        children -= 1
    return total


def count_tagged(d: Daemon, tag: str, since: int) -> int:
    with d.client() as c:
        return sum(1 for e in c.iter_events({"start_time": since}, "bpf_process_events")
                   if e["syscall"] == "exec" and e["cmdline"].startswith(f"/bin/true {tag}-"))


def wait_drained(d: Daemon, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if d.call("status")["store"]["pending"] == 0:
            time.sleep(0.3)
            return


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def latency_window(d: Daemon, rate: int, seconds: float, tag: str) -> dict:
    spawned: dict[int, float] = {}
    seen: dict[int, float] = {}
    stop = threading.Event()
    since = int(time.time()) - 1

    def poll():
        with d.client() as c:
            cursor = None
            while not stop.is_set():
                page = c.list_events({"start_time": since}, "bpf_process_events", 1000, cursor)
                now = time.monotonic()
                cursor = page["cursor"]
                for e in page["events"]:
                    cmd = e["cmdline"]
                    if e["syscall"] == "exec" and cmd.startswith(f"/bin/true {tag}-"):
                        seen.setdefault(int(cmd.rsplit("-", 1)[1]), now)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    exec_at_rate(rate, seconds, tag, on_spawn=lambda i: spawned.__setitem__(i, time.monotonic()))
    time.sleep(1.0)
    stop.set()
    poller.join()
    lat = [(seen[i] - spawned[i]) * 1000 for i in spawned if i in seen]
    return {"samples": len(lat), "unseen": len(spawned) - len(lat),
            "p50_ms": round(percentile(lat, 50), 1) if lat else None,
            "p99_ms": round(percentile(lat, 99), 1) if lat else None}


def run(args) -> dict:
    work = tempfile.mkdtemp(prefix="vajra-bench-")
    d = Daemon(work, f"--bpf_output={args.bpf_output}", "--events_max=0", "--events_expiry=0")
    d.start(timeout=60)
    try:
        pid = d.proc.pid
        time.sleep(1.0)                  # let start-up settle
        tag = f"vb{os.getpid()}"
        since = int(time.time()) - 1
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        execs = exec_at_rate(args.rate, args.duration, tag)
        wall = time.monotonic() - t0
        wait_drained(d)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        mem = memory_kib(pid)
        captured = count_tagged(d, tag, since)
        status = d.call("status")
        latency = latency_window(d, args.rate, args.latency_seconds, tag + "l")
        return {
            "bench": "exec",
            "rate_per_s": args.rate,
            "duration_s": args.duration,
            "bpf_output": status["collectors"]["process"]["output"],
            "execs": execs,
            "achieved_rate_per_s": round(execs / wall, 1),
            "events_captured": captured,
            "events_lost": execs - captured,
            "daemon_lost_counters": {k: v for k, v in status["events"].items() if k.startswith("lost")},
            # CPU over the load window plus the drain after it, as % of one core.
            "vajrad_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
            "vajrad_cpu_seconds": round(cpu1 - cpu0, 3),
            "vajrad_rss_kib": mem.get("VmRSS"),
            "vajrad_peak_rss_kib": mem.get("VmHWM"),
            "latency_exec_to_event_list": latency,
            "time_to_ready_s": round(d.ready_after, 3),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
        }
    finally:
        d.stop()



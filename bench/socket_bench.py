"""Socket benchmark: TCP connect/accept/close cycles on loopback at a fixed
rate against a real vajrad (every cycle's rows counted in the store, loss and
vajrad's CPU reported), then close() of regular files with and without the
daemon: the in-kernel filter must keep them from userspace entirely.
"""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exec_bench import Daemon, cpu_seconds, memory_kib, wait_drained

LINGER_RESET = struct.pack("ii", 1, 0)    # close with RST: no TIME_WAIT to exhaust ports


def cycles_at_rate(rate: int, seconds: float) -> None:
    """Runs in its own process (the bench re-executes this file): one TCP
    connect, accept and two closes per cycle; prints the cycle count."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)
    addr = srv.getsockname()
    total = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(total):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        cli = socket.socket()
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        cli.connect(addr)
        conn, _ = srv.accept()
        cli.close()
        conn.close()
    srv.close()
    print(total, round(time.monotonic() - t0, 3), flush=True)


CLOSE_LOOP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[2]);
    for (long i = 0; i < n; i++) {
        int fd = open(argv[1], O_RDONLY);
        if (fd < 0) { perror("open"); return 1; }
        close(fd);
    }
    return 0;
}
"""


def close_workloads(work: str) -> dict[str, list[str]]:
    """argv of programs that open and close a regular file N times: in C when
    a compiler is at hand (the strictest measure: nothing around the two
    syscalls), and in Python."""
    target = os.path.join(work, "plain-file")
    Path(target).write_text("x")
    loop = "import os,sys\nfor _ in range(int(sys.argv[2])): os.close(os.open(sys.argv[1], os.O_RDONLY))"
    found = {"python": [sys.executable, "-c", loop, target]}
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        src, exe = os.path.join(work, "closes.c"), os.path.join(work, "closes")
        Path(src).write_text(CLOSE_LOOP_C)
        subprocess.run([cc, "-O2", "-o", exe, src], check=True)
        found["c"] = [exe, target]
    return found


def timed(argv: list[str], count: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([*argv, str(count)], check=True)
    return time.perf_counter() - t0


def close_runs(workloads: dict[str, list[str]], count: int, rounds: int) -> dict:
    """Median seconds per workload; the workloads take turns, so that a slow
    moment of the machine does not land on one of them only."""
    times: dict[str, list[float]] = {k: [] for k in workloads}
    for _ in range(rounds):
        for kind, argv in workloads.items():
            times[kind].append(timed(argv, count))
    return {k: {"median_s": round(statistics.median(v), 4), "runs_s": [round(t, 4) for t in v]}
            for k, v in times.items()}


def rows_by_syscall(db: str, pid: int) -> dict:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT syscall, count(*) FROM bpf_socket_events WHERE pid = ? GROUP BY syscall",
                                (pid,)).fetchall())
    finally:
        con.close()


def run(args) -> dict:
    work = tempfile.mkdtemp(prefix="vajra-bench-")
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: str) -> dict:
    os.chmod(work, 0o755)
    workloads = close_workloads(work)
    count, rounds = args.closes, 5
    close_runs(workloads, count // 10, 1)             # warm the page cache and the binaries
    baseline = close_runs(workloads, count, rounds)
    # The same with only the process collector: what syscall tracepoints cost
    # every syscall once any is attached, before the close() hook runs at all.
    d = Daemon(work, "--enable_socket_events=false").start()
    try:
        process_only = close_runs(workloads, count, rounds)
    finally:
        d.stop()

    d = Daemon(work, f"--bpf_output={args.bpf_output}", "--events_max=0", "--events_expiry=0").start()
    try:
        pid = d.proc.pid
        wait_drained(d)
        # --- connect/accept/close cycles
        before = d.call("status")
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        gen = subprocess.Popen([sys.executable, __file__, "cycles", str(args.socket_rate),
                                str(args.socket_duration)], stdout=subprocess.PIPE, text=True)
        out, _ = gen.communicate()
        wall = time.monotonic() - t0
        if gen.returncode != 0:
            raise RuntimeError(f"the cycle generator exited with {gen.returncode}")
        cycles, gen_seconds = int(out.split()[0]), float(out.split()[1])
        wait_drained(d)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        after = d.call("status")
        counts = rows_by_syscall(d.database, gen.pid)
        expected = {"bind": 1, "listen": 1, "connect": cycles, "accept4": cycles, "close": 2 * cycles + 1}
        missing = sum(max(0, n - counts.get(k, 0)) for k, n in expected.items())
        ev0, ev1 = before["events"], after["events"]
        cycles_result = {
            "target_cycles_per_s": args.socket_rate, "seconds": args.socket_duration,
            "cycles": cycles, "achieved_cycles_per_s": round(cycles / gen_seconds, 1),
            "rows_expected": sum(expected.values()), "rows_stored": sum(counts.values()),
            "rows_missing": missing, "rows_by_syscall": counts,
            "lost_kernel": ev1["lost_kernel"] - ev0["lost_kernel"],
            "lost_collector": ev1["lost_collector"] - ev0["lost_collector"],
            "lost_store": ev1["lost_store"] - ev0["lost_store"],
            "vajrad_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2),
            "vajrad_cpu_seconds": round(cpu1 - cpu0, 2), "window_s": round(t1 - t0, 1),
            "generator_wall_s": round(wall, 1), "vajrad_memory_kib": memory_kib(pid),
        }
        # --- close() of regular files, daemon running
        s0 = d.call("status")["collectors"]["socket"]
        with_daemon = close_runs(workloads, count, rounds)
        s1 = d.call("status")["collectors"]["socket"]
    finally:
        d.stop()

    def slowdown(runs: dict, kind: str) -> float:
        return round(100 * (runs[kind]["median_s"] / baseline[kind]["median_s"] - 1), 2)

    return {
        "connect_accept_close": cycles_result,
        "regular_file_closes": {
            "workload": "open()+close() of one regular file, as a C loop and as a Python loop",
            "closes_per_run": count, "runs": rounds,
            "without_daemon": baseline, "process_collector_only": process_only, "with_daemon": with_daemon,
            "slowdown_percent": {k: slowdown(with_daemon, k) for k in workloads},
            "slowdown_percent_process_collector_only": {k: slowdown(process_only, k) for k in workloads},
            # the two status calls around the runs are themselves socket activity
            "socket_records_during_runs": s1["records"] - s0["records"],
            "socket_wakeups_during_runs": (s1["wakeups"] - s0["wakeups"]) if s0["wakeups"] is not None else None,
        },
        "kernel": os.uname().release,
    }


if __name__ == "__main__" and sys.argv[1:2] == ["cycles"]:
    cycles_at_rate(int(sys.argv[2]), float(sys.argv[3]))

"""`make bench compare`: vajrad against auditd, and both against no monitor,
in one run, interleaved.

Four monitors take turns, round after round (A B C D, A B C D, ...), so that
a noisy moment of a shared machine lands on all of them alike:

- `vajrad`: every collector, watching the FIM workload's directory;
- `auditd_execve`: auditd with an execve rule only (what most deployments run);
- `auditd_coverage`: auditd with what vajrad covers: execve, the socket calls
  (connect, bind, listen, accept, accept4) and `-w DIR -p wa` on the watched
  directory;
- `none`: no monitor.

Under each monitor the three workloads of the other benches run: exec (chains
of sh, sh, /bin/true at --rate execs/s, as `bench exec`), socket (TCP
connect/accept/close cycles at --socket-rate, as `bench socket`) and fim (the
mixed shell workload and unwatched opens of `bench fim`). For each, it
records the monitor's CPU and kauditd's (percent of one core over the
workload and the drain after it), what the monitor lost (vajrad's lost
counters; the kernel's audit `lost` counter), and the workload's own CPU time
(its processes' user + system time: the exec and socket workloads run at a
fixed rate, so their wall time does not move, but what a monitor adds to each
syscall shows in their system time) and wall time. Slowdowns are paired: each
round's run against the same round's `none` run; medians and [min, max] over
the rounds.

The host is left as found: auditd runs from a private configuration (its log
in the bench's temporary directory), its rules carry one key and are deleted
by that key, the backlog limit (8192 while auditd runs, as Debian's audit.rules
sets it) goes back to what it was, the lost and backlog-wait counters are reset if
they were 0,
auditing is disabled again, and `-a never,task` is loaded (once
auditing has been on, the kernel keeps per-syscall audit bookkeeping on every
new process until a reboot or that rule). That rule is lifted while auditd
runs, since it would hide new processes from auditd's rules. If an audit
daemon is already registered with the kernel, the auditd monitors are skipped
rather than fight it.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import audit_state
import exec_bench
import fim_bench
import socket_bench
from audit_state import audit_rules, audit_status, auditctl, lift_never_task
from exec_bench import Daemon, cpu_seconds, wait_drained

AUDIT_KEY = "vajra-bench-compare"
MONITORS = ("vajrad", "auditd_execve", "auditd_coverage", "none")
WORKLOADS = ("exec", "socket", "fim")
AUDIT_BACKLOG = 8192


def restore_audit(before: dict[str, str]) -> None:
    audit_state.restore_audit(before, AUDIT_KEY)


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class AuditDaemon:
    """auditd in the foreground from a private configuration, with `rules`."""

    def __init__(self, work: str, rules: list[list[str]], host_before: dict[str, str]):
        self.rules, self.host_before = rules, host_before
        self.conf_dir = os.path.join(work, "audit-conf")
        self.log_dir = os.path.join(work, "audit-log")
        os.makedirs(self.conf_dir, mode=0o750, exist_ok=True)
        os.makedirs(self.log_dir, mode=0o750, exist_ok=True)
        conf = Path("/etc/audit/auditd.conf").read_text().splitlines() \
            if os.path.exists("/etc/audit/auditd.conf") else []
        conf = [line for line in conf if not line.strip().startswith(("log_file", "max_log_file_action"))]
        conf += [f"log_file = {self.log_dir}/audit.log", "max_log_file_action = ROTATE"]
        path = os.path.join(self.conf_dir, "auditd.conf")
        Path(path).write_text("\n".join(conf) + "\n")
        os.chmod(path, 0o640)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AuditDaemon":
        lift_never_task()
        self.proc = subprocess.Popen(["auditd", "-n", "-c", self.conf_dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while audit_status().get("pid") != str(self.proc.pid):
            if self.proc.poll() is not None:
                raise RuntimeError(f"auditd exited: {self.proc.stderr.read().strip()[-300:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("auditd did not register with the kernel")
            time.sleep(0.1)
        # What audit.rules sets on a real host (Debian's default is -b 8192);
        # the kernel's default of 64 would lose events and flatter auditd's CPU.
        auditctl("-b", str(AUDIT_BACKLOG))
        for rule in self.rules:
            auditctl(*rule, "-k", AUDIT_KEY)
        return self

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def lost(self) -> int:
        return int(audit_status().get("lost", 0))

    def drain(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while int(audit_status().get("backlog", 0)) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)             # auditd writes what kauditd handed it

    def stop(self) -> None:
        try:
            if self.proc and self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(30)
        finally:
            restore_audit(self.host_before)


class VajradMonitor:
    def __init__(self, work: str, watched: str):
        self.cfg = os.path.join(work, "vajra-compare.conf")
        Path(self.cfg).write_text(json.dumps({"file_paths": {"bench": [watched + "/%%"]}}))
        self.work = work
        self.d: Daemon | None = None

    def start(self) -> "VajradMonitor":
        self.d = Daemon(self.work, f"--config_path={self.cfg}", "--events_max=0", "--events_expiry=0")
        self.d.start(timeout=60)
        wait_drained(self.d)
        return self

    def cpu(self) -> float:
        return cpu_seconds(self.d.proc.pid)

    def lost(self) -> int:
        return self.d.call("status")["events"]["lost"]

    def drain(self) -> None:
        wait_drained(self.d)

    def stop(self) -> None:
        self.d.stop()


class NoMonitor:
    def start(self):
        return self

    def cpu(self) -> float:
        return 0.0

    def lost(self) -> int:
        return 0

    def drain(self) -> None:
        pass

    def stop(self) -> None:
        pass


def run_workload(name: str, args, fim: fim_bench.Workload, tag: str) -> dict:
    """Runs one workload; returns its wall and CPU seconds."""
    c0, t0 = children_cpu(), time.monotonic()
    if name == "exec":
        exec_bench.exec_at_rate(args.rate, args.compare_seconds, tag, depth=args.chain_depth)
    elif name == "socket":
        gen = subprocess.run([sys.executable, socket_bench.__file__, "cycles", str(args.socket_rate),
                              str(args.compare_seconds)], capture_output=True, text=True)
        if gen.returncode != 0:
            raise RuntimeError(f"the socket cycle generator failed: {gen.stderr.strip()[-300:]}")
    else:
        fim.run()
    return {"wall_s": time.monotonic() - t0, "cpu_s": children_cpu() - c0}


def spread(values: list[float], digits: int = 2) -> dict:
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def summarise(runs: list[dict], monitors: list[str]) -> dict:
    """runs: one dict per (round, monitor, workload). Per workload and monitor:
    medians and [min, max] over the rounds; slowdowns paired by round."""
    table: dict = {}
    for w in WORKLOADS:
        base = {r["round"]: r for r in runs if r["workload"] == w and r["monitor"] == "none"}
        table[w] = {}
        for m in monitors:
            mine = [r for r in runs if r["workload"] == w and r["monitor"] == m]
            if not mine:
                continue
            row = {"monitor_cpu_percent": spread([r["monitor_cpu_percent"] for r in mine]),
                   "kauditd_cpu_percent": spread([r["kauditd_cpu_percent"] for r in mine]),
                   "lost": {"total": sum(r["lost"] for r in mine), "max_per_run": max(r["lost"] for r in mine)},
                   "workload_cpu_s": spread([r["cpu_s"] for r in mine], 3),
                   "workload_wall_s": spread([r["wall_s"] for r in mine], 3)}
            paired = [r for r in mine if r["round"] in base]
            if m != "none" and paired:
                row["workload_cpu_slowdown_percent"] = spread(
                    [100 * (r["cpu_s"] / base[r["round"]]["cpu_s"] - 1) for r in paired], 1)
                row["workload_wall_slowdown_percent"] = spread(
                    [100 * (r["wall_s"] / base[r["round"]]["wall_s"] - 1) for r in paired], 1)
            table[w][m] = row
    return table


def run(args) -> dict:
    if not shutil.which("auditd"):
        problem = fim_bench.ensure_auditd()
    else:
        problem = None
    work = tempfile.mkdtemp(prefix="vajra-compare-")
    os.chmod(work, 0o755)
    fim = fim_bench.Workload(work, args.fim_iterations, args.fim_opens)
    monitors = list(MONITORS)
    skipped = {}
    if problem is None:
        found = audit_status()
        if found.get("pid", "0") != "0":
            problem = f"an audit daemon (pid {found['pid']}) is already registered with the kernel"
    if problem is not None:
        monitors = [m for m in monitors if not m.startswith("auditd")]
        skipped = {m: problem for m in MONITORS if m.startswith("auditd")}
    before = {"status": audit_status(), "rules": audit_rules()} if shutil.which("auditctl") else None
    host = before["status"] if before else {}

    coverage_rules = [
        ["-a", "always,exit", "-F", "arch=b64", "-S", "execve,execveat"],
        ["-a", "always,exit", "-F", "arch=b64", "-S", "connect,bind,listen,accept,accept4"],
        ["-w", fim.watched, "-p", "wa"],
    ]
    factories = {
        "vajrad": lambda: VajradMonitor(work, fim.watched),
        "auditd_execve": lambda: AuditDaemon(work, [["-a", "always,exit", "-F", "arch=b64", "-S", "execve"]], host),
        "auditd_coverage": lambda: AuditDaemon(work, coverage_rules, host),
        "none": NoMonitor,
    }
    fim.run()                                      # warm the caches and binaries
    runs: list[dict] = []
    try:
        for rnd in range(args.compare_rounds):
            for m in monitors:
                monitor = factories[m]().start()
                try:
                    for w in WORKLOADS:
                        kauditd = fim_bench.kauditd_pid()
                        k0 = cpu_seconds(kauditd) if kauditd else 0.0
                        lost0, cpu0, t0 = monitor.lost(), monitor.cpu(), time.monotonic()
                        result = run_workload(w, args, fim, f"cmp{os.getpid()}r{rnd}{m[:3]}{w[:1]}")
                        monitor.drain()
                        window = time.monotonic() - t0
                        k1 = cpu_seconds(kauditd) if kauditd else 0.0
                        runs.append(dict(result, round=rnd, monitor=m, workload=w,
                                         monitor_cpu_percent=100 * (monitor.cpu() - cpu0) / window,
                                         kauditd_cpu_percent=100 * (k1 - k0) / window,
                                         lost=monitor.lost() - lost0))
                        print(f"compare: round {rnd} {m:16} {w:6} wall {result['wall_s']:.2f}s "
                              f"cpu {result['cpu_s']:.2f}s monitor {runs[-1]['monitor_cpu_percent']:.2f}%",
                              file=sys.stderr)
                finally:
                    monitor.stop()
    finally:
        if shutil.which("auditctl") and problem is None:
            restore_audit(host)
        shutil.rmtree(work, ignore_errors=True)
    after = {"status": audit_status(), "rules": audit_rules()} if before else None
    return {
        "bench": "compare",
        "order": "interleaved: each round runs every monitor in turn, each monitor every workload",
        "rounds": args.compare_rounds,
        "workloads": {
            "exec": f"{args.rate} exec/s for {args.compare_seconds} s, chains of {args.chain_depth}",
            "socket": f"{args.socket_rate} TCP connect/accept/close cycles/s for {args.compare_seconds} s",
            "fim": f"{args.fim_iterations} iterations of exec, read, write and rename in the watched "
                   f"directory, then {args.fim_opens} opens of unwatched files ({fim.open_kind})",
        },
        "auditd_backlog_limit": AUDIT_BACKLOG,
        "auditd_rules": {"auditd_execve": "-a always,exit -F arch=b64 -S execve",
                         "auditd_coverage": "; ".join(" ".join(r) for r in coverage_rules)},
        "skipped": skipped,
        "table": summarise(runs, monitors),
        "host_audit_state": {"before": before, "after": after},
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
    }

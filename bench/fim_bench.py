"""File integrity benchmark: a mixed workload (exec, a read, a write and a
rename in a watched directory per iteration, then 1,000,000 opens of
unwatched files), timed without any monitor, with vajrad (watching the
directory), and with auditd carrying the equivalent rules (-w DIR -p wa, and
execve). Reports each slowdown, the ratio between them, the monitors' CPU,
and whether vajrad lost any event in the watched directory.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from audit_state import audit_status, auditctl, lift_never_task, restore_audit
from exec_bench import Daemon, cpu_seconds, memory_kib, wait_drained

SHELL_PART = r"""
W=$1; N=$2
for ((i = 0; i < N; i++)); do
    /bin/true
    cat "$W/read-me" > /dev/null
    echo "$i" > "$W/a"
    mv -f "$W/a" "$W/b$((i % 10))"
done
"""

OPEN_LOOP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[2]);
    char path[4096];
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof(path), "%s/f%ld", argv[1], i % 64);
        int fd = open(path, O_RDONLY);
        if (fd < 0) { perror("open"); return 1; }
        close(fd);
    }
    return 0;
}
"""
OPEN_LOOP_PY = ("import os,sys\nd=sys.argv[1]\nfor i in range(int(sys.argv[2])):\n"
                "    os.close(os.open(f'{d}/f{i % 64}', os.O_RDONLY))\n")
AUDIT_KEY = "vajra-bench"


class Workload:
    def __init__(self, work: str, iterations: int, opens: int):
        self.watched = os.path.join(work, "watched")
        self.unwatched = os.path.join(work, "unwatched")
        os.makedirs(self.watched)
        os.makedirs(self.unwatched)
        Path(self.watched, "read-me").write_text("data\n" * 100)
        for i in range(64):
            Path(self.unwatched, f"f{i}").write_text("x")
        self.iterations, self.opens = iterations, opens
        self.script = os.path.join(work, "mixed.sh")
        Path(self.script).write_text(SHELL_PART)
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc:
            src, exe = os.path.join(work, "opens.c"), os.path.join(work, "opens")
            Path(src).write_text(OPEN_LOOP_C)
            subprocess.run([cc, "-O2", "-o", exe, src], check=True)
            self.open_argv, self.open_kind = [exe], "C loop"
        else:
            self.open_argv, self.open_kind = [sys.executable, "-c", OPEN_LOOP_PY], "Python loop"

    def run(self) -> dict:
        """Seconds of each part; the shell part's pid is kept to count its rows."""
        t0 = time.perf_counter()
        shell = subprocess.Popen(["bash", self.script, self.watched, str(self.iterations)])
        if shell.wait() != 0:
            raise RuntimeError("the mixed shell workload failed")
        t1 = time.perf_counter()
        subprocess.run([*self.open_argv, self.unwatched, str(self.opens)], check=True)
        t2 = time.perf_counter()
        self.shell_pid = shell.pid
        return {"shell_s": t1 - t0, "opens_s": t2 - t1, "total_s": t2 - t0}


def medians(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}


def slowdown(with_monitor: dict, without: dict) -> dict:
    return {k: round(100 * (with_monitor[k] / without[k] - 1), 2) for k in without}


def watched_rows(db: str, watched: str, shell_pid: int) -> dict:
    """Rows of the last run: the shell's writes of a, and the renames of a."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        writes = con.execute("SELECT count(*) FROM bpf_file_events WHERE pid = ? AND file_path = ? "
                             "AND syscall LIKE 'open%' AND exit_code NOT LIKE '-%'",
                             (shell_pid, watched + "/a")).fetchone()[0]
        renames = con.execute("SELECT count(*) FROM bpf_file_events WHERE parent = ? AND file_path = ? "
                              "AND syscall LIKE 'rename%' AND exit_code = '0'",
                              (shell_pid, watched + "/a")).fetchone()[0]
        moved_to = con.execute("SELECT count(*) FROM file_events WHERE action = 'MOVED_TO' "
                               "AND target_path LIKE ? AND pid IS NOT NULL", (watched + "/b%",)).fetchone()[0]
        return {"writes": writes, "renames": renames, "file_events_moved_to_attributed": moved_to}
    finally:
        con.close()


def kauditd_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "kauditd":
                    return int(entry.name)
            except OSError:
                continue
    return None


class Auditd:
    """auditd in the foreground with the equivalent rules; removed afterwards,
    and the kernel's audit state put back (bench/audit.py)."""

    def __init__(self, watched: str):
        self.watched = watched
        self.before: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Auditd":
        self.before = audit_status()
        auditctl("-D", "-k", AUDIT_KEY, check=False)
        lift_never_task()
        self.proc = subprocess.Popen(["auditd", "-n"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while f"pid {self.proc.pid}" not in subprocess.run(["auditctl", "-s"], capture_output=True,
                                                          text=True).stdout:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("auditd did not register with the kernel")
            time.sleep(0.1)
        for rule in (["-w", self.watched, "-p", "wa", "-k", AUDIT_KEY],
                     ["-a", "always,exit", "-F", "arch=b64", "-S", "execve", "-k", AUDIT_KEY]):
            subprocess.run(["auditctl", *rule], check=True, capture_output=True)
        return self

    def cpu(self) -> float:
        k = kauditd_pid()
        return cpu_seconds(self.proc.pid) + (cpu_seconds(k) if k else 0.0)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        # the host as it was: our rules gone, auditing off, never,task loaded
        restore_audit(self.before, AUDIT_KEY)


def ensure_auditd() -> str | None:
    """auditd is a bench-only tool: installed here when missing."""
    if shutil.which("auditd") and shutil.which("auditctl"):
        return None
    r = subprocess.run(["apt-get", "install", "-y", "-q", "auditd"], capture_output=True, text=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return None if r.returncode == 0 else f"auditd could not be installed: {r.stderr.strip()[-300:]}"


def measured(load: Workload, rounds: int, cpu_of) -> tuple[dict, list[dict], float]:
    c0, t0 = cpu_of(), time.monotonic()
    runs = [load.run() for _ in range(rounds)]
    return medians(runs), runs, round(100 * (cpu_of() - c0) / (time.monotonic() - t0), 2)


def run(args) -> dict:
    work = tempfile.mkdtemp(prefix="vajra-fim-bench-")
    os.chmod(work, 0o755)
    load = Workload(work, args.fim_iterations, args.fim_opens)
    rounds = args.fim_rounds
    load.run()                                              # warm the caches and binaries
    baseline, _, _ = measured(load, rounds, lambda: 0.0)

    cfg = Path(work, "vajra.conf")
    cfg.write_text(json.dumps({"file_paths": {"bench": [load.watched + "/%%"]}}))
    d = Daemon(work, f"--config_path={cfg}", "--events_max=0", "--events_expiry=0").start()
    try:
        wait_drained(d)
        before = d.call("status")
        vajrad, vajrad_runs, vajrad_cpu = measured(load, rounds, lambda: cpu_seconds(d.proc.pid))
        wait_drained(d)
        time.sleep(1.5)                                   # file_events wait for their causes
        wait_drained(d)
        after = d.call("status")
        rows = watched_rows(d.database, load.watched, load.shell_pid)
        memory = memory_kib(d.proc.pid)
    finally:
        d.stop()
    e0, e1 = before["events"], after["events"]
    f0, f1 = before["collectors"]["file"], after["collectors"]["file"]
    fim1 = after["collectors"]["fim"]

    def variant(*flags: str) -> tuple[dict, float]:
        """Medians and vajrad's CPU with some collectors off."""
        d = Daemon(work, f"--config_path={cfg}", *flags).start()
        try:
            wait_drained(d)
            medians_s, _, cpu = measured(load, rounds, lambda: cpu_seconds(d.proc.pid))
            return medians_s, cpu
        finally:
            d.stop()

    # The socket collector's close() hook runs on every close of the open
    # loop, while the file collector's share is one map read per open.
    fim_only, fim_only_cpu = variant("--enable_socket_events=false")
    # What FIM itself adds to a vajrad that already audits processes and sockets.
    no_fim, no_fim_cpu = variant("--enable_file_events=false")

    problem = ensure_auditd()
    audit = None
    if problem is None:
        a = Auditd(load.watched).start()
        try:
            audited, _, audit_cpu = measured(load, rounds, a.cpu)
        finally:
            a.stop()
        audit = {"median_s": audited, "slowdown_percent": slowdown(audited, baseline),
                 "auditd_cpu_percent": audit_cpu,
                 "rules": f"-w {load.watched} -p wa; -a always,exit -F arch=b64 -S execve"}

    v_slow = slowdown(vajrad, baseline)
    result = {
        "workload": {"iterations": load.iterations,
                     "per_iteration": "exec /bin/true, cat a watched file, echo > watched file, mv it",
                     "unwatched_opens": load.opens, "opens_as": load.open_kind, "rounds": rounds},
        "without_monitor": {"median_s": baseline},
        "vajrad": {
            "median_s": vajrad, "slowdown_percent": v_slow, "vajrad_cpu_percent": vajrad_cpu,
            "vajrad_memory_kib": memory,
            "lost": {"kernel": e1["lost_kernel"] - e0["lost_kernel"],
                     "collector": e1["lost_collector"] - e0["lost_collector"],
                     "store": e1["lost_store"] - e0["lost_store"],
                     "inotify_overflows": fim1["queue_overflows"]},
            "last_run_rows": dict(rows, expected_each=load.iterations),
            "kernel_checked": f1["kernel_checked"] - f0["kernel_checked"],
            "kernel_matched": f1["kernel_matched"] - f0["kernel_matched"],
            "records_to_userspace": f1["records"] - f0["records"],
            "runs_s": [round(r["total_s"], 3) for r in vajrad_runs],
        },
        "vajrad_without_socket_collector": {"median_s": fim_only,
                                            "slowdown_percent": slowdown(fim_only, baseline),
                                            "vajrad_cpu_percent": fim_only_cpu},
        "vajrad_without_file_events": {"median_s": no_fim, "slowdown_percent": slowdown(no_fim, baseline),
                                       "vajrad_cpu_percent": no_fim_cpu,
                                       "fim_adds_percent": slowdown(vajrad, no_fim)},
        "auditd": audit if audit else {"skipped": problem},
        "kernel": os.uname().release,
    }
    if audit:
        a_total, v_total = audit["slowdown_percent"]["total_s"], v_slow["total_s"]
        result["auditd_vs_vajrad_slowdown_ratio"] = round(a_total / v_total, 2) if v_total > 0 else None
    shutil.rmtree(work, ignore_errors=True)
    return result

"""Crash bench: SIGKILL vajrad during an exec storm, again and again, and
count what each kill lost (issue 17 item 5).

Each round starts vajrad on the same store, runs /bin/true at --rate exec/s
for a few seconds, stops the storm (every exec it started has completed),
reads `status` one last time and sends SIGKILL at once: the worst moment,
when the kernel ring, the collector's drain and the store's queue all hold
the storm's tail. The next start opens the store again; the rows of the
round's tag that made it are counted against the execs that ran.

Reported: lost per kill (mean, max) against the bound docs/storage.md gives,
the store's queue (pending rows, age of the oldest) just before each kill,
PRAGMA integrity_check after every kill, and eid monotonicity (every new
row's eid above every eid from before the kill; eids never reused).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import statistics
import tempfile
import threading
import time

from exec_bench import exec_at_rate  # importing exec_bench also puts the repo and tests/ on sys.path
from harness import Daemon  # noqa: E402

TABLE = "bpf_process_events"
PROCESS_DRAIN_MS = 400           # vajrad/collectors/process: poll_ms


def documented_bound(rate: int, max_pending_ms: int) -> int:
    """docs/storage.md: a SIGKILL loses what the collector has drained but not
    yet handed over (up to one drain interval), plus the store's queue (up to
    store_max_pending_ms, plus the commit under way, counted as one more
    interval), at the event rate."""
    return int(rate * (PROCESS_DRAIN_MS + 2 * max_pending_ms) / 1000)


def tag_rows(db: str, tag: str) -> list[int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute(
            f"SELECT eid FROM {TABLE} WHERE syscall = 'exec' AND cmdline LIKE ? ORDER BY eid", (f"/bin/true {tag}-%",))]
    finally:
        con.close()


def store_facts(db: str) -> tuple[str, int, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        check = con.execute("PRAGMA integrity_check").fetchone()[0]
        top = con.execute(f"SELECT COALESCE(MAX(eid), 0) FROM {TABLE}").fetchone()[0]
        seq = con.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (TABLE,)).fetchone()
        return check, top, seq[0] if seq else 0
    finally:
        con.close()


def run(args) -> dict:
    rng = random.Random(args.crash_seed)
    work = tempfile.mkdtemp(prefix="vajra-bench-")
    db = os.path.join(work, "events.db")
    flags = ["--events_max=0", "--events_expiry=0", "--enable_socket_events=false",
             f"--store_max_pending_ms={args.store_max_pending_ms}"]
    rounds = []
    previous_top = 0
    try:
        for k in range(args.kills + 1):
            d = Daemon(work, *flags, database=db).start(timeout=120)
            check, top, seq = store_facts(db)
            if rounds:
                last = rounds[-1]
                rows = tag_rows(db, last["tag"])
                last["stored"] = len(rows)
                last["lost"] = last["execs"] - len(rows)
                last["integrity"] = check
                # Monotonic: the killed run's rows all above what was there
                # before it, and the sequence never behind the rows.
                last["eids_monotonic"] = (not rows or rows[0] > previous_top) and seq >= top
                previous_top = top
            if k == args.kills:
                d.stop()
                break
            tag = f"crash{os.getpid()}k{k}"
            seconds = rng.uniform(args.crash_storm_min, args.crash_storm_max)
            time.sleep(0.5)                     # READY, then a moment's calm
            done = threading.Event()
            result = {}

            def storm():
                result["execs"] = exec_at_rate(args.rate, seconds, tag)
                done.set()

            t = threading.Thread(target=storm)
            t.start()
            peak_pending, peak_age = 0, 0
            while not done.wait(0.1):           # the queue while the storm runs
                s = d.call("status")["store"]
                peak_pending = max(peak_pending, s["pending"])
                peak_age = max(peak_age, s["oldest_pending_ms"])
            t.join()
            last_status = d.call("status")["store"]
            d.proc.send_signal(signal.SIGKILL)
            d.stop()
            rounds.append({"tag": tag, "storm_s": round(seconds, 2), "execs": result["execs"],
                           "pending_at_kill": last_status["pending"],
                           "oldest_pending_ms_at_kill": last_status["oldest_pending_ms"],
                           "peak_pending": peak_pending, "peak_oldest_pending_ms": peak_age})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lost = [r["lost"] for r in rounds]
    bound = documented_bound(args.rate, args.store_max_pending_ms)
    return {
        "bench": "crash",
        "kills": len(rounds),
        "exec_rate_per_s": args.rate,
        "store_max_pending_ms": args.store_max_pending_ms,
        "integrity_ok": all(r["integrity"] == "ok" for r in rounds),
        "eids_monotonic": all(r["eids_monotonic"] for r in rounds),
        "lost_per_kill_mean": round(statistics.mean(lost), 1),
        "lost_per_kill_max": max(lost),
        "documented_bound": bound,
        "within_documented_bound": max(lost) <= bound,
        "peak_pending_rows": max(r["peak_pending"] for r in rounds),
        "peak_oldest_pending_ms": max(r["peak_oldest_pending_ms"] for r in rounds),
        "rounds": [{k: v for k, v in r.items() if k != "tag"} for r in rounds],
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
    }

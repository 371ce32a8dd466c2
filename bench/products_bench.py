"""Security-products benchmark: the unit's CPU at idle with the shipped
catalogue (20+ products) known, and the time from a tamper action to its
security_product_events row.

Idle CPU is vajrad's (its own plus its reaped children's: health commands
and bpftool) with the unit on, minus the same daemon with it off, over the
same idle window; the reconcile interval is shortened to 10 s so that the
window holds reconcile passes, and the cost is also given per pass so it
can be scaled to the 60 s default.

Latency: a product process (a test catalogue entry) is killed with
/usr/bin/kill -9, the realistic tamper; the clock runs from spawning kill to
the row arriving on a live subscription (socket API), so it includes the
commit of the kill's exec row, the evaluation round and the actor lookup.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from exec_bench import CLK_TCK, Daemon, percentile
from vajrad.client.connection import ClientError


def cpu_with_children(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK   # utime stime cutime cstime


def _daemon(root: str, sleeper: str, *flags: str) -> Daemon:
    cfg = Path(root, "vajra.conf")
    cfg.write_text(json.dumps({"options": {}, "security_products": [
        {"name": "bench-daemon", "vendor": "bench", "type": "edr", "executables": [sleeper],
         "needs_process": True}]}))
    return Daemon(root, f"--config_path={cfg}", *flags).start()


def idle_cpu(root: str, sleeper: str, seconds: float, enabled: bool, reconcile: int) -> dict:
    d = _daemon(root, sleeper, f"--security_products_reconcile_interval={reconcile}",
                f"--enable_security_products={'true' if enabled else 'false'}")
    try:
        time.sleep(3)                               # start-up settles (the baseline round)
        pid = d.proc.pid
        c0, t0 = cpu_with_children(pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_with_children(pid), time.monotonic()
        stats = d.call("status")["collectors"].get("products", {})
        return {"cpu_pct": 100 * (c1 - c0) / (t1 - t0), "rounds": stats.get("rounds"),
                "products": stats.get("products"), "last_round_ms": stats.get("last_round_ms")}
    finally:
        d.stop()


def tamper_latency(root: str, sleeper: str, tampers: int) -> dict:
    d = _daemon(root, sleeper)
    arrivals: queue.Queue = queue.Queue()

    def follow():
        try:
            with d.client() as c:
                for msg in c.subscribe("security_product_events"):
                    if msg["method"] == "event":
                        arrivals.put((time.monotonic(), msg["params"]["event"]))
        except ClientError:          # the daemon stopped at the end of the run
            pass

    threading.Thread(target=follow, daemon=True).start()
    latencies, attributed = [], 0
    try:
        time.sleep(1)
        for _ in range(tampers):
            victim = subprocess.Popen([sleeper, "1000"])
            deadline = time.monotonic() + 20
            while True:           # the product is seen running (its start row arrives too)
                rows = d.call("table/read", {"table": "security_products"})["rows"]
                if any(r["name"] == "bench-daemon" and r["pid"] == victim.pid for r in rows):
                    break
                assert time.monotonic() < deadline, "the product was never seen running"
                time.sleep(0.05)
            time.sleep(0.2)
            while not arrivals.empty():
                arrivals.get_nowait()
            t0 = time.monotonic()
            subprocess.run(["/usr/bin/kill", "-9", str(victim.pid)], check=True)
            victim.wait()
            while True:
                at, ev = arrivals.get(timeout=20)
                if ev["name"] == "bench-daemon" and ev["change"] == "stopped" and ev["target_pid"] == victim.pid:
                    latencies.append(at - t0)
                    attributed += ev["actor_found"] == 1 and ev["path"] == "/usr/bin/kill"
                    break
    finally:
        d.stop()
    return {"tampers": tampers, "attributed_to_kill": attributed,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "max_s": max(latencies) if latencies else None}


def run(args) -> dict:
    root = tempfile.mkdtemp(prefix="vajra-bench-products-")
    os.chmod(root, 0o755)
    sleeper = os.path.join(root, "bench-productd")
    shutil.copy("/bin/sleep", sleeper)
    try:
        on = idle_cpu(root, sleeper, args.products_idle, True, args.products_reconcile)
        off = idle_cpu(root, sleeper, args.products_idle, False, args.products_reconcile)
        latency = tamper_latency(root, sleeper, args.products_tampers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    unit_pct = on["cpu_pct"] - off["cpu_pct"]
    return {"idle_seconds": args.products_idle, "products_known": on["products"],
            "reconcile_interval_s": args.products_reconcile, "reconcile_rounds": on["rounds"],
            "daemon_cpu_pct_with_unit": round(on["cpu_pct"], 3),
            "daemon_cpu_pct_without_unit": round(off["cpu_pct"], 3),
            "unit_idle_cpu_pct": round(unit_pct, 3),
            "last_round_ms": on["last_round_ms"], "target_idle_cpu_pct": 0.5,
            "tamper_to_row": latency, "target_p99_s": 2.0}

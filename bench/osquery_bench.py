"""osquery `generate` latency: a store of N events, the extension registered
with osquery core (played by osquery's own Thrift stubs), and `SELECT ... WHERE
time >= T AND time < T + 60` issued as osquery would, over random windows.

Two queries, interleaved on the same windows so that a noisy host weighs on
both alike: `SELECT *` (ancestry shipped, what every query cost before the
shim read colsUsed) and `SELECT pid, parent, path, cmdline` (ancestry left home)."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time

from exec_bench import percentile  # (exec_bench puts the repo and tests/ on sys.path)
from harness import Daemon, OsqueryCore, osquery_context

from vajrad.enrich.process_cache import TICK_NS, ProcessCache
from vajrad.tables import TABLES
from vajrad.store.event_store import EventStore


def ancestries(lines: int = 50, depth: int = 8) -> list:
    """Ancestry values as the process collector makes them (node chains, which
    the store keeps one side row per entry and reads back with a recursive
    query): `lines` shells `depth` processes deep under one init."""
    cache = ProcessCache(size=10_000, proc="/nonexistent")
    cache.executed(1, TICK_NS, 0, 0, "/sbin/init", "/sbin/init splash")
    out, pid = [], 1
    for line in range(lines):
        parent = 1
        for level in range(depth - 1):
            pid += 1
            cache.forked(pid, pid * TICK_NS, parent, parent * TICK_NS)
            cache.executed(pid, pid * TICK_NS, parent, parent * TICK_NS, "/usr/bin/bash",
                           f"bash -c 'step {level} of line {line}'")
            parent = pid
        out.append(cache.ancestry(parent, parent * TICK_NS))
    return out


def seed(path: str, events: int, span_s: int) -> int:
    """`events` rows spread evenly over the last span_s seconds; returns the start time."""
    store = EventStore(path, TABLES, expiry=0, max_rows=0, max_pending_rows=events + 1)
    store.open()
    store.start()
    start = int(time.time()) - span_s
    lines = ancestries()
    batch = []
    for i in range(events):
        batch.append(TABLES["bpf_process_events"].row(**{"tid": 1000 + i % 30000, "pid": 1000 + i % 30000, "parent": 1, "uid": 0, "gid": 0,
                      "cid": 1, "exit_code": "0", "probe_error": 0, "syscall": "exec",
                      "path": f"/usr/bin/tool{i % 50}", "cwd": "/", "cmdline": f"tool{i % 50} --run {i}",
                      "json_cmdline": json.dumps([f"tool{i % 50}", "--run", str(i)]),
                      "duration": 100000, "ntime": str(i), "time": start + (i * span_s) // events,
                      "ancestry": lines[i % len(lines)], "host_identifier": "bench", "is_open": 0}))
        if len(batch) == 10000:
            store.submit("bpf_process_events", batch)
            batch = []
    store.submit("bpf_process_events", batch)
    store.stop()
    return start


def run(events: int, span_s: int, queries: int, window_s: int = 60) -> dict:
    work = tempfile.mkdtemp(prefix="vajra-bench-osq-")
    db = os.path.join(work, "events.db")
    t0 = time.monotonic()
    start = seed(db, events, span_s)
    seed_s = time.monotonic() - t0
    d = Daemon(work, "--enable_bpf_events=false", "--events_expiry=0", "--events_max=0", database=db).start()
    core = OsqueryCore(work)
    try:
        core.start_shim(d.socket)
        client = core.fast_client()
        rng = random.Random(7)
        variants = {"select_star": None, "select_without_ancestry": ["pid", "parent", "path", "cmdline"]}
        lat = {v: [] for v in variants}
        rows = []
        for _ in range(queries):
            lo = rng.randrange(start, start + span_s - window_s)
            where = [{"name": "time", "affinity": "BIGINT", "list": [
                {"op": 32, "expr": str(lo)}, {"op": 16, "expr": str(lo + window_s)}]}]
            for name, select in variants.items():
                ctx = osquery_context("bpf_process_events", where, select)
                t = time.perf_counter()
                resp = client.call("call", registry="table", item="vajra_bpf_process_events",
                                   request={"action": "generate", "context": ctx})
                lat[name].append((time.perf_counter() - t) * 1000)
                assert resp.status.code == 0, resp.status.message
            rows.append(len(resp.response))
        out = {
            "bench": "osquery_generate",
            "store_events": events,
            "store_span_s": span_s,
            "window_s": window_s,
            "queries": queries,
            "rows_per_query_mean": round(sum(rows) / len(rows), 1),
            "seed_s": round(seed_s, 1),
        }
        for name, ms in lat.items():
            out[name] = {"generate_p50_ms": round(percentile(ms, 50), 2),
                         "generate_p99_ms": round(percentile(ms, 99), 2),
                         "generate_max_ms": round(max(ms), 2)}
        return out
    finally:
        core.stop()
        d.stop()
        shutil.rmtree(work, ignore_errors=True)

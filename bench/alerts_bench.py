"""Alerts benchmark: the exec bench's load (1,000 exec/s by default) against
a vajrad without rules and one with 100 enabled rules (plus the packaged
defaults), reporting what the rules add to vajrad's CPU, as the difference
of the two runs and as the engine's own timing of every rule, and the cost
of each rule (µs per row evaluated)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import exec_bench
from harness import Daemon

RULES = 100


def rule_file(count: int) -> str:
    """count rules of the shapes people write (equality, LIKE, REGEXP, ancestry,
    IN lists, exceptions), none of which the bench's /bin/true matches, so the
    cost measured is evaluation, not alert writing."""
    out = ["rules:"]
    for i in range(count):
        where = SHAPES[i % len(SHAPES)][1].format(i=i)
        out += [f"  - id: bench.{SHAPES[i % len(SHAPES)][0]}_{i:03d}", f"    name: bench rule {i}",
                "    table: bpf_process_events",
                f"    where: \"{where}\"", "    group_by: [path]", "    suppress_for: 60",
                f"    exceptions: [\"cwd = '/nonexistent-{i}'\"]"]
    return "\n".join(out) + "\n"


SHAPES = [
    ("equal", "syscall = 'exec' AND path = '/usr/bin/bench-tool-{i}'"),
    ("like", "syscall = 'exec' AND cmdline LIKE '%--bench-flag-{i}%'"),
    ("regexp", "syscall = 'exec' AND path REGEXP '/bench-{i}[a-z]+$'"),
    ("ancestry", "syscall = 'exec' AND path LIKE '%/sh' AND json_extract(ancestry, '$[0].exe_name') = 'bench-svc-{i}'"),
    ("in_list", "syscall = 'exec' AND uid = 0 AND path IN ('/usr/sbin/bench-a-{i}', '/usr/sbin/bench-b-{i}')"),
]


def one_run(args, rules: bool, tag: str) -> dict:
    work = tempfile.mkdtemp(prefix="vajra-bench-")
    flags = ["--events_max=0", "--events_expiry=0", f"--bpf_output={args.bpf_output}"]
    if rules:
        rules_d = os.path.join(work, "rules.d")
        os.mkdir(rules_d)
        Path(rules_d, "bench.yml").write_text(rule_file(RULES))
        flags += ["--enable_alerts=true", f"--rules_path={rules_d}"]
    d = Daemon(work, *flags)
    d.start(timeout=60)
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        w = exec_bench.load_window(d, args.rate, args.duration, args.chain_depth, tag)
        wall = time.monotonic() - t0
        status = d.call("status")
        result = {"cpu_percent": w["cpu_percent"], "achieved_exec_rate_per_s": w["achieved_exec_rate_per_s"],
                  "execs": w["execs"], "leaf_lost": w["leaf_lost"]}
        if rules:
            a = status["collectors"]["alerts"]
            per_rule = {rid: r for rid, r in a["rules"].items()}
            total_ms = sum(r["time_ms"] for r in per_rule.values())
            costs = sorted((r["us_per_row"] or 0.0, rid) for rid, r in per_rule.items())
            result.update({
                "rules_enabled": a["rules_enabled"], "rules_refused": a["rules_refused"],
                "evaluations": a["evaluations"], "alerts_opened": a["alerts_opened"],
                "rules_time_ms": round(total_ms, 1),
                # the rules' queries as the engine times them (CPU of its thread), over the window's wall time
                "rules_cpu_percent_by_engine_timing": round(100 * total_ms / 1000 / wall, 3),
                "rows_evaluated_per_rule": max(r["rows_evaluated"] for r in per_rule.values()),
                "us_per_row_per_rule": {"min": costs[0][0], "median": costs[len(costs) // 2][0],
                                        "max": costs[-1][0], "max_rule": costs[-1][1]},
                # each rule's own cost, measured when it is evaluated alone (every 30 s)
                "profiled_us_per_row_by_shape": {
                    shape: sorted(r["profiled_us_per_row"] for rid, r in per_rule.items()
                                  if rid.startswith(f"bench.{shape}_") and r["profiled_us_per_row"] is not None)
                    for shape, _ in SHAPES},
                "profiled_us_per_row_default_rules": {rid: r["profiled_us_per_row"] for rid, r in per_rule.items()
                                                      if rid.startswith("vajra.")},
                "per_rule": {rid: {"us_per_row": r["us_per_row"], "profiled_us_per_row": r["profiled_us_per_row"],
                                   "time_ms": r["time_ms"], "rows_evaluated": r["rows_evaluated"]}
                             for rid, r in per_rule.items()},
            })
        return result
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


def store_only_cost(rows: int = 60_000) -> dict:
    """The rules' query alone, on a store of bench-like rows (fork, exec, exit
    of /bin/true under dash), with no collector competing for the CPU or the
    GIL: µs per row for all rules together, and per shape (20 rules each)."""
    import json as json_
    from vajrad.collectors.alerts import rules as rule_files
    from vajrad.store.event_store import EventStore
    from vajrad.tables import TABLES
    table = "bpf_process_events"
    work = tempfile.mkdtemp(prefix="vajra-bench-")
    os.chmod(work, 0o700)
    try:
        db = os.path.join(work, "e.db")
        store = EventStore(db, TABLES, expiry=0, max_rows=0, max_pending_rows=rows + 1)
        store.open()
        store.start()
        now = int(time.time())
        ancestry = json_.dumps([{"exe_name": "dash", "pid": 5, "ppid": 1, "path": "/usr/bin/dash",
                                 "cmdline": "sh -c x"}])
        batch = []
        for i in range(rows // 3):
            for syscall, path in (("fork", "/usr/bin/dash"), ("exec", "/usr/bin/true"), ("exit", "/usr/bin/true")):
                batch.append(TABLES[table].row(syscall=syscall, path=path, cmdline=f"/bin/true ab-{i}", cwd="/root",
                                               uid=0, pid=i, time=now, ancestry=ancestry))
            if len(batch) >= 30_000:
                store.submit(table, batch)
                batch = []
        store.submit(table, batch)
        store.stop()
        rules_d = os.path.join(work, "rules.d")
        os.mkdir(rules_d)
        Path(rules_d, "bench.yml").write_text(rule_file(RULES))
        conn, guard = rule_files.connect_checked(db, TABLES)
        loaded, errors = rule_files.load([rule_files.PACKAGED_RULES, rules_d], TABLES, conn, guard)
        assert not errors, errors
        mine = [r for r in loaded.values() if r.table == table]
        top = conn.execute(f'SELECT MAX(eid) FROM "{table}"').fetchone()[0]

        def cost(rules) -> float:
            sql, _ = rule_files.combined_sql(TABLES[table], rules)
            t0 = time.perf_counter()
            conn.execute(sql, (0, top)).fetchall()
            return round((time.perf_counter() - t0) * 1e6 / top, 3)

        result = {"rows": top, "rules": len(mine), "us_per_row_all_rules": cost(mine),
                  "us_per_row_by_shape_20_rules": {shape: cost([r for r in mine if r.id.startswith(f"bench.{shape}_")])
                                                   for shape, _ in SHAPES},
                  "us_per_row_default_rules": cost([r for r in mine if r.id.startswith("vajra.")])}
        conn.close()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args) -> dict:
    tag = f"ab{os.getpid()}"
    base = one_run(args, False, tag + "n")
    with_rules = one_run(args, True, tag + "r")
    return {
        "bench": "alerts",
        "exec_rate_per_s": args.rate, "duration_s": args.duration, "chain_depth": args.chain_depth,
        "rules": RULES,
        "vajrad_cpu_percent_without_rules": base["cpu_percent"],
        "vajrad_cpu_percent_with_rules": with_rules["cpu_percent"],
        "rules_added_cpu_percent_of_a_core": round(with_rules["cpu_percent"] - base["cpu_percent"], 2),
        "rules_cpu_percent_by_engine_timing": with_rules["rules_cpu_percent_by_engine_timing"],
        "without_rules": base, "with_rules": with_rules,
        "store_only": store_only_cost(),
        "kernel": os.uname().release, "cpus": os.cpu_count(),
    }

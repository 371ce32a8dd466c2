"""`make bench [NAME]` / `python -m bench
[exec|ancestry|socket|fim|osquery|crash|logs|products|containers|alerts|compare|all]`: each bench prints
JSON and leaves it in bench/results/. `all` leaves out `compare`, which runs auditd."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import exec_bench  # noqa: E402  (puts the repo and tests/ on sys.path)

# Each bench once: name -> (its module, how its run() is called, part of
# `all`), in the order `all` runs them. A new bench is one line here.
BENCHES = {
    "exec": ("exec_bench", lambda m, a: m.run(a), True),
    "ancestry": ("ancestry_bench", lambda m, a: m.run(), True),
    "socket": ("socket_bench", lambda m, a: m.run(a), True),
    "fim": ("fim_bench", lambda m, a: m.run(a), True),
    "containers": ("containers_bench", lambda m, a: m.run(a), True),
    "crash": ("crash_bench", lambda m, a: m.run(a), True),
    "logs": ("logs_bench", lambda m, a: m.run(a), True),
    "products": ("products_bench", lambda m, a: m.run(a), True),
    "compare": ("compare", lambda m, a: m.run(a), False),          # runs auditd
    "alerts": ("alerts_bench", lambda m, a: m.run(a), True),
    "osquery": ("osquery_bench", lambda m, a: m.run(a.events, int(a.span_hours * 3600), a.queries), True),
}


def main() -> int:
    p = argparse.ArgumentParser(prog="make bench")
    p.add_argument("which", nargs="?", default="all", choices=(*BENCHES, "all"))
    p.add_argument("--rate", type=int, default=1000, help="exec: execs per second")
    p.add_argument("--duration", type=float, default=30, help="exec: seconds of load")
    p.add_argument("--latency-seconds", type=float, default=10)
    p.add_argument("--chain-depth", type=int, default=3, help="exec: execs per chain (3: sh, sh, true)")
    p.add_argument("--ramp", action="store_true", help="exec: also find the highest rate with 0 loss")
    p.add_argument("--bpf-output", default="auto", choices=("auto", "ringbuf", "perf"))
    p.add_argument("--events", type=int, default=1_000_000, help="osquery: events in the store")
    p.add_argument("--span-hours", type=float, default=24, help="osquery: time the store's events span")
    p.add_argument("--queries", type=int, default=200, help="osquery: generate calls")
    p.add_argument("--socket-rate", type=int, default=5000, help="socket: TCP cycles per second")
    p.add_argument("--socket-duration", type=float, default=30, help="socket: seconds of cycles")
    p.add_argument("--closes", type=int, default=1_000_000, help="socket: close() calls per run")
    p.add_argument("--fim-iterations", type=int, default=1000,
                   help="fim: iterations of exec, read, write and rename in the watched dir")
    p.add_argument("--fim-opens", type=int, default=1_000_000, help="fim: opens of unwatched files")
    p.add_argument("--fim-rounds", type=int, default=3, help="fim: runs per configuration (median)")
    p.add_argument("--container-rate", type=int, default=20, help="containers: containers started per second")
    p.add_argument("--container-runtime", default="podman", choices=("podman", "docker", "containerd"),
                   help="containers: the runtime that starts them (containerd: through CRI)")
    p.add_argument("--container-duration", type=float, default=30, help="containers: seconds of each window")
    p.add_argument("--kills", type=int, default=10, help="crash: SIGKILLs, one per storm")
    p.add_argument("--crash-storm-min", type=float, default=2.0, help="crash: shortest storm before a kill, s")
    p.add_argument("--crash-storm-max", type=float, default=4.0, help="crash: longest storm before a kill, s")
    p.add_argument("--crash-seed", type=int, default=17, help="crash: seed of the storms' lengths")
    p.add_argument("--store-max-pending-ms", type=int, default=100, help="crash: vajrad's --store_max_pending_ms")
    p.add_argument("--log-rate", type=int, default=50_000, help="logs: lines per second")
    p.add_argument("--log-size", type=int, default=200, help="logs: bytes per line")
    p.add_argument("--log-duration", type=float, default=30, help="logs: seconds of writing")
    p.add_argument("--log-rotate-every", type=float, default=5, help="logs: seconds between rename rotations")
    p.add_argument("--products-idle", type=float, default=130,
                   help="products: seconds of idle per configuration (two reconcile passes at the default)")
    p.add_argument("--products-reconcile", type=int, default=60,
                   help="products: --security_products_reconcile_interval while idle (60: the shipped default)")
    p.add_argument("--products-tampers", type=int, default=20, help="products: kill -9 tampers timed")
    p.add_argument("--compare-rounds", type=int, default=3,
                   help="compare: rounds of vajrad, auditd (execve), auditd (coverage), no monitor")
    p.add_argument("--compare-seconds", type=float, default=10,
                   help="compare: seconds of each exec and socket workload")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root", file=sys.stderr)
        return 2
    results = {}
    for name, (module, run, in_all) in BENCHES.items():
        if args.which == name or (args.which == "all" and in_all):
            results[name] = run(importlib.import_module(module), args)
    out_dir = exec_bench.REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

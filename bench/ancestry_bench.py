"""ProcessCache on its own: ancestry lookup latency and memory per entry,
with a tree shaped like a busy host (long-lived daemons, shells, short jobs)."""
from __future__ import annotations

import random
import time
import tracemalloc

from exec_bench import percentile  # (exec_bench puts the repo on sys.path)

from vajrad.enrich.process_cache import ProcessCache


def build(cache: ProcessCache, n: int, rng: random.Random) -> list[tuple[int, int]]:
    """n processes, each forked by a random earlier one and then exec'd."""
    procs = [(1, 1_000_000_000)]
    cache.executed(1, procs[0][1], 0, 0, "/usr/lib/systemd/systemd", "/sbin/init splash")
    for pid in range(2, n + 1):
        ppid, pstart = procs[rng.randrange(max(0, len(procs) - 50), len(procs))] if pid % 7 \
            else procs[rng.randrange(len(procs))]
        start = procs[-1][1] + 10_000_000 + rng.randrange(1000)
        now = time.monotonic_ns()
        cache.forked(pid, start, ppid, pstart, exec_id=pid, ktime_ns=now)
        cache.executed(pid, start, ppid, pstart, f"/usr/bin/tool{pid % 40}",
                       f"tool{pid % 40} --config /etc/tool{pid % 40}.conf --job {pid}", exec_id=pid + 1, ktime_ns=now)
        procs.append((pid, start))
    return procs


def run(entries: int = 1000, lookups: int = 20000) -> dict:
    rng = random.Random(3)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    cache = ProcessCache(size=entries, max_depth=32, ttl=300, proc="/nonexistent")
    procs = build(cache, entries, rng)
    for pid, start in procs:                  # what serving events leaves cached,
        cache.ancestry(pid, start)            # the kept ancestry texts included
    used = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    lat = []
    depths = []
    for _ in range(lookups):
        pid, start = procs[rng.randrange(len(procs))]
        t = time.perf_counter_ns()
        out = cache.ancestry(pid, start)
        lat.append((time.perf_counter_ns() - t) / 1000)
        depths.append(out.count('"exe_name"'))
    return {
        "bench": "ancestry_cache",
        "entries": len(cache.live) + len(cache.exited),
        "memory_bytes": used,
        "memory_mb_per_1000_entries": round(used / 1e6 * 1000 / entries, 3),
        "lookups": lookups,
        "mean_depth": round(sum(depths) / len(depths), 1),
        "max_depth": max(depths),
        "lookup_p50_us": round(percentile(lat, 50), 1),
        "lookup_p99_us": round(percentile(lat, 99), 1),
        "live_rule": live_rule(rng),
    }


def _measure(work) -> int:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    kept = work()
    used = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    del kept
    return used


def live_rule(rng: random.Random, live: int = 3000, exited: int = 3000, size: int = 1000) -> dict:
    """Running processes are never evicted, and max_size bounds the exited:
    `live` running and `exited` exited processes through a cache of `size`;
    then the same with every exec's replaced image held (a collector that has
    attributed nothing yet: the most memory images can take)."""
    def fill(hold: bool):
        cache = ProcessCache(size=size, max_depth=32, ttl=300, proc="/nonexistent")
        if hold:
            cache.attributed_upto("socket", time.monotonic_ns())
        procs = build(cache, live + exited, rng)
        for pid, start in procs[live:]:
            cache.exited_process(pid, start)
        for pid, start in procs[:live]:
            cache.ancestry(pid, start)
        return cache
    cache = fill(False)
    stats = cache.stats()
    plain = _measure(lambda: fill(False))
    held = _measure(lambda: fill(True))
    per_1000 = 1000 / (stats["live_entries"] + stats["exited_entries"])
    held_cache = fill(True)
    return {
        "live_entries": stats["live_entries"], "exited_entries": stats["exited_entries"],
        "evictions": stats["evictions"],
        "memory_mb_per_1000_entries": round(plain / 1e6 * per_1000, 3),
        "held_images": held_cache.stats()["held_images"],
        "memory_mb_per_1000_entries_all_images_held": round(held / 1e6 * per_1000, 3),
    }

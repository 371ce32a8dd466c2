"""ProcessCache without the kernel: /proc fallbacks, keys and bounds."""
import os

from vajrad.ancestry import ProcessCache, TICK_NS


def proc_parents(pid):
    out = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def test_describe_reads_an_unknown_process_from_proc():
    cache = ProcessCache(size=1000)          # not seeded: everything comes from /proc
    found = cache.describe(os.getpid())
    assert found["process"]["pid"] == os.getpid()
    assert [a["pid"] for a in found["ancestry"]] == proc_parents(os.getpid())
    assert cache.describe(4_000_000) is None


def test_reused_pid_is_another_process():
    cache = ProcessCache(size=10, proc="/nonexistent")
    cache.executed(100, 10 * TICK_NS, 1, 0, "/usr/bin/old-parent", "old")
    cache.forked(200, 20 * TICK_NS, 100, 10 * TICK_NS)
    cache.exited_process(200, 20 * TICK_NS)
    cache.executed(300, 30 * TICK_NS, 1, 0, "/usr/bin/new-parent", "new")
    cache.forked(200, 40 * TICK_NS, 300, 30 * TICK_NS)       # pid 200 again, later start
    assert '"pid": 300' in cache.ancestry(300, 30 * TICK_NS)
    old = cache.get(200, 20 * TICK_NS)
    new = cache.get(200, 40 * TICK_NS)
    assert old is not new and (old.ppid, new.ppid) == (100, 300)
    assert old.path == "/usr/bin/old-parent" and new.path == "/usr/bin/new-parent"


def test_one_bound_for_running_and_exited_with_exited_going_first():
    cache = ProcessCache(size=3, proc="/nonexistent")
    for pid in (1, 2, 3):
        cache.executed(pid, pid * TICK_NS, 0, 0, f"/p{pid}", "")
    cache.exited_process(2, 2 * TICK_NS)
    cache.executed(4, 4 * TICK_NS, 0, 0, "/p4", "")
    assert cache.get(2, 2 * TICK_NS) is None and cache.get(1, TICK_NS) is not None
    assert cache.stats()["cache_size"] == 3 and cache.stats()["evictions"] == 1

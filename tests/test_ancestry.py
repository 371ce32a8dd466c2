"""ProcessCache without the kernel: /proc fallbacks, keys and bounds."""
import json
import os

from vajrad.enrich.process_cache import ProcessCache, TICK_NS


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


def chain_cache(length, max_depth=32, size=1000):
    """pid 1, then pids 2..length each forked by the one before and exec'd."""
    cache = ProcessCache(size=size, max_depth=max_depth, proc="/nonexistent")
    cache.executed(1, TICK_NS, 0, 0, "/sbin/init", "init")
    for pid in range(2, length + 1):
        cache.forked(pid, pid * TICK_NS, pid - 1, (pid - 1) * TICK_NS)
        cache.executed(pid, pid * TICK_NS, pid - 1, (pid - 1) * TICK_NS, f"/bin/p{pid}", f"p{pid} 'x\"y'")
    return cache


def pids(text):
    return [e["pid"] for e in json.loads(text)]


def test_ancestry_is_a_node_chain_that_reads_as_its_text():
    cache = chain_cache(6)
    text = cache.ancestry(6, 6 * TICK_NS)
    assert pids(text) == [6, 5, 4, 3, 2, 1]
    node, entries = text.node, []
    for _ in range(node.depth):
        entries.append(json.loads(node.entry))
        node = node.rest
    assert entries == json.loads(text) and node is None
    # A sibling line shares the nodes of its common ancestors.
    cache.forked(7, 7 * TICK_NS, 3, 3 * TICK_NS)
    other = cache.ancestry(7, 7 * TICK_NS)
    assert pids(other) == [7, 3, 2, 1] and other.node.rest is text.node.rest.rest.rest


def test_max_depth_cuts_the_chain_and_deeper_lines_still_get_their_full_depth():
    cache = chain_cache(10, max_depth=4)
    assert pids(cache.ancestry(10, 10 * TICK_NS)) == [10, 9, 8, 7]
    # pid 7's node was built cut short (the walk stopped there); its own
    # descendants must still see four ancestors, not what the walk left.
    cache.forked(11, 11 * TICK_NS, 7, 7 * TICK_NS)
    assert pids(cache.ancestry(11, 11 * TICK_NS)) == [11, 7, 6, 5]
    assert pids(cache.ancestry(7, 7 * TICK_NS)) == [7, 6, 5, 4]


def test_a_deep_line_builds_without_recursion():
    cache = chain_cache(3000, max_depth=32, size=5000)
    assert pids(cache.ancestry(3000, 3000 * TICK_NS)) == list(range(3000, 2968, -1))

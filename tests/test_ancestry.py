"""ProcessCache without the kernel: /proc fallbacks, keys and bounds."""
import json
import os
import time

from harness import proc_ancestors
from vajrad.enrich.process_cache import Process, ProcessCache, TICK_NS, key


def test_describe_reads_an_unknown_process_from_proc():
    cache = ProcessCache(size=1000)          # not seeded: everything comes from /proc
    found = cache.describe(os.getpid())
    assert found["process"]["pid"] == os.getpid()
    assert [a["pid"] for a in found["ancestry"]] == proc_ancestors(os.getpid())
    assert cache.describe(4_000_000) is None


def test_a_parent_seeded_from_proc_takes_the_exact_start_its_child_knows():
    """pid 1 and other processes older than the daemon come from /proc, their
    start known to the clock tick; a child whose kernel events gave the exact
    start (pproc_time_hr) must find the same value as its parent's
    proc_time_hr in its ancestry (seen: a line up to pid 1 differing by 0.8 ms)."""
    cache = ProcessCache(size=10, proc="/nonexistent")
    exact_init = 5 * TICK_NS + 786_000                       # inside tick 5
    init = Process(1, 0, 5 * TICK_NS, 0, "/sbin/init", "init", coarse=True)
    cache._insert(key(1, init.start_ns), init)
    cache.executed(50, 9 * TICK_NS, 1, exact_init, "/usr/bin/agent", "agent")
    [agent, top] = json.loads(cache.ancestry(50, 9 * TICK_NS))
    assert top["pid"] == 1 and agent["pproc_time_hr"] == top["proc_time_hr"] == cache.clock.unix_ns(exact_init)
    # a sibling seeded from /proc (it knows init's start to the tick) neither
    # turns init's start back nor keeps its coarse copy
    sibling = Process(60, 1, 12 * TICK_NS, 5 * TICK_NS, "/usr/sbin/cron", "cron", coarse=True)
    cache._insert(key(60, sibling.start_ns), sibling)
    [cron, top] = json.loads(cache.ancestry(60, 12 * TICK_NS))
    assert cron["pproc_time_hr"] == top["proc_time_hr"] == cache.clock.unix_ns(exact_init)
    [agent, top] = json.loads(cache.ancestry(50, 9 * TICK_NS))
    assert agent["pproc_time_hr"] == top["proc_time_hr"] == cache.clock.unix_ns(exact_init)


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


def test_the_bound_is_on_exited_processes_and_running_ones_are_never_evicted():
    cache = ProcessCache(size=3, proc="/nonexistent")
    for pid in range(1, 11):                        # ten running: more than size
        cache.executed(pid, pid * TICK_NS, 0, 0, f"/p{pid}", "")
    assert all(cache.get(pid, pid * TICK_NS) is not None for pid in range(1, 11))
    for pid in (2, 3, 4, 5):                        # four exit: the oldest exited goes
        cache.exited_process(pid, pid * TICK_NS)
    assert cache.get(2, 2 * TICK_NS) is None and cache.get(3, 3 * TICK_NS) is not None
    stats = cache.stats()
    assert (stats["live_entries"], stats["exited_entries"], stats["cache_size"], stats["evictions"]) == (6, 3, 9, 1)


def test_reconcile_drops_a_running_entry_only_when_proc_shows_it_gone_twice():
    cache = ProcessCache(size=3, proc="/nonexistent")
    for pid in (1, 2, 3):
        cache.executed(pid, pid * TICK_NS, 0, 0, f"/p{pid}", "")
    alive = {1: 1, 2: 2}                          # pid 3's exit record was lost
    reused = {1: 1, 2: 99}                        # and pid 2 is now another process
    assert cache.reconcile(lambda pid: alive.get(pid)) == 0       # first sighting: marked only
    assert cache.reconcile(lambda pid: reused.get(pid)) == 1      # 3 gone twice; 2 only once
    assert cache.get(3, 3 * TICK_NS) is None and cache.get(2, 2 * TICK_NS) is not None
    assert cache.reconcile(lambda pid: reused.get(pid)) == 1
    assert cache.get(2, 2 * TICK_NS) is None and cache.stats()["vanished_entries"] == 2


def test_an_event_before_an_exec_gets_the_image_it_ran_under():
    # Event times are CLOCK_MONOTONIC ns, as the kernel stamps them, and recent:
    # replaced images are kept a minute at most behind the clock.
    T = time.monotonic_ns()
    cache = ProcessCache(size=10, proc="/nonexistent")
    cache.attributed_upto("socket", T)            # a collector whose rows are not attributed yet
    cache.executed(1, TICK_NS, 0, 0, "/sbin/init", "init", exec_id=1)
    cache.forked(50, 5 * TICK_NS, 1, TICK_NS, exec_id=1, ktime_ns=T + 100)
    cache.executed(50, 5 * TICK_NS, 1, TICK_NS, "/bin/sh", "sh -c x", exec_id=2, ktime_ns=T + 200)
    cache.executed(50, 5 * TICK_NS, 1, TICK_NS, "/bin/env", "env x", exec_id=3, ktime_ns=T + 300)
    cache.executed(50, 5 * TICK_NS, 1, TICK_NS, "/bin/x", "x", exec_id=4, ktime_ns=T + 400)
    proc = cache.get(50, 5 * TICK_NS)
    assert proc.image_at(1, T + 150) == ("/sbin/init", "init")       # forked, not yet exec'd
    assert proc.image_at(2, T + 250) == ("/bin/sh", "sh -c x")
    assert proc.image_at(3, T + 350) == ("/bin/env", "env x")
    assert proc.image_at(4, T + 450) == ("/bin/x", "x")
    assert cache.stats()["held_images"] == 3
    # Once the collector has attributed past the second exec, the images it
    # replaced go; the newer ones stay.
    cache.attributed_upto("socket", T + 301)
    assert proc.prior == [(3, T + 400, "/bin/env", "env x")] and cache.stats()["held_images"] == 1
    cache.attributed_upto("socket", None)         # the collector stopped: nothing is needed
    assert proc.prior is None and cache.stats()["held_images"] == 0


def test_a_seeded_process_image_is_matched_by_time_and_nothing_is_held_without_collectors():
    # Event times are CLOCK_MONOTONIC ns, as the kernel stamps them, and recent:
    # replaced images are kept a minute at most behind the clock.
    T = time.monotonic_ns()
    cache = ProcessCache(size=10, proc="/nonexistent")
    cache.executed(7, 7 * TICK_NS, 0, 0, "/bin/a", "a")               # no exec_id: as from /proc
    cache.executed(7, 7 * TICK_NS, 0, 0, "/bin/b", "b", exec_id=9, ktime_ns=T + 1000)
    assert cache.get(7, 7 * TICK_NS).prior is None                    # no collector needs it
    cache.attributed_upto("file", T)
    cache.executed(7, 7 * TICK_NS, 0, 0, "/bin/c", "c", exec_id=10, ktime_ns=T + 2000)
    proc = cache.get(7, 7 * TICK_NS)
    assert proc.image_at(9, T + 1500) == ("/bin/b", "b") and proc.image_at(10, T + 2500) == ("/bin/c", "c")
    seeded = ProcessCache(size=10, proc="/nonexistent")
    seeded.attributed_upto("file", T)
    seeded.executed(8, 8 * TICK_NS, 0, 0, "/bin/old", "old")
    seeded.executed(8, 8 * TICK_NS, 0, 0, "/bin/new", "new", exec_id=5, ktime_ns=T + 1000)
    proc = seeded.get(8, 8 * TICK_NS)
    assert proc.image_at(4, T + 999) == ("/bin/old", "old") and proc.image_at(5, T + 1001) == ("/bin/new", "new")


def test_replaced_images_per_process_are_bounded():
    # Event times are CLOCK_MONOTONIC ns, as the kernel stamps them, and recent:
    # replaced images are kept a minute at most behind the clock.
    T = time.monotonic_ns()
    cache = ProcessCache(size=10, proc="/nonexistent")
    cache.attributed_upto("socket", T)
    for n in range(1, 20):
        cache.executed(3, 3 * TICK_NS, 0, 0, f"/bin/{n}", str(n), exec_id=n, ktime_ns=T + n * 100)
    proc = cache.get(3, 3 * TICK_NS)
    assert [image[0] for image in proc.prior] == [15, 16, 17, 18]


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


def test_an_exited_process_lives_ttl_seconds():
    """process_ancestry_cache_ttl: an exited parent keeps giving its children
    their ancestry for ttl seconds, then goes (issue 21: the TTL was untested)."""
    cache = ProcessCache(size=1000, ttl=60, proc="/nonexistent")
    cache.executed(100, 10 * TICK_NS, 1, 0, "/usr/bin/parent", "parent")
    cache.forked(200, 20 * TICK_NS, 100, 10 * TICK_NS)
    exited = cache.exited_process(100, 10 * TICK_NS)
    t = exited.exited_at
    cache.expire(t + 59)
    assert cache.get(100, 10 * TICK_NS) is exited
    assert '"path": "/usr/bin/parent"' in cache.ancestry(200, 20 * TICK_NS)
    cache.expire(t + 61)
    assert cache.get(100, 10 * TICK_NS) is None
    assert cache.counters["expired_entries"] == 1


PODMAN_ID = "4f" * 32


def test_ancestry_entries_name_the_container_each_image_ran_in(tmp_path):
    """A chain from a host shell through podman into a container: entries of
    the container's processes carry its id, the host's "". The resolver is
    the real one, its cgroup map fed as the cgroup_mkdir tracepoint feeds it."""
    from vajrad.enrich.containers import CgroupMap, ContainerResolver
    cgroups = CgroupMap(root=str(tmp_path))
    host_cg, ctr_cg = 1001, 2002
    cgroups.mkdir(host_cg, "/user.slice/session-1.scope")
    cgroups.mkdir(ctr_cg, f"/machine.slice/libpod-{PODMAN_ID}.scope/container")
    resolver = ContainerResolver(cgroups)
    cache = ProcessCache(size=100, proc="/nonexistent")
    cache.containers = resolver
    cache.executed(10, 10 * TICK_NS, 1, 0, "/usr/bin/bash", "bash", cgroup_id=host_cg)
    cache.forked(11, 11 * TICK_NS, 10, 10 * TICK_NS, cgroup_id=host_cg)
    cache.executed(11, 11 * TICK_NS, 10, 10 * TICK_NS, "/usr/bin/podman", "podman run", cgroup_id=host_cg)
    # runc's child moves into the container's cgroup, then execs the entry point
    cache.forked(12, 12 * TICK_NS, 11, 11 * TICK_NS, cgroup_id=host_cg)
    cache.executed(12, 12 * TICK_NS, 11, 11 * TICK_NS, "/bin/sh", "sh -c work", cgroup_id=ctr_cg)
    cache.forked(13, 13 * TICK_NS, 12, 12 * TICK_NS, cgroup_id=ctr_cg)
    chain = json.loads(cache.ancestry(12, 12 * TICK_NS))
    assert [(e["pid"], e["container_id"]) for e in chain] == [(12, PODMAN_ID), (11, ""), (10, "")]
    # resolved once per cgroup, not per entry or row
    assert cache._container_ids == {ctr_cg: PODMAN_ID, host_cg: ""}
    assert cache.describe(12)["process"]["container_id"] == PODMAN_ID


def test_ancestry_entries_have_an_empty_container_id_without_the_containers_unit():
    cache = ProcessCache(size=100, proc="/nonexistent")
    cache.executed(10, 10 * TICK_NS, 1, 0, "/usr/bin/bash", "bash", cgroup_id=2002)
    chain = json.loads(cache.ancestry(10, 10 * TICK_NS))
    assert chain[0]["container_id"] == "" and cache._container_ids == {}


def test_a_process_read_from_proc_is_placed_by_its_cgroup_path(tmp_path):
    """Seeded processes (older than the daemon) have no record: their
    /proc/PID/cgroup path names the container."""
    from vajrad.enrich.containers import CgroupMap, ContainerResolver
    proc = tmp_path / "proc"
    for pid, ppid, cgroup in ((1, 0, "/init.scope"), (50, 1, f"/machine.slice/libpod-{PODMAN_ID}.scope")):
        d = proc / str(pid)
        d.mkdir(parents=True)
        (d / "stat").write_text(f"{pid} (x) S {ppid} " + " ".join(["0"] * 17) + f" {pid * 100} 0 0\n")
        (d / "cmdline").write_bytes(b"x\0")
        (d / "cgroup").write_text(f"0::{cgroup}\n")
    cache = ProcessCache(size=100, proc=str(proc))
    cache.containers = ContainerResolver(CgroupMap(root=str(tmp_path)))
    assert cache.seed() == 2
    chain = json.loads(cache.ancestry(50, 5000 * TICK_NS))
    assert [(e["pid"], e["container_id"]) for e in chain] == [(50, PODMAN_ID), (1, "")]

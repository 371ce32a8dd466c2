"""Process ancestry from the kernel's own fork, exec and exit events.

ProcessCache knows each process by (pid, start time), so a reused pid never
inherits a stranger's ancestors. It is fed by every fork, exec and exit,
seeded from /proc at start-up for processes older than the daemon, and keeps
an exited process for `ttl` seconds, so a short-lived chain still has its
full ancestry after its parents died. A running process is never evicted:
the size bound applies to exited processes only.

Each event names the image it happened under (exec_id, the kernel's
self_exec_id), and a process keeps the images an exec replaced until every
collector has attributed the rows older than that exec: a socket or file
call just before an exec is blamed on the program that made it.

Ancestry is a JSON array, [0] the immediate parent, in the shape of osquery
5.18.1's process-ancestry column: exe_name, pid, ppid, path, cmdline,
proc_time (start, unix s), proc_time_hr (start, unix ns) and pproc_time_hr
(the parent's proc_time_hr); and container_id, the container the image ran
in ("" for the host's own processes, or when the containers unit is off),
so a chain that crosses into a container shows where.

An ancestry text is built from a chain of AncestryNodes, one per process
image, each pointing at its parent's node: the chain is how the store keeps
ancestry (one side row per entry, not one text per row), and the text is
what every other surface reads.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK_NS = 1_000_000_000 // CLK_TCK


class BootClock:
    """CLOCK_BOOTTIME ns (task->start_boottime, /proc starttime) to unix ns."""

    def __init__(self):
        self.offset_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def unix_ns(self, boot_ns: int) -> int:
        return boot_ns + self.offset_ns


def key(pid: int, start_ns: int) -> int:
    """/proc gives start times in clock ticks, the kernel in ns: compare in
    ticks. One int, not a (pid, ticks) tuple: a third of the memory per entry
    (pids fit 22 bits, and 2**40 ticks are centuries of uptime)."""
    return (start_ns // TICK_NS) << 22 | pid


class AncestryNode:
    """One process image as an ancestry entry (its JSON object), and the node
    of its parent's image when it was built: an ancestry array is a chain of
    `depth` nodes. The store keeps each node once per event table (see
    store._SharedColumn); `stored` is its bookkeeping: side-row ids by table."""
    __slots__ = ("entry", "rest", "depth", "stored")

    def __init__(self, entry: str, rest: "AncestryNode | None", depth: int):
        self.entry, self.rest, self.depth = entry, rest, depth
        self.stored = None

    def text(self) -> "Ancestry":
        entries, node = [], self
        for _ in range(self.depth):
            entries.append(node.entry)
            node = node.rest
        return Ancestry("[" + ",".join(entries) + "]", self)


class Ancestry(str):
    """An ancestry JSON array that keeps the node chain it was built from,
    for the store; to everything else it is the text."""

    def __new__(cls, text: str, node: AncestryNode):
        self = super().__new__(cls, text)
        self.node = node
        return self


UNRESOLVED = object()     # Process.parent before it is looked up

# Images an exec replaced, kept per process at most (a chain of wrappers that
# exec one another: env, nice, a shell's exec); the oldest goes first.
PRIOR_IMAGES = 4
# However late a collector is, a replaced image is not kept longer than this.
PRIOR_MAX_AGE_NS = 60_000_000_000


class Process:
    """One process as the events describe it. Its ancestry node (`_node`) is
    this version of its image: it is rebuilt after an exec, and when the
    kernel's exact start times replace the tick-precise ones of /proc."""
    __slots__ = ("pid", "ppid", "start_ns", "parent_start_ns", "path", "cmdline", "_node",
                 "parent", "coarse", "exited_at", "exec_id", "prior", "cgroup")

    def __init__(self, pid, ppid, start_ns, parent_start_ns, path, cmdline, coarse=False, exec_id=None,
                 cgroup=0):
        self.pid, self.ppid = pid, ppid
        # Its cgroup: the id the kernel's records carry (cid), or the path
        # /proc/PID/cgroup names for one read from /proc; 0 unknown.
        self.cgroup = cgroup
        self.start_ns, self.parent_start_ns = start_ns, parent_start_ns
        self.path, self.cmdline = path, cmdline
        # The kernel's self_exec_id of the current image (None: read from
        # /proc, unknown), and the images execs replaced that some row may
        # still need: (exec_id, replaced at (CLOCK_MONOTONIC ns), path, cmdline),
        # oldest first; None when there are none, the common case.
        self.exec_id = exec_id
        self.prior: list | None = None
        self._node: AncestryNode | None = None
        # The parent it was born to, resolved once: a pointer, not a lookup per
        # event, and it keeps an evicted ancestor's entry alive while needed.
        self.parent: Process | None | object = UNRESOLVED
        # Read from /proc: start times known to the clock tick only, until
        # the kernel's events name them exactly (adopt_times).
        self.coarse = coarse
        self.exited_at = 0.0

    def set_image(self, path: str, cmdline: str) -> None:
        self.path, self.cmdline = path, cmdline
        self.changed()

    def image_at(self, exec_id: int | None, ktime_ns: int) -> tuple[str, str]:
        """(path, cmdline) of the image an event with this exec_id ran under.
        A replaced image whose exec_id is unknown (seeded from /proc) is
        matched by time: the event came before the exec that replaced it."""
        prior = self.prior
        if prior is not None and exec_id != self.exec_id:
            for image_id, replaced_ns, path, cmdline in prior:
                if image_id == exec_id if image_id is not None else ktime_ns < replaced_ns:
                    return path, cmdline
        return self.path, self.cmdline

    def changed(self) -> None:
        self._node = None

    def adopt_times(self, start_ns: int, parent_start_ns: int | None = None) -> None:
        """Takes the kernel's exact start times (ns) for the same process's
        and parent's; an entry seeded from /proc knows them only to the tick."""
        adopted = False
        if self.start_ns != start_ns and key(self.pid, self.start_ns) == key(self.pid, start_ns):
            self.start_ns, adopted = start_ns, True
        if parent_start_ns and self.parent_start_ns != parent_start_ns and \
                key(self.ppid, self.parent_start_ns) == key(self.ppid, parent_start_ns):
            self.parent_start_ns, adopted = parent_start_ns, True
        if adopted:
            self.changed()

    def entry_json(self, clock: BootClock, container_id: str = "") -> str:
        """This process as an ancestry entry; serialised once per image, by
        the node built for it (or here, for a process that has none yet)."""
        if self._node is not None:
            return self._node.entry
        start = clock.unix_ns(self.start_ns)
        # What json.dumps gives for this dict, built directly: it runs per exec.
        path = self.path
        return (f'{{"exe_name": {_quote(os.path.basename(path) if path else "")}, "pid": {self.pid}, '
                f'"ppid": {self.ppid}, "path": {_quote(path)}, "cmdline": {_quote(self.cmdline)}, '
                f'"proc_time": {start // 1_000_000_000}, "proc_time_hr": {start}, "pproc_time_hr": '
                f'{clock.unix_ns(self.parent_start_ns) if self.parent_start_ns else 0}, '
                f'"container_id": "{container_id}"}}')


LINEAGES_KEPT = 32
CONTAINER_IDS_KEPT = 4096    # cgroup -> container id answers cached
LINE_MAX = 1 << 16        # ancestors walked at most, against a malformed (cyclic) line
_quote = json.encoder.encode_basestring_ascii


class ProcessCache:
    def __init__(self, size: int = 1000, max_depth: int = 32, ttl: float = 300,
                 clock: BootClock | None = None, proc: str = "/proc"):
        self.max_size, self.max_depth, self.ttl = size, max_depth, ttl
        self.clock = clock or BootClock()
        self.proc = proc
        self.counters = {"cache_hits": 0, "cache_misses": 0, "evictions": 0, "expired_entries": 0,
                         "vanished_entries": 0}
        self.enabled = size > 0
        # Running processes, never evicted (they leave at their exit, or when
        # /proc shows one gone whose exit was lost: reconcile); exited ones in
        # the order they exited, which is also the order they expire and are
        # evicted in. max_size bounds the exited only.
        self.live: dict[int, Process] = {}
        self.exited: OrderedDict[int, Process] = OrderedDict()
        # Processes holding replaced images, in the order of those execs; and
        # by collector, the CLOCK_MONOTONIC ns before which every row it will
        # ever have has been attributed (see attributed_upto).
        self._held: deque[tuple[int, Process]] = deque()
        self._attributed: dict[str, int] = {}
        self._vanishing: set[int] = set()      # running entries /proc did not show, last reconcile
        # The ancestry JSON that starts at a process, for its children's rows,
        # by that process's node; only for the parents busy right now, since
        # each text is a few KB.
        self._lineages: OrderedDict[AncestryNode, str] = OrderedDict()
        # Fed on the collector's thread, read (stats, vajractl tree) on the loop's.
        self.lock = threading.RLock()
        # CLOCK_MONOTONIC ns up to which process events have been applied, and
        # how to have the process collector apply what it has now.
        self.synced_ns = 0
        self.request_sync: Callable[[], None] = lambda: None
        # The containers unit's ContainerResolver, when it runs (set by the
        # process collector); ancestry entries name their container through it.
        self.containers = None
        self._container_ids: dict = {}      # cgroup id (or /proc path) -> container id

    # --- feeding ------------------------------------------------------------
    def get(self, pid: int, start_ns: int) -> Process | None:
        k = key(pid, start_ns)
        proc = self.live.get(k)
        return proc if proc is not None else self.exited.get(k)

    def exact(self, pid: int, start_ns: int, parent_start_ns: int | None = None) -> Process | None:
        """The entry for what a kernel event names exactly; an entry seeded from
        /proc knows its start times only to the clock tick, and adopts the
        kernel's so that pproc_time_hr matches the parent's proc_time_hr."""
        proc = self.get(pid, start_ns)
        if proc is not None and proc.coarse:
            proc.adopt_times(start_ns, parent_start_ns)
        return proc

    def running(self, pid: int, start_ns: int) -> Process | None:
        """The process an event of another collector names (a socket call),
        from /proc when the process events have not told us about it yet."""
        return self.exact(pid, start_ns) or self._from_proc(pid, start_ns)

    def forked(self, pid: int, start_ns: int, ppid: int, parent_start_ns: int,
               exec_id: int | None = None, ktime_ns: int = 0, cgroup_id: int = 0) -> Process:
        """A new process: it runs the image its parent had at the fork (the
        one named by exec_id, which fork copies) until it execs."""
        k = key(pid, start_ns)
        if k in self.live or k in self.exited:      # its exec arrived first (perf buffer order)
            return self.exact(pid, start_ns, parent_start_ns)
        parent = self.exact(ppid, parent_start_ns) or self._from_proc(ppid, parent_start_ns)
        if parent is not None:
            path, cmdline = parent.image_at(exec_id, ktime_ns)
            proc = Process(pid, ppid, start_ns, parent_start_ns, path, cmdline, exec_id=exec_id, cgroup=cgroup_id)
            proc.parent = parent
        else:
            proc = Process(pid, ppid, start_ns, parent_start_ns, "", "", exec_id=exec_id, cgroup=cgroup_id)
        self._insert(k, proc)
        return proc

    def executed(self, pid: int, start_ns: int, ppid: int, parent_start_ns: int,
                 path: str, cmdline: str, exec_id: int | None = None, ktime_ns: int = 0,
                 cgroup_id: int = 0) -> Process:
        proc = self.exact(pid, start_ns)
        if proc is None:
            proc = Process(pid, ppid, start_ns, parent_start_ns, path, cmdline, exec_id=exec_id, cgroup=cgroup_id)
            self._insert(key(pid, start_ns), proc)
        else:
            if self._attributed:        # rows of other collectors may still need the old image
                self._hold_image(proc, ktime_ns)
            proc.set_image(path, cmdline)
            proc.exec_id = exec_id
            if cgroup_id:       # the new image's entry names the cgroup it was exec'd in
                proc.cgroup = cgroup_id
        return proc

    def _hold_image(self, proc: Process, ktime_ns: int) -> None:
        image = (proc.exec_id, ktime_ns, proc.path, proc.cmdline)
        if proc.prior is None:
            proc.prior = [image]
        else:
            proc.prior.append(image)
            if len(proc.prior) > PRIOR_IMAGES:
                del proc.prior[0]
        self._held.append((ktime_ns, proc))
        self.release_images(ktime_ns)

    def attributed_upto(self, collector: str, ktime_ns: int | None) -> None:
        """A collector has attributed every row it will have from before
        ktime_ns (None: it stopped, and needs nothing any more). Replaced images
        older than what every collector has attributed are let go."""
        if ktime_ns is None:
            self._attributed.pop(collector, None)
        else:
            self._attributed[collector] = ktime_ns
        self.release_images(time.monotonic_ns())

    def release_images(self, now_ns: int) -> None:
        held = self._held
        if not held:
            return
        upto = max(min(self._attributed.values(), default=now_ns), now_ns - PRIOR_MAX_AGE_NS)
        while held and held[0][0] < upto:
            _, proc = held.popleft()
            prior = proc.prior
            if prior is not None:
                kept = [image for image in prior if image[1] >= upto]
                proc.prior = kept or None

    def held_images(self) -> int:
        holders = {id(p): p for _, p in self._held}
        return sum(len(p.prior) for p in holders.values() if p.prior)

    def exited_process(self, pid: int, start_ns: int) -> Process | None:
        """Moves a process to the exited cache, where it lives `ttl` seconds
        or until max_size newer exits push it out."""
        k = key(pid, start_ns)
        proc = self.live.pop(k, None)
        if proc is None:
            return self.exact(pid, start_ns)
        if proc.coarse:
            proc.adopt_times(start_ns)
        now = time.monotonic()
        proc.exited_at = now
        exited = self.exited
        exited[k] = proc
        while len(exited) > self.max_size:
            exited.popitem(last=False)
            self.counters["evictions"] += 1
        self.expire(now)
        return proc

    def expire(self, now: float | None = None) -> None:
        deadline = (time.monotonic() if now is None else now) - self.ttl
        exited = self.exited
        while exited:
            k = next(iter(exited))
            if exited[k].exited_at > deadline:
                break
            del exited[k]
            self.counters["expired_entries"] += 1

    def _insert(self, k: int, proc: Process) -> None:
        """A running process: kept until it exits, whatever max_size says (an
        evicted running parent would cut every descendant's ancestry)."""
        if self.enabled:
            self.live[k] = proc

    def reconcile(self, alive: Callable[[int], int | None] | None = None) -> int:
        """Drops running entries whose process /proc shows gone twice in a
        row: their exit record was lost (a full buffer), and nothing else
        would ever end them. The first sighting only marks them, so an exit
        still on its way through the buffer is applied normally. alive(pid)
        gives a pid's start time in clock ticks, or None. Called now and then
        by the process collector, not per event; /proc is read outside the lock."""
        alive = alive or self._start_ticks
        with self.lock:
            entries = [(k, p.pid) for k, p in self.live.items()]
        gone = {k for k, pid in entries if alive(pid) != k >> 22}
        dropped = 0
        with self.lock:
            for k in gone & self._vanishing:
                if self.live.pop(k, None) is not None:
                    dropped += 1
            self._vanishing = gone
            self.counters["vanished_entries"] += dropped
        return dropped

    def _start_ticks(self, pid: int) -> int | None:
        try:
            with open(f"{self.proc}/{pid}/stat", "rb") as f:
                stat = f.read()
            return int(stat[stat.rindex(b")") + 2:].split()[19])
        except (OSError, ValueError, IndexError):
            return None

    # --- reading ------------------------------------------------------------
    def _parent(self, proc: Process) -> Process | None:
        """The process proc was born to, looked up once and then remembered."""
        if proc.parent is UNRESOLVED:
            parent = None
            if proc.ppid > 0:
                parent = self.get(proc.ppid, proc.parent_start_ns)
                if parent is None:
                    self.counters["cache_misses"] += 1
                    parent = self._from_proc(proc.ppid, proc.parent_start_ns)
            # Not found now is not found ever: a dead parent cannot come back.
            proc.parent = parent
        return proc.parent

    def lineage(self, first: Process | None) -> str:
        """JSON ancestry starting at `first` (the parent), up its birth line.

        Each process image gets its node once, on top of its parent's node as
        it was then: an ancestor that execs later, while this line lives on,
        is not seen in it. The texts of the busiest nodes are kept."""
        if not self.enabled or first is None:
            return "[]"
        node = first._node or self.node(first)
        memo = self._lineages
        text = memo.get(node)
        if text is not None:
            memo.move_to_end(node)
            self.counters["cache_hits"] += 1
            return text
        text = memo[node] = node.text()
        if len(memo) > LINEAGES_KEPT:
            memo.popitem(last=False)
        return text

    def node(self, first: Process) -> AncestryNode:
        """The ancestry node of first's image, building any missing above it.

        The walk goes up to the nearest ancestor that has its node, however
        far: a node cut at max_depth would give its own descendants too short
        an ancestry. Each process then gets its node once."""
        chain = []
        proc = first
        while proc is not None and proc._node is None and len(chain) < LINE_MAX:
            chain.append(proc)
            if proc.pid == 1:
                proc = None
                break
            parent = self._parent(proc)
            if parent is not None and proc.parent_start_ns and parent.start_ns != proc.parent_start_ns:
                # One side read the start from /proc, to the clock tick (a
                # whole number of ticks); the other has the kernel's: both
                # take the kernel's, so that the child's pproc_time_hr is its
                # parent's proc_time_hr in the line (a changed parent drops
                # its node and is rebuilt). Exact values never change back.
                if proc.parent_start_ns % TICK_NS:
                    parent.adopt_times(proc.parent_start_ns)
                elif parent.start_ns % TICK_NS and \
                        key(proc.ppid, proc.parent_start_ns) == key(parent.pid, parent.start_ns):
                    proc.parent_start_ns = parent.start_ns
                    proc.changed()
            proc = parent
        self.counters["cache_hits"] += len(chain)
        rest = proc._node if proc is not None else None
        clock, depth = self.clock, self.max_depth
        for proc in reversed(chain):
            rest = proc._node = AncestryNode(proc.entry_json(clock, self.container_id(proc)), rest,
                                             min(depth, 1 + (rest.depth if rest else 0)))
        return first._node

    def container_id(self, proc: Process) -> str:
        """The container proc's image runs in ("" on the host, or unknown),
        once per image (its entry is built once) and cached by cgroup."""
        resolver, cgroup = self.containers, proc.cgroup
        if resolver is None or not cgroup:
            return ""
        found = self._container_ids.get(cgroup)
        if found is None:
            if isinstance(cgroup, str):          # read from /proc: the path itself
                from vajrad.enrich.containers import parse_cgroup_path
                parsed = parse_cgroup_path(cgroup)
                found = parsed.container_id if parsed else ""
            else:
                found = resolver.lookup(cgroup, proc.pid)[0][0]
            if len(self._container_ids) >= CONTAINER_IDS_KEPT:
                self._container_ids.clear()
            self._container_ids[cgroup] = found
        return found

    def ancestry(self, ppid: int, parent_start_ns: int) -> str:
        """JSON ancestry of a process whose parent is (ppid, parent_start_ns)."""
        if not self.enabled or ppid <= 0:
            return "[]"
        first = self.get(ppid, parent_start_ns)
        if first is None:
            self.counters["cache_misses"] += 1
            first = self._from_proc(ppid, parent_start_ns)
        return self.lineage(first)

    def ancestry_of(self, proc: Process | None, ppid: int, parent_start_ns: int) -> str:
        """Ancestry of an event's process, given its cache entry when it has one:
        through the parent it was born to, so that an orphan adopted by a
        subreaper keeps its original line (the event's ppid is the current
        real parent, which is what the `parent` column shows)."""
        if proc is not None and proc.ppid:
            parent = self._parent(proc)
            if proc.ppid == ppid:            # not reparented: the event's parent time is exact
                if parent is not None and parent.coarse:
                    parent.adopt_times(parent_start_ns)
                if proc.coarse:
                    proc.adopt_times(proc.start_ns, parent_start_ns)
            return self.lineage(parent)
        self.exact(ppid, parent_start_ns)
        return self.ancestry(ppid, parent_start_ns)

    def describe(self, pid: int) -> dict | None:
        """The running process with this pid and its ancestry, for vajractl tree."""
        with self.lock:
            proc = self._running_by_pid({pid}).get(pid)
            if proc is None:
                return None
            entry = json.loads(proc.entry_json(self.clock, self.container_id(proc)))
            return {"process": entry, "ancestry": json.loads(self.lineage(self._parent(proc)))}

    def ancestry_by_pid(self, pids: set[int]) -> dict[int, str]:
        """Ancestry of running processes by pid alone, for live tables."""
        with self.lock:
            return {pid: self.lineage(self._parent(proc)) for pid, proc in self._running_by_pid(pids).items()}

    def _running_by_pid(self, pids: set[int]) -> dict[int, Process]:
        """The newest cached process of each pid; from /proc (and then cached)
        for those the cache does not hold. Callers hold the lock."""
        newest: dict[int, Process] = {}
        for proc in self.live.values():
            if proc.pid in pids and (proc.pid not in newest or proc.start_ns > newest[proc.pid].start_ns):
                newest[proc.pid] = proc
        for pid in pids - newest.keys():
            proc = self._read_proc(pid)
            if proc is not None:
                self._adopt(proc)
                newest[pid] = proc
        return newest

    def stats(self) -> dict:
        with self.lock:
            self.expire()
            return dict(self.counters, cache_size=len(self.live) + len(self.exited),
                        live_entries=len(self.live), exited_entries=len(self.exited),
                        held_images=self.held_images(), max_size=self.max_size)

    # --- /proc --------------------------------------------------------------
    def _read_proc(self, pid: int) -> Process | None:
        base = f"{self.proc}/{pid}"
        try:
            with open(f"{base}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            ppid, flags, start_ticks = int(fields[1]), int(fields[6]), int(fields[19])
            if flags & 0x00200000:          # a kernel thread
                return None
            with open(f"{base}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "backslashreplace") for a in f.read().split(b"\0")[:-1]]
            try:
                path = os.readlink(f"{base}/exe")
            except OSError:
                path = ""
            cgroup = self._proc_cgroup(base) if self.containers is not None else 0
        except (OSError, ValueError, IndexError):
            return None
        return Process(pid, ppid, start_ticks * TICK_NS, 0, path, " ".join(argv), coarse=True, cgroup=cgroup)

    @staticmethod
    def _proc_cgroup(base: str) -> str | int:
        """A /proc process's cgroup path: the v2 one, else the first v1 line
        that names a container (0: none)."""
        try:
            with open(f"{base}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return 0
        from vajrad.enrich.containers import parse_cgroup_path
        for line in lines:
            if line.startswith("0::"):
                return line[3:] or 0
        for line in lines:
            path = line.split(":", 2)[-1]
            if parse_cgroup_path(path):
                return path
        return 0

    def _from_proc(self, pid: int, start_ns: int) -> Process | None:
        """The fallback for a live process the events have not told us about;
        only when /proc shows the same process (pid and start time)."""
        if not self.enabled or pid <= 0:
            return None
        proc = self._read_proc(pid)
        if proc is None or key(pid, proc.start_ns) != key(pid, start_ns):
            return None
        self._adopt(proc)
        return proc

    def _adopt(self, proc: Process) -> None:
        """Caches a process read from /proc, with its parent's start time."""
        parent = self._read_proc(proc.ppid) if proc.ppid > 0 else None
        proc.parent_start_ns = parent.start_ns if parent else 0
        self._insert(key(proc.pid, proc.start_ns), proc)

    def seed(self) -> int:
        """Every running process, so that those older than the daemon have ancestry."""
        if not self.enabled:
            return 0
        found = {}
        for name in os.listdir(self.proc):
            if name.isdigit():
                proc = self._read_proc(int(name))
                if proc is not None:
                    found[proc.pid] = proc
        for proc in found.values():
            parent = found.get(proc.ppid)
            proc.parent_start_ns = parent.start_ns if parent else 0
            if parent is not None:
                proc.parent = parent
            self._insert(key(proc.pid, proc.start_ns), proc)
        return len(found)

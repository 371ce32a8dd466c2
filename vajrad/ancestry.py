"""Process ancestry from the kernel's own fork, exec and exit events.

ProcessCache knows each process by (pid, start time), so a reused pid never
inherits a stranger's ancestors. It is fed by every fork, exec and exit,
seeded from /proc at start-up for processes older than the daemon, and keeps
an exited process for `ttl` seconds, so a short-lived chain still has its
full ancestry after its parents died.

Ancestry is a JSON array, [0] the immediate parent, in the shape of osquery
5.18.1's process-ancestry column: exe_name, pid, ppid, path, cmdline,
proc_time (start, unix s), proc_time_hr (start, unix ns) and pproc_time_hr
(the parent's proc_time_hr).
"""
from __future__ import annotations

import json
import os
import threading
import time

import cachetools

CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK_NS = 1_000_000_000 // CLK_TCK


class BootClock:
    """CLOCK_BOOTTIME ns (task->start_boottime, /proc starttime) to unix ns."""

    def __init__(self):
        self.offset_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def unix_ns(self, boot_ns: int) -> int:
        return boot_ns + self.offset_ns


def key(pid: int, start_ns: int) -> tuple[int, int]:
    """/proc gives start times in clock ticks, the kernel in ns: compare in ticks."""
    return pid, start_ns // TICK_NS


class Process:
    __slots__ = ("pid", "ppid", "start_ns", "parent_start_ns", "path", "cmdline", "_json")

    def __init__(self, pid, ppid, start_ns, parent_start_ns, path, cmdline):
        self.pid, self.ppid = pid, ppid
        self.start_ns, self.parent_start_ns = start_ns, parent_start_ns
        self.path, self.cmdline = path, cmdline
        self._json: str | None = None

    def set_image(self, path: str, cmdline: str) -> None:
        self.path, self.cmdline, self._json = path, cmdline, None

    def entry_json(self, clock: BootClock) -> str:
        """This process as an ancestry entry, serialised once per image."""
        if self._json is None:
            start = clock.unix_ns(self.start_ns)
            self._json = json.dumps({
                "exe_name": os.path.basename(self.path) if self.path else "",
                "pid": self.pid, "ppid": self.ppid, "path": self.path, "cmdline": self.cmdline,
                "proc_time": start // 1_000_000_000, "proc_time_hr": start,
                "pproc_time_hr": clock.unix_ns(self.parent_start_ns) if self.parent_start_ns else 0,
            })
        return self._json


class _CountingLRU(cachetools.LRUCache):
    def __init__(self, maxsize, stats):
        super().__init__(maxsize)
        self._stats = stats

    def popitem(self):
        self._stats["evictions"] += 1
        return super().popitem()


class _CountingTTL(cachetools.TTLCache):
    def __init__(self, maxsize, ttl, stats):
        super().__init__(maxsize, ttl)
        self._stats = stats

    def popitem(self):
        self._stats["evictions"] += 1
        return super().popitem()

    def expire(self, time=None):
        expired = super().expire(time)
        self._stats["expired_entries"] += len(expired) if expired else 0
        return expired


class ProcessCache:
    def __init__(self, size: int = 1000, max_depth: int = 32, ttl: float = 300,
                 clock: BootClock | None = None, proc: str = "/proc"):
        self.max_size, self.max_depth, self.ttl = size, max_depth, ttl
        self.clock = clock or BootClock()
        self.proc = proc
        self.counters = {"cache_hits": 0, "cache_misses": 0, "evictions": 0, "expired_entries": 0}
        self.enabled = size > 0
        self.live = _CountingLRU(max(size, 1), self.counters)
        self.exited = _CountingTTL(max(size, 1), max(ttl, 1e-3), self.counters)
        # Fed on the collector's thread, read (stats, vajractl tree) on the loop's.
        self.lock = threading.RLock()

    # --- feeding ------------------------------------------------------------
    def get(self, pid: int, start_ns: int) -> Process | None:
        k = key(pid, start_ns)
        return self.live.get(k) or self.exited.get(k)

    def exact(self, pid: int, start_ns: int, parent_start_ns: int | None = None) -> Process | None:
        """The entry for what a kernel event names exactly; an entry seeded from
        /proc knows its start times only to the clock tick, and adopts the
        kernel's so that pproc_time_hr matches the parent's proc_time_hr."""
        proc = self.get(pid, start_ns)
        if proc is not None:
            if proc.start_ns != start_ns:
                proc.start_ns, proc._json = start_ns, None
            if parent_start_ns and proc.parent_start_ns != parent_start_ns and \
                    key(proc.ppid, proc.parent_start_ns) == key(proc.ppid, parent_start_ns):
                proc.parent_start_ns, proc._json = parent_start_ns, None
        return proc

    def forked(self, pid: int, start_ns: int, ppid: int, parent_start_ns: int) -> Process:
        """A new process: it runs its parent's image until it execs."""
        found = self.exact(pid, start_ns, parent_start_ns)
        if found is not None:        # its exec arrived first (perf buffer order)
            return found
        parent = self.exact(ppid, parent_start_ns) or self._from_proc(ppid, parent_start_ns)
        proc = Process(pid, ppid, start_ns, parent_start_ns,
                       parent.path if parent else "", parent.cmdline if parent else "")
        self._insert(key(pid, start_ns), proc)
        return proc

    def executed(self, pid: int, start_ns: int, ppid: int, parent_start_ns: int,
                 path: str, cmdline: str) -> Process:
        proc = self.exact(pid, start_ns)
        if proc is None:
            proc = Process(pid, ppid, start_ns, parent_start_ns, path, cmdline)
            self._insert(key(pid, start_ns), proc)
        else:
            proc.set_image(path, cmdline)
        return proc

    def exited_process(self, pid: int, start_ns: int) -> Process | None:
        """Moves a process to the exited cache, where it lives `ttl` seconds."""
        proc = self.exact(pid, start_ns)
        k = key(pid, start_ns)
        if self.live.pop(k, None) is not None:
            self.exited[k] = proc
        return proc

    def _insert(self, k: tuple[int, int], proc: Process) -> None:
        """One bound for running and exited processes together; the exited
        (oldest first) make room before any running one does."""
        self.live[k] = proc
        while len(self.live) + len(self.exited) > self.max_size:
            (self.exited if len(self.exited) else self.live).popitem()

    # --- reading ------------------------------------------------------------
    def ancestry(self, ppid: int, parent_start_ns: int) -> str:
        """JSON ancestry of a process whose parent is (ppid, parent_start_ns)."""
        if not self.enabled:
            return "[]"
        parts = []
        pid, start = ppid, parent_start_ns
        while pid > 0 and len(parts) < self.max_depth:
            proc = self.get(pid, start)
            if proc is None:
                self.counters["cache_misses"] += 1
                proc = self._from_proc(pid, start)
                if proc is None:
                    break
            else:
                self.counters["cache_hits"] += 1
            parts.append(proc.entry_json(self.clock))
            if pid == 1:
                break
            pid, start = proc.ppid, proc.parent_start_ns
        return "[" + ",".join(parts) + "]"

    def ancestry_of(self, proc: Process | None, ppid: int, parent_start_ns: int) -> str:
        """Ancestry of an event's process, given its cache entry when it has one:
        through the parent it was born to, so that an orphan adopted by a
        subreaper keeps its original line (the event's ppid is the current
        real parent, which is what the `parent` column shows)."""
        if proc is not None and proc.ppid:
            if proc.ppid == ppid:            # not reparented: the event's parent time is exact
                self.exact(ppid, parent_start_ns)
            return self.ancestry(proc.ppid, proc.parent_start_ns)
        self.exact(ppid, parent_start_ns)
        return self.ancestry(ppid, parent_start_ns)

    def describe(self, pid: int) -> dict | None:
        """The running process with this pid and its ancestry, for vajractl tree."""
        with self.lock:
            found = [p for p in self.live.values() if p.pid == pid]
            proc = max(found, key=lambda p: p.start_ns) if found else self._read_proc(pid)
            if proc is None:
                return None
            if not found:
                self._adopt(proc)
            entry = json.loads(proc.entry_json(self.clock))
            return {"process": entry, "ancestry": json.loads(self.ancestry(proc.ppid, proc.parent_start_ns))}

    def stats(self) -> dict:
        with self.lock:
            self.exited.expire()
            return dict(self.counters, cache_size=len(self.live) + len(self.exited), max_size=self.max_size)

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
        except (OSError, ValueError, IndexError):
            return None
        return Process(pid, ppid, start_ticks * TICK_NS, 0, path, " ".join(argv))

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
            self._insert(key(proc.pid, proc.start_ns), proc)
        return len(found)

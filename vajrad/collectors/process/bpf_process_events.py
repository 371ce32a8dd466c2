"""Process auditing through bpf/process.bpf.c: rows of bpf_process_events,
each with its ancestry from the ProcessCache."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from vajrad.kernel import abi as bpf_abi
from vajrad.enrich.containers import HOST
from vajrad.enrich.process_cache import ProcessCache
from vajrad.kernel.program import BpfProgram
from vajrad.kernel.environment import KernelEnv
from vajrad.tables import TABLES
from vajrad.collectors.bpf import BpfCollector, MonotonicClock

log = logging.getLogger(__name__)

TABLE = "bpf_process_events"
RECONCILE_EVERY = 60.0      # s between checks of running entries against /proc


_quote = json.encoder.encode_basestring_ascii   # json.dumps of a str, without its dispatch


def decode_args(raw: bytes) -> list[str]:
    # One decode for all of argv: NUL is ASCII, so the split after it cuts
    # exactly where a split of the bytes would.
    parts = raw.decode("utf-8", "backslashreplace").split("\0")
    if parts[-1] == "":
        parts.pop()
    return parts


# The order EventDecoder fills rows in, as the table declares its columns
# (checked below): rows are lists, the store's fast path.
ROW = ("tid", "pid", "parent", "uid", "gid", "euid", "egid", "auid", "sid", "tty", "cid", "exit_code",
       "probe_error", "partial", "syscall", "path", "cwd", "cmdline", "duration", "json_cmdline",
       "ancestry", "ntime", "container_id", "container_name", "container_image", "container_runtime",
       "pod_name", "pod_namespace", "pod_uid", "pid_namespace", "mnt_namespace", "net_namespace", "host_identifier", "is_open", "time", "eid")
if TABLES[TABLE].column_names != ROW:
    raise ImportError(f"collectors/process.py: ROW does not follow the columns of {TABLE}: "
                      f"{TABLES[TABLE].column_names}")


class EventDecoder:
    """Raw kernel records to rows (lists, in ROW order); keeps the ProcessCache
    current on the way.

    This runs once per event, so it decodes each record with one struct call
    and builds each row as one list display."""

    def __init__(self, cache: ProcessCache, clock: MonotonicClock, resolve_container=None):
        self.cache, self.clock = cache, clock
        self.resolve_container = resolve_container or (lambda cgroup_id, pid=0: (HOST, True))
        self._ttys: dict[bytes, str] = {}

    def row(self, buf, off: int, size: int) -> list:
        # Fork and exit records are shorter than any exec record (even padded,
        # as the perf buffer pads them): the size says which struct to read.
        if size < bpf_abi.EXEC_DATA_OFFSET:
            return self.task_row(buf, off)
        return self.exec_row(buf, off)

    def _tty(self, raw: bytes) -> str:
        if not raw[0]:                  # no controlling terminal, the common case
            return ""
        tty = self._ttys.get(raw)
        if tty is None:
            if len(self._ttys) > 1024:
                self._ttys.clear()
            tty = raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
            # The kernel names a pseudo-terminal's slave "pts<N>"; users (ps,
            # w, who) and /dev know it as pts/<N>.
            if tty.startswith("pts") and tty[3:].isdigit():
                tty = "pts/" + tty[3:]
            self._ttys[raw] = tty
        return tty

    def exec_row(self, buf, off: int) -> list:
        (kind, flags, ktime, start, pstart, pid, tid, ppid, uid, gid, euid, egid, auid, sid, exec_id, cgroup, tty,
         pid_ns, mnt_ns, net_ns, duration, code, _old_tid, a, c, x, _pos) = bpf_abi.EXEC_EVENT.unpack_from(buf, off)
        if kind != bpf_abi.EV_EXEC:
            raise ValueError(f"unknown event type {kind}")
        data = off + bpf_abi.EXEC_DATA_OFFSET
        raw = buf[data:data + a + c + x]
        argv = decode_args(raw[:a])
        cwd = bpf_abi.join_components(raw[a:a + c])
        if flags & bpf_abi.F_EXE_AS_GIVEN:        # a failed exec: what the caller asked for
            given = raw[a + c:].rstrip(b"\0").decode("utf-8", "backslashreplace")
            path = os.path.normpath(os.path.join(cwd, given)) if given else ""
        else:
            path = bpf_abi.join_components(raw[a + c:])
        cmdline = " ".join(argv)
        cache = self.cache
        with cache.lock:
            proc = cache.executed(pid, start, ppid, pstart, path, cmdline, exec_id, ktime, cgroup) if code == 0 \
                else cache.exact(pid, start)
            ancestry = cache.ancestry_of(proc, ppid, pstart)
        return [tid, pid, ppid, uid, gid, euid, egid, auid, sid, self._tty(tty), cgroup, str(code),
                flags & 0xF, 0, "exec", path, cwd, cmdline, duration,
                "[" + ", ".join([_quote(a) for a in argv]) + "]",
                ancestry, str(ktime), *self.resolve_container(cgroup, pid)[0], pid_ns, mnt_ns, net_ns,
                None, 0, (ktime + self.clock.offset_ns) // 1_000_000_000, None]

    def task_row(self, buf, off: int) -> list:
        (kind, flags, ktime, start, pstart, pid, tid, ppid, uid, gid, euid, egid, auid, sid, exec_id, cgroup, tty,
         pid_ns, mnt_ns, net_ns, duration, code, fork_kind) = bpf_abi.TASK_EVENT.unpack_from(buf, off)
        cache = self.cache
        with cache.lock:
            if kind == bpf_abi.EV_FORK:
                proc = cache.forked(pid, start, ppid, pstart, exec_id, ktime, cgroup)
                syscall, exit_code, duration = bpf_abi.FORK_KINDS.get(fork_kind, "clone"), "0", 0
            elif kind != bpf_abi.EV_EXIT:
                raise ValueError(f"unknown event type {kind}")
            else:
                proc = cache.exited_process(pid, start)
                syscall = "exit"
                signal = code & 0x7F          # the wait status: -N when killed by signal N
                exit_code = str(-signal) if signal else str((code >> 8) & 0xFF)
            ancestry = cache.ancestry_of(proc, ppid, pstart)
        if proc is not None and (proc.path or proc.cmdline):
            path, cmdline, partial = proc.path, proc.cmdline, 0
        else:
            path, cmdline, partial = "", "", 1
        return [tid, pid, ppid, uid, gid, euid, egid, auid, sid, self._tty(tty), cgroup, exit_code,
                flags & 0xF, partial, syscall, path, "", cmdline, duration, None,
                ancestry, str(ktime), *self.resolve_container(cgroup, pid)[0], pid_ns, mnt_ns, net_ns,
                None, 0, (ktime + self.clock.offset_ns) // 1_000_000_000, None]


class ProcessCollector(BpfCollector):
    name = "process"
    tables = (TABLE,)
    table = TABLE
    # Drains twice as far apart as the other collectors: larger batches keep
    # the per-row work warm (at 1,000 exec/s, 0.5% of a core less than at
    # 200 ms). Collectors whose rows wait for ours nudge a drain instead.
    poll_ms = 400

    def __init__(self, kenv: KernelEnv, output: str = "auto", cache: ProcessCache | None = None,
                 cmdline_max_bytes: int = 4096, containers=None):
        super().__init__(BpfProgram("process.bpf.c", kenv, output, {"VAJRA_ARGS_LIMIT": cmdline_max_bytes}))
        self.cache = cache or ProcessCache()
        self.use_containers(containers)
        self.cache.containers = containers      # ancestry entries name their container
        self.decoder = EventDecoder(self.cache, self.clock, self.resolve_container)
        self.row = self.decoder.row
        self.cache.request_sync = self.program.nudge
        self._reconciled = time.monotonic()

    async def prepare(self) -> None:
        # Seeded after attaching, so that nothing forked in between is missed.
        seeded = await asyncio.to_thread(self.cache.seed)
        log.info("process cache seeded with %d running processes", seeded)

    def _after_poll(self, final: bool = False) -> None:
        # Other collectors attribute their events only once the cache has seen
        # every exec and fork before them.
        self.cache.synced_ns = self.program.synced_ns
        now = time.monotonic()
        if now - self._reconciled > RECONCILE_EVERY and not final:
            # Running entries are never evicted; one whose exit record was
            # lost would stay for ever without this.
            self._reconciled = now
            dropped = self.cache.reconcile()
            if dropped:
                log.warning("process cache: %d running entries dropped, /proc shows them gone "
                            "(their exit records were lost)", dropped)

    def snapshots(self) -> dict:
        return {"process_ancestry_cache_stats": lambda: [self.cache.stats()]}

"""Process auditing through bpf/process.bpf.c: rows of bpf_process_events,
each with its ancestry from the ProcessCache."""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import time

from .. import bpf_abi
from ..ancestry import ProcessCache
from ..bpf_program import BpfProgram
from ..kernel import KernelEnv
from . import Collector, PollingThread

log = logging.getLogger(__name__)

POLL_MS = 50
MAX_BATCH = 2048
TABLE = "bpf_process_events"


class MonotonicClock:
    """Converts bpf_ktime_get_ns() (CLOCK_MONOTONIC) to unix time; the offset is
    refreshed so that a wall-clock step is followed within a second."""

    def __init__(self):
        self.refresh()

    def refresh(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()
        self.stamp = time.monotonic()

    def unix_seconds(self, ktime_ns: int) -> int:
        return (ktime_ns + self.offset_ns) // 1_000_000_000


def decode_args(raw: bytes) -> list[str]:
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "backslashreplace") for p in parts]


def exit_status(wait_status: int) -> str:
    """The exit status, or -N for a process killed by signal N."""
    signal = wait_status & 0x7F
    return str(-signal) if signal else str((wait_status >> 8) & 0xFF)


class EventDecoder:
    """Raw kernel records to rows; keeps the ProcessCache current on the way."""

    def __init__(self, cache: ProcessCache, clock: MonotonicClock):
        self.cache, self.clock = cache, clock

    def common(self, h: bpf_abi.ProcHeader) -> dict:
        return {
            "tid": h.tid, "pid": h.pid, "parent": h.ppid, "uid": h.uid, "gid": h.gid,
            "euid": h.euid, "egid": h.egid, "auid": h.auid, "sid": h.sid,
            "tty": h.tty.decode("utf-8", "backslashreplace"), "cid": h.cgroup_id,
            "probe_error": h.flags & 0xF, "ntime": str(h.ktime_ns),
            "time": self.clock.unix_seconds(h.ktime_ns),
        }

    def row(self, addr: int) -> dict:
        h = bpf_abi.ProcHeader.from_address(addr)
        if h.type == bpf_abi.EV_EXEC:
            return self.exec_row(addr, h)
        if h.type in (bpf_abi.EV_FORK, bpf_abi.EV_EXIT):
            return self.task_row(bpf_abi.TaskEvent.from_address(addr), h)
        raise ValueError(f"unknown event type {h.type}")

    def exec_row(self, addr: int, h: bpf_abi.ProcHeader) -> dict:
        e = bpf_abi.ExecEvent.from_address(addr)
        a, c, x = e.args_len, e.cwd_len, e.exe_len
        raw = ctypes.string_at(addr + bpf_abi.EXEC_DATA_OFFSET, a + c + x)
        argv = decode_args(raw[:a])
        cwd = bpf_abi.join_components(raw[a:a + c])
        if h.flags & bpf_abi.F_EXE_AS_GIVEN:      # a failed exec: what the caller asked for
            given = raw[a + c:].rstrip(b"\0").decode("utf-8", "backslashreplace")
            path = os.path.normpath(os.path.join(cwd, given)) if given else ""
        else:
            path = bpf_abi.join_components(raw[a + c:])
        cmdline = " ".join(argv)
        row = self.common(h)
        row.update(syscall="exec", exit_code=str(e.exit_code), path=path, cwd=cwd, cmdline=cmdline,
                   json_cmdline=json.dumps(argv), duration=e.duration_ns, partial=0)
        with self.cache.lock:
            proc = self.cache.executed(h.pid, h.start_ns, h.ppid, h.parent_start_ns, path, cmdline) \
                if e.exit_code == 0 else self.cache.exact(h.pid, h.start_ns)
            row["ancestry"] = self.cache.ancestry_of(proc, h.ppid, h.parent_start_ns)
        return row

    def task_row(self, e: bpf_abi.TaskEvent, h: bpf_abi.ProcHeader) -> dict:
        row = self.common(h)
        with self.cache.lock:
            if h.type == bpf_abi.EV_FORK:
                proc = self.cache.forked(h.pid, h.start_ns, h.ppid, h.parent_start_ns)
                row.update(syscall=bpf_abi.FORK_KINDS.get(e.fork_kind, "clone"), exit_code="0", duration=0)
            else:
                proc = self.cache.exited_process(h.pid, h.start_ns)
                row.update(syscall="exit", exit_code=exit_status(e.exit_code), duration=e.duration_ns)
            row["ancestry"] = self.cache.ancestry_of(proc, h.ppid, h.parent_start_ns)
        known = proc is not None and bool(proc.path or proc.cmdline)
        row.update(path=proc.path if known else "", cmdline=proc.cmdline if known else "", cwd="",
                   partial=0 if known else 1, json_cmdline=None)
        return row


class ProcessCollector(Collector):
    name = "process"
    tables = (TABLE,)

    def __init__(self, kenv: KernelEnv, output: str = "auto", cache: ProcessCache | None = None):
        super().__init__()
        self.program = BpfProgram("process.bpf.c", kenv, output)
        self.clock = MonotonicClock()
        self.cache = cache or ProcessCache()
        self.decoder = EventDecoder(self.cache, self.clock)
        self._pending: list[dict] = []
        self._thread: PollingThread | None = None

    async def start(self) -> None:
        self._open_channel()
        self.state = "starting"
        try:
            await asyncio.to_thread(self.program.load)
            # Seeded after attaching, so that nothing forked in between is missed.
            seeded = await asyncio.to_thread(self.cache.seed)
            log.info("process cache seeded with %d running processes", seeded)
            self.program.open_events(self._on_event)
        except Exception as e:
            self.state, self.error = "failed", str(e)
            raise
        self._thread = PollingThread("vajra-process", self._poll_once)
        self._thread.start()
        self.state = "running"

    def _on_event(self, addr: int, size: int) -> None:
        # Runs on the polling thread, inside BCC's callback.
        try:
            self._pending.append(self.decoder.row(addr))
        except Exception:  # a malformed record must not kill the poller
            self.dropped += 1
            log.exception("process: undecodable event of %d bytes", size)
            return
        if len(self._pending) >= MAX_BATCH:
            self._flush()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self.captured += len(batch)
        self._deliver((TABLE, batch))

    def _poll_once(self) -> None:
        self.program.poll(POLL_MS)
        if self._pending:
            self._flush()
        if time.monotonic() - self.clock.stamp > 1.0:
            self.clock.refresh()

    async def stop(self) -> None:
        if self._thread:
            self._thread.stop()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.program.close()
        if self._queue is not None:
            self._deliver(None)
        self.state = "stopped"

    @property
    def healthy(self) -> bool:
        return self.state == "running" and self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        s = super().stats()
        s["kernel_lost"] = self.program.kernel_lost() if self.program.bpf else 0
        s["output"] = self.program.output
        return s

    def snapshots(self) -> dict:
        return {"process_ancestry_cache_stats": lambda: [self.cache.stats()]}

    def describe_process(self, pid: int) -> dict | None:
        return self.cache.describe(pid)

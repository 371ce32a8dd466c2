"""Process auditing through bpf/process.bpf.c: rows of bpf_process_events."""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import time

from .. import bpf_abi
from ..bpf_program import BpfProgram
from ..kernel import KernelEnv
from . import Collector, PollingThread

log = logging.getLogger(__name__)

POLL_MS = 50
MAX_BATCH = 2048


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


def exec_row(addr: int, clock: MonotonicClock) -> dict:
    e = bpf_abi.ExecEvent.from_address(addr)
    h = e.hdr
    a, c, x = e.args_len, e.cwd_len, e.exe_len
    raw = ctypes.string_at(addr + bpf_abi.EXEC_DATA_OFFSET, a + c + x)
    argv = decode_args(raw[:a])
    return {
        "tid": h.tid, "pid": h.pid, "parent": h.ppid, "uid": h.uid, "gid": h.gid,
        "cid": h.cgroup_id, "exit_code": "0", "probe_error": h.flags, "syscall": "exec",
        "path": bpf_abi.join_components(raw[a + c:]),
        "cwd": bpf_abi.join_components(raw[a:a + c]),
        "cmdline": " ".join(argv), "json_cmdline": json.dumps(argv),
        "duration": e.duration_ns, "ntime": str(h.ktime_ns),
        "time": clock.unix_seconds(h.ktime_ns),
    }


class ProcessCollector(Collector):
    name = "process"
    tables = ("bpf_process_events",)

    def __init__(self, kenv: KernelEnv, output: str = "auto"):
        super().__init__()
        self.program = BpfProgram("process.bpf.c", kenv, output)
        self.clock = MonotonicClock()
        self._pending: list[dict] = []
        self._thread: PollingThread | None = None

    async def start(self) -> None:
        self._open_channel()
        self.state = "starting"
        try:
            await asyncio.to_thread(self.program.load)
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
            self._pending.append(exec_row(addr, self.clock))
        except Exception:  # a malformed record must not kill the poller
            self.dropped += 1
            log.exception("process: undecodable event of %d bytes", size)
            return
        if len(self._pending) >= MAX_BATCH:
            self._flush()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self.captured += len(batch)
        self._deliver(("bpf_process_events", batch))

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

"""Signals sent to watched products' processes, from the kernel
(bpf/signal.bpf.c at signal:signal_generate, filtered in the kernel to the
pids the unit puts in its `watched` map): who sent which signal to which
process, even when no command ran (a shell's builtin kill, a kill() call)."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from vajrad.collectors.base import PollingThread

log = logging.getLogger(__name__)

POLL_MS = 100


class SignalEvent(ctypes.Structure):
    """Mirror of struct vajra_signal_event (checked by a _Static_assert at compile time)."""
    _fields_ = [("ktime_ns", ctypes.c_uint64), ("sender_tgid", ctypes.c_uint32), ("sender_tid", ctypes.c_uint32),
                ("sender_uid", ctypes.c_uint32), ("target_pid", ctypes.c_uint32), ("sig", ctypes.c_int32),
                ("code", ctypes.c_int32), ("result", ctypes.c_int32), ("pad", ctypes.c_uint32),
                ("sender_comm", ctypes.c_char * 16), ("target_comm", ctypes.c_char * 16)]


@dataclass(frozen=True)
class Signal:
    ktime_ns: int
    sender: int
    sender_uid: int
    sender_comm: str
    target: int
    sig: int
    result: int          # 0 delivered, 1 ignored, 2 already pending, 3 overflow, 4 lost info


class SignalWatch:
    """Loads the program, keeps its `watched` map equal to the pids it is
    given, and hands each record to on_signal on the event loop."""

    def __init__(self, kenv, output: str, on_signal: Callable[[Signal], None]):
        from vajrad.kernel.program import BpfProgram
        self.program = BpfProgram("signal.bpf.c", kenv, output,
                                  defines={"VAJRA_EXPECT_SIGNAL_EVENT_SIZE": ctypes.sizeof(SignalEvent)})
        self.on_signal = on_signal
        self.records = 0
        self._watched: set[int] = set()
        self._lock = threading.Lock()
        self._thread: PollingThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: str | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.program.load)
        self.program.open_events(self._on_record)
        self._thread = PollingThread("vajra-signals", lambda: self.program.poll(POLL_MS), self._died)
        self._thread.start()

    def _died(self, error: BaseException) -> None:
        self.error = f"signal polling thread died: {error!r}"

    def _on_record(self, buf, off: int, size: int) -> None:
        if size < ctypes.sizeof(SignalEvent):
            return
        raw = bytes(buf[off:off + ctypes.sizeof(SignalEvent)])
        e = SignalEvent.from_buffer_copy(raw)
        self.records += 1
        sig = Signal(e.ktime_ns, e.sender_tgid, e.sender_uid, e.sender_comm.decode(errors="replace"),
                     e.target_pid, e.sig, e.result)
        self._loop.call_soon_threadsafe(self.on_signal, sig)

    def watch(self, pids: set[int]) -> None:
        """Makes the kernel's map hold exactly these pids."""
        if self.program.bpf is None:
            return
        with self._lock:
            table = self.program.bpf["watched"]
            for pid in self._watched - pids:
                try:
                    del table[ctypes.c_uint32(pid)]
                except KeyError:
                    pass
            for pid in pids - self._watched:
                table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            self._watched = set(pids)

    async def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.program.detach()
        self.program.close()

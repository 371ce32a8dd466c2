"""Compiles a bpf/*.bpf.c program with BCC and drains its output buffer."""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import time
from typing import Callable

from vajrad.kernel import abi as bpf_abi
from vajrad.errors import CollectorError
from vajrad.kernel.environment import KernelEnv
from vajrad.kernel.ringbuf import RingBufferReader

log = logging.getLogger(__name__)

RINGBUF_PAGES = 2048          # 8 MiB shared by all CPUs
PERF_PAGES_PER_CPU = 256      # 1 MiB per CPU
# Records per CPU between wakeups: the perf buffer counts records, not bytes,
# and 64 of the largest exec records still fit in one CPU's buffer.
PERF_WAKEUP_EVENTS = 64
SPLICED_HEADER = "common.bpf.h"


def bpf_source_dir() -> str:
    """bpf/ beside the package in a checkout, else the installed copy: pip's
    data files land under sys.prefix (a venv), /usr/local (a system-wide pip)
    or /usr (the Debian package)."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = list(dict.fromkeys([
        os.environ.get("VAJRA_BPF_DIR", ""),
        os.path.join(checkout, "bpf"),
        os.path.join(sys.prefix, "share", "vajra", "bpf"),
        "/usr/local/share/vajra/bpf",
        "/usr/share/vajra/bpf",
    ]))
    for d in candidates:
        if d and os.path.exists(os.path.join(d, "vajra.h")):
            return d
    raise CollectorError("bpf", "BPF sources not found (looked in " + ", ".join(c for c in candidates if c) + ")")


class BpfProgram:
    def __init__(self, source: str, kenv: KernelEnv, output: str = "auto", defines: dict | None = None,
                 tail_calls: dict[str, tuple[str, ...]] | None = None):
        if output == "auto":
            output = "ringbuf" if kenv.has_ringbuf else "perf"
        if output == "ringbuf" and not kenv.has_ringbuf:
            raise CollectorError(source, f"kernel {kenv.release} has no BPF ring buffer (5.8+); use bpf_output=perf")
        self.source, self.kenv, self.output = source, kenv, output
        self.defines = dict(defines or {})      # the program's own -D settings, from the config
        # BPF_PROG_ARRAY name -> the functions it holds, in slot order
        self.tail_calls = dict(tail_calls or {})
        self.bpf = None
        self._perf_lost = 0
        self._reader: RingBufferReader | None = None
        self._records = 0       # through BCC's consumers; the ring reader counts its own
        self._wakeups: int | None = None
        # bpf_ktime_get_ns() (CLOCK_MONOTONIC) up to which every record has
        # been handed over: how far this program's events are known.
        self.synced_ns = 0

    def cflags(self) -> list[str]:
        flags = list(self.kenv.cflags) + [f"-I{bpf_source_dir()}"]
        flags += [f"-D{k}={v}" for k, v in bpf_abi.ABI_CHECKS.items()]
        flags += [f"-D{k}={v}" for k, v in self.defines.items()]
        if self.output == "ringbuf":
            flags += ["-DVAJRA_RINGBUF=1", f"-DVAJRA_RINGBUF_PAGES={RINGBUF_PAGES}"]
        return flags

    def text(self) -> str:
        """The program's source with bpf/common.bpf.h spliced in where it is
        included: BCC turns map method calls into BPF helpers only in the
        file it was given, and the shared helpers make such calls."""
        d = bpf_source_dir()
        with open(os.path.join(d, self.source)) as f:
            source = f.read()
        with open(os.path.join(d, SPLICED_HEADER)) as f:
            common = f.read()
        include = f'#include "{SPLICED_HEADER}"'
        if include not in source:
            return source
        before, after = source.split(include, 1)
        resume = before.count("\n") + 2        # compiler messages keep naming the right lines
        return f'{before}#line 1 "{SPLICED_HEADER}"\n{common}\n#line {resume} "{self.source}"{after}'

    def load(self) -> None:
        """Compiles and attaches every TRACEPOINT_PROBE. Blocking (~0.3 s)."""
        from bcc import BPF  # imported late: only the collectors need libbcc
        try:
            self.bpf = BPF(text=self.text().encode(), cflags=self.cflags())
            for array, functions in self.tail_calls.items():
                slots = self.bpf[array]
                for slot, name in enumerate(functions):
                    slots[ctypes.c_int(slot)] = ctypes.c_int(self.bpf.load_func(name, BPF.TRACEPOINT).fd)
        except Exception as e:  # BCC raises bare Exception with the compiler output on stderr
            raise CollectorError(self.source, f"failed to compile or attach: {e}") from e

    def open_events(self, handler: Callable[[object, int, int], None]) -> None:
        """handler(buffer, offset, size) for each event, in order; the buffer is
        valid during the call only."""
        table = self.bpf["events"]
        if self.output == "ringbuf" and platform.machine() == "x86_64":
            self._reader = RingBufferReader(table.map_fd, table.max_entries, handler)
            return

        def counted(data, size):
            self._records += 1
            handler(ctypes.string_at(data, size), 0, size)

        if self.output == "ringbuf":
            table.open_ring_buffer(lambda _ctx, data, size: counted(data, size))
        else:
            def lost(count):
                self._perf_lost += count
            table.open_perf_buffer(lambda _cpu, data, size: counted(data, size),
                                   page_cnt=PERF_PAGES_PER_CPU, lost_cb=lost,
                                   wakeup_events=PERF_WAKEUP_EVENTS)

    def poll(self, timeout_ms: int) -> None:
        """Waits up to timeout_ms for a wakeup, then drains whatever is there:
        the kernel side wakes us only every WAKEUP_BYTES (ring buffer) or
        PERF_WAKEUP_EVENTS (perf buffer) per CPU."""
        if self._reader is not None:
            self._reader.poll(timeout_ms)
            self.synced_ns = self._reader.synced_ns
            return
        if self.output == "ringbuf":
            wait, drain = self.bpf.ring_buffer_poll, self.bpf.ring_buffer_consume
        else:
            wait, drain = self.bpf.perf_buffer_poll, self.bpf.perf_buffer_consume
        wait(timeout_ms)
        synced = time.monotonic_ns()        # what was committed by now, the drain hands over
        drain()
        self.synced_ns = synced

    def nudge(self) -> None:
        """Has the polling thread drain now rather than at its next timeout;
        a no-op where BCC's consumer waits (it polls its own epoll)."""
        if self._reader is not None:
            self._reader.nudge()

    @property
    def records(self) -> int:
        """Records that reached userspace."""
        return self._reader.records if self._reader is not None else self._records

    @property
    def wakeups(self) -> int | None:
        """Times the kernel woke the consumer; None where BCC's consumer hides it."""
        return self._reader.wakeups if self._reader is not None else self._wakeups

    def kernel_lost(self) -> int:
        """Events the kernel side could not hand over: full buffer drops."""
        total = self._perf_lost
        if self.bpf is not None:
            for per_cpu in self.bpf["lost"].values():
                total += sum(per_cpu)
        return total

    def detach(self) -> None:
        """Detaches every probe and keeps the maps and the output buffer, so
        that what the probes wrote before can still be drained."""
        if self.bpf is None:
            return
        for tp in list(self.bpf.tracepoint_fds):
            self.bpf.detach_tracepoint(tp)
        for tp in list(self.bpf.raw_tracepoint_fds):
            self.bpf.detach_raw_tracepoint(tp)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._records, self._wakeups = self._reader.records, self._reader.wakeups
            self._reader = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

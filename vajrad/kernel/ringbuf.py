"""A BPF ring buffer consumer that reads the shared memory directly.

BCC's consumer calls into Python through a ctypes callback for every record,
which costs more than decoding most records does. Here the map is mmap'd as
the kernel lays it out (kernel/bpf/ringbuf.c): a consumer-position page we
write, a producer-position page we read, then the data area, mapped twice
in a row so that no record ever wraps. Records are handed over as (buffer,
offset, size) and decoded in place; the consumer position moves past them
only after the handler returns.

The two positions are read and written as whole aligned 64-bit words
through ctypes. struct would move them a byte at a time, and the kernel,
seeing a half-written consumer position up to 16 MiB behind, would report
the buffer full and drop events.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
import time
from typing import Callable

from vajrad.errors import CollectorError

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
# Records handed over between stores of the consumer position: space goes
# back to the kernel in steps, not per record (a ctypes store each).
RELEASE_EVERY = 64
_U32 = struct.Struct("<I")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map(fd: int, length: int, prot: int, offset: int) -> int:
    addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return addr


class RingBufferReader:
    def __init__(self, map_fd: int, size: int, handler: Callable[[mmap.mmap, int, int], None]):
        """size: the map's max_entries, a power of two times the page size."""
        if size <= 0 or size & (size - 1):
            raise CollectorError("ringbuf", f"ring buffer size {size} is not a power of two")
        page = mmap.PAGESIZE
        self._maps: list[tuple[int, int]] = []
        try:
            consumer = _map(map_fd, page, mmap.PROT_READ | mmap.PROT_WRITE, 0)
            self._maps.append((consumer, page))
            producer = _map(map_fd, page + 2 * size, mmap.PROT_READ, page)
            self._maps.append((producer, page + 2 * size))
        except OSError as e:
            self.close()
            raise CollectorError("ringbuf", f"cannot map the ring buffer: {e}") from e
        self._consumer_pos = ctypes.c_uint64.from_address(consumer)
        self._producer_pos = ctypes.c_uint64.from_address(producer)
        self._data = (ctypes.c_char * (page + 2 * size)).from_address(producer)
        self._data_offset = page
        self._mask = size - 1
        self._handler = handler
        self._fd = map_fd
        self._poll: select.epoll | None = None
        # Written by nudge(), from any thread, to have the next wait end now.
        self._nudge = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wakeups = 0        # polls the kernel woke, for the cost of in-kernel filtering
        self.synced_ns = 0      # CLOCK_MONOTONIC up to which records have been handed over
        self.records = 0

    def poll(self, timeout_ms: int) -> int:
        """Waits for a wakeup (the kernel side sends few), then drains."""
        if self._poll is None:
            self._poll = select.epoll()
            self._poll.register(self._fd, select.EPOLLIN)
            self._poll.register(self._nudge, select.EPOLLIN)
        for fd, _ in self._poll.poll(timeout_ms / 1000):
            if fd == self._fd:
                self.wakeups += 1
            else:
                try:
                    os.eventfd_read(self._nudge)
                except BlockingIOError:
                    pass
        # Everything committed before this instant is handled by the drain below.
        self.synced_ns = time.monotonic_ns()
        return self.drain()

    def drain(self) -> int:
        """Hands every committed record to the handler; returns how many."""
        data, producer_pos, consumer_pos = self._data, self._producer_pos, self._consumer_pos
        handler, mask, base = self._handler, self._mask, self._data_offset
        unpack_u32 = _U32.unpack_from
        cons = consumer_pos.value
        count = 0
        while True:
            # Plain loads suffice on x86-64 (TSO), the only machine BpfProgram
            # uses this reader on; a record is trusted once its BUSY bit is clear.
            prod = producer_pos.value
            if cons >= prod:
                break
            while cons < prod:
                at = base + (cons & mask)
                length = unpack_u32(data, at)[0]
                if length & _BUSY:          # reserved, still being written
                    consumer_pos.value = cons
                    self.records += count
                    return count
                size = length & ~(_BUSY | _DISCARD)
                cons += (size + _HEADER + 7) & ~7
                if not length & _DISCARD:
                    handler(data, at + _HEADER, size)
                    count += 1
                    if not count & (RELEASE_EVERY - 1):
                        consumer_pos.value = cons
            consumer_pos.value = cons
        self.records += count
        return count

    def nudge(self) -> None:
        """Ends the current (or next) wait at once, so that a drain follows."""
        os.eventfd_write(self._nudge, 1)

    def close(self) -> None:
        if getattr(self, "_poll", None) is not None:
            self._poll.close()
            self._poll = None
        if getattr(self, "_nudge", None) is not None:
            os.close(self._nudge)
            self._nudge = None
        for addr, length in self._maps:
            _libc.munmap(addr, length)
        self._maps = []

"""RingBufferReader over memory laid out as the kernel lays out a BPF ring
buffer (consumer page, producer page, data twice), written by the test as
the kernel would write it. The real kernel side is covered by every BPF test."""
import mmap
import os
import struct
import threading
import time

import pytest
from conftest import needs_bpf

from vajrad.kernel.ringbuf import RingBufferReader

PAGE = mmap.PAGESIZE
SIZE = 4 * PAGE
BUSY, DISCARD = 1 << 31, 1 << 30


class FakeRing:
    def __init__(self):
        self.fd = os.memfd_create("vajra-ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)
        self.mem = mmap.mmap(self.fd, 2 * PAGE + 2 * SIZE)
        self.prod = 0

    def write(self, payload: bytes, flags: int = 0) -> None:
        """One record at the producer position, in both copies of the data."""
        record = struct.pack("<II", len(payload) | flags, 0) + payload
        record += b"\0" * (-len(record) % 8)
        at = self.prod & (SIZE - 1)
        for copy in (0, SIZE):
            start = 2 * PAGE + copy + at
            head = record[:2 * SIZE - at - copy] if copy else record
            self.mem[start:start + len(head)] = head
        # What runs past the end of the first copy is the start of the second
        # one's mirror: the beginning of the data area.
        spill = at + len(record) - SIZE
        if spill > 0:
            self.mem[2 * PAGE:2 * PAGE + spill] = record[-spill:]
        self.prod += len(record)
        struct.pack_into("<Q", self.mem, PAGE, self.prod)

    def consumer(self) -> int:
        return struct.unpack_from("<Q", self.mem, 0)[0]


@pytest.fixture
def ring():
    r = FakeRing()
    yield r
    r.mem.close()
    os.close(r.fd)


def test_records_in_order_across_the_wrap_skipping_discarded_ones(ring):
    got = []
    reader = RingBufferReader(ring.fd, SIZE, lambda buf, off, size: got.append(bytes(buf[off:off + size])))
    sent = []
    for i in range(800):                     # about 3.5 times round the ring
        payload = bytes([i % 251]) * (50 + i % 13)
        ring.write(payload, DISCARD if i % 17 == 0 else 0)
        if i % 17:
            sent.append(payload)
        if i % 7 == 0:
            reader.drain()
    reader.drain()
    reader.close()
    assert got == sent
    assert ring.consumer() == ring.prod


def test_a_busy_record_stops_the_drain_until_committed(ring):
    got = []
    reader = RingBufferReader(ring.fd, SIZE, lambda buf, off, size: got.append(bytes(buf[off:off + size])))
    ring.write(b"first")
    at = ring.prod
    ring.write(b"second", BUSY)
    ring.write(b"third")
    assert reader.drain() == 1 and got == [b"first"] and ring.consumer() == at
    struct.pack_into("<I", ring.mem, 2 * PAGE + at, len(b"second"))          # committed
    struct.pack_into("<I", ring.mem, 2 * PAGE + SIZE + at, len(b"second"))
    assert reader.drain() == 2 and got == [b"first", b"second", b"third"]
    reader.close()


def test_a_size_that_is_not_a_power_of_two_is_refused(ring):
    with pytest.raises(Exception, match="power of two"):
        RingBufferReader(ring.fd, 3 * PAGE, lambda *a: None)


def test_a_long_drain_gives_space_back_as_it_goes(ring):
    seen = []
    reader = RingBufferReader(ring.fd, SIZE, lambda buf, off, size: seen.append(ring.consumer()))
    start = ring.consumer()
    for i in range(200):
        ring.write(bytes(40))
    assert reader.drain() == 200
    assert start < max(seen) < ring.prod == ring.consumer()
    reader.close()


@needs_bpf
def test_a_nudge_ends_the_wait_at_once(tmp_path):
    """What lets socket and file rows, which wait for the process collector,
    not wait for its (long) drain interval."""
    from vajrad.kernel.program import BpfProgram
    from vajrad.kernel.environment import ensure_tracefs, probe
    ensure_tracefs()
    program = BpfProgram("process.bpf.c", probe(str(tmp_path)), "ringbuf")
    program.load()
    try:
        program.open_events(lambda buf, off, size: None)
        program.poll(0)
        waiting = threading.Thread(target=program.poll, args=(600_000,))     # a 10-minute wait
        waiting.start()
        program.nudge()
        waiting.join(120)
        assert not waiting.is_alive(), "the nudge did not end the wait"
    finally:
        program.close()

"""What every BPF collector shares: a program, a thread that drains its
output buffer into row batches, and the clock that dates the rows."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from vajrad.enrich.containers import HOST
from vajrad.enrich.process_cache import ProcessCache
from vajrad.kernel.program import BpfProgram
from vajrad.collectors.base import Collector, PollingThread

log = logging.getLogger(__name__)

# After the probes are detached, a program that was already running on
# another CPU may still be writing its record; this is far longer than one
# probe runs, and is paid once, at stop.
DETACH_GRACE_S = 0.02
POLL_MS = 200           # a drain at least this often; the kernel wakes us sooner under load
MAX_BATCH = 2048
# How long a row waits for the process collector before it is attributed
# with what the cache (or /proc) knows then.
ATTRIBUTION_WAIT_NS = 500_000_000
# A record's ktime is read a little before it is submitted: what a drain that
# started at T has read for certain is what happened before T minus this.
SUBMIT_SLACK_NS = 10_000_000


class MonotonicClock:
    """Converts bpf_ktime_get_ns() (CLOCK_MONOTONIC) to unix time; the offset is
    refreshed so that a wall-clock step is followed within a second."""

    def __init__(self):
        self.refresh()

    def refresh(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()
        self.stamp = time.monotonic()


def _host_process(cgroup_id: int, pid: int = 0) -> tuple[tuple, bool]:
    return HOST, True


class BpfCollector(Collector):
    """Subclasses set `table` and `program`, and decode records in row()."""

    table: str = ""
    source = "kernel"
    poll_ms = POLL_MS
    # With the containers unit: (cgroup_id, pid) -> (container column values,
    # complete), and the hold of rows whose metadata is still due.
    resolve_container = staticmethod(_host_process)
    container_fill = None

    def use_containers(self, resolver) -> None:
        """Rows get container columns from `resolver` (a ContainerResolver, or None)."""
        if resolver is not None:
            from vajrad.enrich.containers import ContainerFill
            from vajrad.tables import TABLES
            self.resolve_container = resolver.lookup
            self.container_fill = ContainerFill(resolver, TABLES[self.table].column_names)

    def __init__(self, program: BpfProgram):
        super().__init__()
        self.program = program
        self.clock = MonotonicClock()
        self._pending: list[dict] = []
        self._thread: PollingThread | None = None
        self._drain_started_ns = 0

    def row(self, buf, off: int, size: int) -> dict | None:
        """One record to one row (None: nothing to store). Runs on the polling
        thread while the record is still in the buffer."""
        raise NotImplementedError

    async def prepare(self) -> None:
        """After the program is attached, before the first record is read."""

    async def start(self) -> None:
        self._open_channel()
        self.state = "starting"
        try:
            await asyncio.to_thread(self.program.load)
            await self.prepare()
            self.program.open_events(self._on_event)
        except Exception as e:
            self.state, self.error = "failed", str(e)
            raise
        self._thread = PollingThread(f"vajra-{self.name}", self._poll_once, self._poller_died)
        self._thread.start()
        self.state = "running"

    def _poller_died(self, error: BaseException) -> None:
        """On the dead polling thread: nothing drains the buffer any more."""
        self.state, self.error = "failed", f"polling thread died: {error!r}"

    def _on_event(self, buf, off: int, size: int) -> None:
        try:
            row = self.row(buf, off, size)
        except Exception:  # a malformed record must not kill the poller
            self.dropped += 1
            log.exception("%s: undecodable event of %d bytes", self.name, size)
            return
        if row is not None:
            self._pending.append(row)
            if len(self._pending) >= MAX_BATCH:
                self._flush()

    def _flush(self, final: bool = False) -> None:
        batch, self._pending = self._pending, []
        if self.container_fill is not None:
            batch = self.container_fill.hold(batch, final)
            if not batch:
                return
        self.captured += len(batch)
        self._deliver((self.table, batch))

    def _after_poll(self, final: bool = False) -> None:
        """On the polling thread, after each drain (final: the last one, at stop)."""

    def _poll_once(self) -> None:
        self._drain_started_ns = time.monotonic_ns()
        self.program.poll(self.poll_ms)
        self._after_poll()
        if self._pending or (self.container_fill is not None and self.container_fill.held):
            self._flush()
        if time.monotonic() - self.clock.stamp > 1.0:
            self.clock.refresh()

    async def stop(self) -> None:
        """Stops polling, detaches the probes, drains what they wrote after the
        last poll, then closes: every record committed before the probes went
        reaches the store (SIGTERM flushes the kernel side too)."""
        if self._thread:
            self._thread.stop()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self.program.bpf is not None:
            await asyncio.to_thread(self._final_drain)
        self.program.close()
        if self._queue is not None:
            self._deliver(None)
        self.state = "stopped"

    def _final_drain(self) -> None:
        """Once the polling thread has ended: nothing else reads the buffer."""
        detached_at = time.time()
        self.program.detach()
        time.sleep(DETACH_GRACE_S)
        before = self.program.records
        self.program.poll(0)
        self._after_poll(final=True)
        if self._pending or (self.container_fill is not None and self.container_fill.held):
            self._flush(final=True)
        log.info("%s: probes detached at %.6f; the final drain handed over %d records",
                 self.name, detached_at, self.program.records - before)

    @property
    def healthy(self) -> bool:
        return self.state == "running" and self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        s = super().stats()
        s["kernel_lost"] = self.program.kernel_lost() if self.program.bpf else 0
        s["output"] = self.program.output
        s["records"] = self.program.records
        s["wakeups"] = self.program.wakeups
        return s


class AttributedCollector(BpfCollector):
    """A collector whose rows name a process: path, cmdline and ancestry come
    from the ProcessCache the process collector keeps.

    The collectors drain separate buffers, so a row waits (at most
    ATTRIBUTION_WAIT_NS) until the process collector has applied every
    event older than it: a process that acts and exits at once is otherwise
    gone before we look it up. Subclasses decode records in decode()."""

    def __init__(self, program: BpfProgram, cache: ProcessCache | None):
        super().__init__(program)
        self.cache = cache or ProcessCache()
        self._waiting: deque[tuple[tuple, dict]] = deque()

    def decode(self, buf, off: int, size: int) -> tuple[dict, tuple] | None:
        """(row, who) with who = (pid, start_ns, ppid, parent_start_ns, ktime_ns,
        exec_id), or None for a record that makes no row."""
        raise NotImplementedError

    def row(self, buf, off: int, size: int) -> None:
        decoded = self.decode(buf, off, size)
        if decoded is not None:
            self._waiting.append((decoded[1], decoded[0]))
        return None

    def attribute(self, row: dict, who: tuple) -> None:
        """Fills path, ancestry and (where the table has it) cmdline; holds
        cache.lock. The image is the one the call ran under (exec_id), which
        the process may have replaced by an exec since."""
        pid, start, ppid, pstart, ktime, exec_id = who
        cache = self.cache
        proc = cache.running(pid, start)
        row["ancestry"] = cache.ancestry_of(proc, ppid, pstart)
        if proc is not None:
            path, cmdline = proc.image_at(exec_id, ktime)
            row["path"] = path
            if "cmdline" in row:
                row["cmdline"] = cmdline

    async def start(self) -> None:
        # From now on the cache keeps an image an exec replaced until our rows
        # older than that exec are attributed (see _after_poll).
        with self.cache.lock:
            self.cache.attributed_upto(self.name, time.monotonic_ns() - SUBMIT_SLACK_NS)
        try:
            await super().start()
        except BaseException:
            with self.cache.lock:
                self.cache.attributed_upto(self.name, None)
            raise

    async def stop(self) -> None:
        await super().stop()
        with self.cache.lock:
            self.cache.attributed_upto(self.name, None)

    def _after_poll(self, final: bool = False) -> None:
        waiting = self._waiting
        cache = self.cache
        if not waiting:
            with cache.lock:
                cache.attributed_upto(self.name, self._drain_started_ns - SUBMIT_SLACK_NS)
            return
        synced = cache.synced_ns
        stale = time.monotonic_ns() - ATTRIBUTION_WAIT_NS
        attribute, pending = self.attribute, self._pending
        with cache.lock:
            while waiting:
                who, row = waiting[0]
                if not final and who[4] > synced and who[4] > stale:
                    # The process collector drains rarely on its own; it is
                    # asked to catch up rather than have these rows wait.
                    cache.request_sync()
                    break
                waiting.popleft()
                attribute(row, who)
                pending.append(row)
            # Rows from before the oldest still waiting (or, with none waiting,
            # from before this drain) are all attributed.
            upto = waiting[0][0][4] if waiting else self._drain_started_ns - SUBMIT_SLACK_NS
            cache.attributed_upto(self.name, upto)

"""Collectors: each turns one source of activity into rows of its tables.

The daemon sees only this interface. A collector produces batches of
(table, rows) through `events()`; rows hold the table's own columns plus
`time`, and the store fills the columns common to every event. A row is a
dict, or a list in the table's column order (None where the store fills
in), which costs less per row for a busy collector.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import threading
from typing import AsyncIterator, Callable

from vajrad.threads import name_native_thread

log = logging.getLogger(__name__)

# (table, rows) or (table, rows, state): rows are dicts, or lists in column
# order; state, a list of (unit, key, value) changes to the unit's saved
# state that the store commits in the same transaction as the rows (see
# EventStore.submit), for sources read from a saved position.
Batch = tuple


class Collector(abc.ABC):
    name: str = ""
    source: str = ""                   # where captured events come from: "kernel", "inotify"
    tables: tuple[str, ...] = ()
    observes: tuple[str, ...] = ()     # tables whose committed rows observe() is given
    # observe() takes rows as the producer gave them (dicts, or lists in
    # column order), which spares building a dict per row for it.
    observes_rows_as_given: bool = False

    def __init__(self, queue_batches: int = 4096):
        self.state = "stopped"
        self.error: str | None = None
        self.captured = 0           # events received from the source
        self.dropped = 0            # events lost between the source and the daemon
        self._queue: asyncio.Queue[Batch | None] | None = None
        self._queue_batches = queue_batches
        self._loop: asyncio.AbstractEventLoop | None = None

    @abc.abstractmethod
    async def start(self) -> None:
        """Attaches to the source. Raises a VajraError when it cannot."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Detaches; events() then ends."""

    def stats(self) -> dict:
        """Every collector's keys (docs/api.md); a collector that reads the
        kernel or inotify gives its real output, records, wakeups and
        kernel_lost, others these defaults."""
        return {"state": self.state, "source": self.source, "captured": self.captured, "dropped": self.dropped,
                "error": self.error, "output": self.source, "records": self.captured, "wakeups": None,
                "kernel_lost": 0}

    def snapshots(self) -> dict:
        """Live (not evented) tables this collector answers: {name: rows()}."""
        return {}

    # Publisher/subscriber between collectors: one that declares `observes`
    # is handed those tables' rows as committed, and is told which tables
    # have a running producer (so it knows whether to wait for their rows).
    def observe(self, table: str, rows: list[dict]) -> None:
        """Rows of an `observes` table as committed (eid set); on the event loop."""

    def producers(self, tables: set[str]) -> None:
        """The tables the running collectors fill, whenever that set changes."""

    def reconfigure(self, config) -> None:
        """A reloaded Config (SIGHUP); collectors take what they can apply live."""

    @property
    def healthy(self) -> bool:
        return self.state == "running"

    async def events(self) -> AsyncIterator[Batch]:
        assert self._queue is not None, "start() first"
        while True:
            batch = await self._queue.get()
            if batch is None:
                return
            yield batch

    # --- for subclasses -----------------------------------------------------
    def _open_channel(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self._queue_batches)

    def _deliver(self, batch: Batch | None) -> None:
        """Thread-safe hand-over of one batch (None ends the stream)."""
        self._loop.call_soon_threadsafe(self._enqueue, batch)

    def _enqueue(self, batch: Batch | None) -> None:
        try:
            self._queue.put_nowait(batch)
        except asyncio.QueueFull:
            if batch is None:       # the end marker must arrive: make room
                self._queue.get_nowait()
                self._queue.put_nowait(None)
            else:
                self.dropped += len(batch[1])


class InjectedFault(RuntimeError):
    """A failure injected on purpose (vajrad.faults, tests only)."""


class PollingThread(threading.Thread):
    """Runs poll_once() until stopped; the poll holds no lock the loop needs.

    A poll that raises ends the thread: the exception is kept in `failure`
    and handed to on_failure (on this thread), so that the collector stops
    claiming to run and the watchdog withholds its ping."""

    def __init__(self, name: str, poll_once, on_failure: Callable[[BaseException], None] | None = None):
        super().__init__(name=name, daemon=True)
        self._poll_once = poll_once
        self._on_failure = on_failure
        self._halt = threading.Event()
        self._injected: BaseException | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        name_native_thread(self.name)
        try:
            while not self._halt.is_set():
                if self._injected is not None:
                    raise self._injected
                self._poll_once()
        except BaseException as e:  # reported through the collector's health
            self.failure = e
            log.error("%s: polling thread died: %r", self.name, e, exc_info=e)
            if self._on_failure is not None:
                self._on_failure(e)

    def inject_failure(self, error: BaseException) -> None:
        """Has the next poll raise `error`: the fault a bug in a decoder or a
        broken buffer would cause. Used only by vajrad.faults (tests)."""
        self._injected = error

    def stop(self) -> None:
        self._halt.set()

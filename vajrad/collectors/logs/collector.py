"""The logs unit's collector: a reader thread that follows log files (and
the journal), woken by inotify on their directories, with a periodic rescan
as the safety net for what inotify misses (NFS, FUSE, watch limits, a
queue overflow).

All file I/O happens on the reader thread; the event loop only moves
batches to the store. Each batch carries the files' new positions, which the
store commits with its rows (see tail.py). The thread reads no more while
the store or the hand-over queue holds a backlog, so a slow disk slows
reading instead of dropping lines: the lines wait in the files.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import pyinotify

from vajrad.collectors.base import Collector
from vajrad.collectors.logs.settings import LogsConfig
from vajrad.collectors.logs.tail import NO_WRITER, UNIT, WRITER_COLUMNS, Tailer
from vajrad.enrich.containers import CONTAINER_FIELDS, HOST, namespaces_of
from vajrad.tables import TABLES

log = logging.getLogger(__name__)

TABLE = "log_events"
LIVE_TABLE = "log_files"
WRITES_TABLE = "bpf_file_events"
MAX_INFLIGHT_BATCHES = 64
MAX_STORE_BACKLOG = 20_000       # rows queued in the store beyond which reading pauses
COALESCE_S = 0.01                # after a wake, let a burst of writes land before reading
TIMER_S = 0.1                    # how often pending timers (partial lines, rotate_wait) are checked
WATCH_MASK = (pyinotify.IN_CREATE | pyinotify.IN_MODIFY | pyinotify.IN_MOVED_TO | pyinotify.IN_MOVED_FROM
              | pyinotify.IN_DELETE | pyinotify.IN_ATTRIB)
WRITERS_KEPT = 4096
PROC_RETRY_S = 5.0


def proc_writer(dev: int, ino: int) -> tuple:
    """A process that has the file (dev, ino) open for writing, from
    /proc/*/fd and fdinfo's flags; (None, None, None) when none has."""
    found = (None, None, None)
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
                if (st.st_dev, st.st_ino) != (dev, ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
                if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    try:
                        exe = os.readlink(f"/proc/{pid}/exe")
                    except OSError:
                        exe = None
                    return pid, exe, None
            except (OSError, StopIteration, ValueError):
                continue
    return found


def row_builder(table: str):
    """Rows as lists in column order (the store's fast path; they become
    dicts only for live listeners): cheaper per line than Table.row."""
    names = TABLES[table].column_names
    index = {n: i for i, n in enumerate(names)}
    width = len(names)

    def make_row(_base: list | None = None, **values) -> list:
        row = [None] * width if _base is None else _base.copy()
        for name, value in values.items():
            row[index[name]] = value
        return row
    # A row of what the lines of one read share (file, writer, container):
    # each line's row starts as its copy and sets only its own columns.
    make_row.base = make_row
    return make_row


class LogCollector(Collector):
    name = "logs"
    source = "file"
    tables = (TABLE,)
    observes = (WRITES_TABLE,)

    def __init__(self, config: LogsConfig, store, rescan_interval_ms: int, describe_process=None,
                 containers=None):
        super().__init__()
        # The containers unit's resolver, when it runs: the container of a
        # writer found through /proc.
        self.containers = containers
        self.config = config
        self.store = store
        self.rescan_s = rescan_interval_ms / 1000
        self.describe_process = describe_process
        self.tailer: Tailer | None = None
        self.journal = None
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._inflight = 0
        self._lock = threading.Lock()
        self._wm: pyinotify.WatchManager | None = None
        self._notifier: pyinotify.Notifier | None = None
        self._watches: dict[str, int] = {}
        self._need_scan = True
        self._created: set[str] = set()
        self._reconfigured: LogsConfig | None = None
        # Last process seen opening each path for writing (bpf_file_events):
        # path -> its WRITER_COLUMNS values.
        self._writers: dict[str, tuple] = {}
        self._proc_writers: dict[str, tuple] = {}     # file key -> from /proc, when first read
        self.writes_collected = False
        self.inotify_events = 0
        self.inotify_wakes = 0
        self.rescans = 0
        self.overflows = 0
        self.watch_failures = 0
        self.backpressure_waits = 0

    # --- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        self._open_channel()
        self.state = "starting"
        saved = await asyncio.to_thread(self.store.load_state, UNIT)
        make_row = row_builder(TABLE)
        self.tailer = Tailer(self.config.files, saved, self._output, make_row, self._writer_of)
        self._saved, self._make_row = saved, make_row
        if self.config.journal:
            self.journal = self._journal_source(self.config)
        try:
            self._wm = pyinotify.WatchManager()
            self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=self._on_inotify)
        except Exception as e:          # no inotify (seccomp, limits): the rescan still works
            self._wm = self._notifier = None
            log.warning("logs: inotify unavailable (%s); files are read at each rescan (%s s)", e, self.rescan_s)
        self._thread = threading.Thread(target=self._run, name="vajra-logs", daemon=True)
        self._thread.start()
        self.state = "running"

    def _journal_source(self, config: LogsConfig):
        from vajrad.collectors.logs.journal import JournalSource
        return JournalSource(config.journal, self._saved, self._output, self._make_row)

    async def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self.tailer is not None:
            self.tailer.close()
        if self.journal is not None:
            self.journal.close()
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
        if self._queue is not None:
            self._deliver(None)
        if self.state != "failed":
            self.state = "stopped"

    def reconfigure(self, config) -> None:
        """SIGHUP: new categories from the next scan; positions stay, so what
        was read is not read again."""
        if config.logs != self.config:
            self._reconfigured = config.logs
        self.rescan_s = config.log_rescan_interval_ms / 1000

    # --- the hand-over ------------------------------------------------------
    def _output(self, rows: list[dict], state: list) -> None:
        """From the reader thread: one batch, with the positions it reaches."""
        with self._lock:
            self._inflight += 1
        self.captured += len(rows)
        self._deliver((TABLE, rows, state))

    async def events(self):
        async for batch in super().events():
            with self._lock:
                self._inflight -= 1
            yield batch

    def _backlogged(self) -> bool:
        return self._inflight > MAX_INFLIGHT_BATCHES or self.store.pending > MAX_STORE_BACKLOG

    # --- the reader thread ----------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as e:       # reported through the collector's health
            self.state, self.error = "failed", repr(e)
            log.error("logs: reader thread died: %r", e, exc_info=e)

    def _loop_forever(self) -> None:
        next_rescan = 0.0
        busy = True
        while not self._halt.is_set():
            now = time.monotonic()
            if self._reconfigured is not None:
                new, self._reconfigured = self._reconfigured, None
                self.config = new
                self.tailer.reconfigure(new.files)
                if self.journal is not None:
                    self.journal.reconfigure(new.journal)
                elif new.journal:
                    self.journal = self._journal_source(new)
                self._need_scan = True
            if self._need_scan or now >= next_rescan:
                if now >= next_rescan:
                    self.rescans += 1
                    next_rescan = now + self.rescan_s
                self._need_scan = False
                created, self._created = self._created, set()
                self.tailer.scan(created=created)
                self._update_watches()
            while self._backlogged() and not self._halt.is_set():
                self.backpressure_waits += 1
                time.sleep(0.01)
            more = self.tailer.read()
            if self.journal is not None:
                more = self.journal.read() or more
            if more:
                continue
            busy = any(f.fd is not None and (f.rotated or f.copy_of or f.size > f.offset)
                       for f in self.tailer.files.values())
            timeout = min(TIMER_S if busy or self.journal is not None else self.rescan_s,
                          max(0.0, next_rescan - time.monotonic()))
            self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        if self._notifier is None:
            self._halt.wait(timeout)
            return
        deadline = time.monotonic() + timeout
        while not self._halt.is_set():
            left = deadline - time.monotonic()
            # Short slices, so that stop() is honoured promptly.
            if self._notifier.check_events(int(max(0.0, min(left, 0.25)) * 1000)):
                time.sleep(COALESCE_S)
                self._notifier.read_events()
                self._notifier.process_events()
                self.inotify_wakes += 1
                return
            if left <= 0:
                return

    def _on_inotify(self, event: pyinotify.Event) -> None:
        self.inotify_events += 1
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            self.overflows += 1
            log.warning("logs: inotify queue overflowed; rescanning every watched directory")
            self._need_scan = True
            return
        if event.mask & pyinotify.IN_CREATE:
            self._created.add(event.pathname)
        if event.mask & (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO | pyinotify.IN_MOVED_FROM
                         | pyinotify.IN_DELETE | pyinotify.IN_ATTRIB):
            self._need_scan = True

    def _update_watches(self) -> None:
        """Watches the configured directories and those of symlinks' targets."""
        if self._wm is None:
            return
        wanted = set(self.tailer.directories())
        for f in self.tailer.files.values():
            if f.fd is not None:
                wanted.add(os.path.dirname(os.path.realpath(f.path)))
        for directory in wanted - self._watches.keys():
            if not os.path.isdir(directory):
                continue
            result = self._wm.add_watch(directory, WATCH_MASK, quiet=True)
            wd = result.get(directory, -1)
            if wd < 0:
                self.watch_failures += 1
                continue
            self._watches[directory] = wd
        for directory in self._watches.keys() - wanted:
            self._wm.rm_watch(self._watches.pop(directory), quiet=True)
        for directory, wd in list(self._watches.items()):
            if not os.path.isdir(directory):          # removed: watched again when it returns
                self._watches.pop(directory)

    # --- writer attribution ---------------------------------------------------
    def producers(self, tables: set[str]) -> None:
        self.writes_collected = WRITES_TABLE in tables

    def observe(self, table: str, rows: list[dict]) -> None:
        """bpf_file_events as committed: the last process that opened each
        path for writing (an open with O_WRONLY, O_RDWR or creat that succeeded)."""
        for row in rows:
            syscall, flags = row.get("syscall") or "", row.get("flags") or ""
            if not (syscall == "creat" or syscall.startswith("open") and ("O_WRONLY" in flags or "O_RDWR" in flags)):
                continue
            if str(row.get("exit_code") or "0").startswith("-") or not row.get("file_path"):
                continue
            path = row["file_path"]
            self._writers.pop(path, None)
            self._writers[path] = (row.get("pid"), row.get("path"), row.get("ancestry"),
                                   *[row.get(c) or "" for c in CONTAINER_FIELDS],
                                   row.get("pid_namespace"), row.get("mnt_namespace"), row.get("net_namespace"))
            if len(self._writers) > WRITERS_KEPT:
                self._writers.pop(next(iter(self._writers)))

    def _writer_of(self, f) -> dict:
        """WRITER_COLUMNS: the pid, executable, ancestry, container and
        namespaces of the process that last opened f for
        writing: from bpf_file_events when it saw one, else the process
        that had f open for writing when it was first read (/proc)."""
        found = self._writers.get(f.path)
        if found is not None:
            return dict(zip(WRITER_COLUMNS, found))
        now = time.monotonic()
        known = self._proc_writers.get(f.key)
        # Looked up once per file, and again every PROC_RETRY_S while no writer was found.
        if known is None or known[0][0] is None and now - known[1] >= PROC_RETRY_S:
            known = self._proc_writers[f.key] = (self._proc_writer(f), now)
            if len(self._proc_writers) > WRITERS_KEPT:
                self._proc_writers.pop(next(iter(self._proc_writers)))
        writer = known[0]
        if writer[3] and not writer[4] and self.containers is not None:
            # Its container's name and image were not known yet when found: now?
            values = self.containers.by_id(writer[3])
            if values is not None and values[0][1]:
                writer = (*writer[:3], *values[0], *writer[3 + len(CONTAINER_FIELDS):])
                self._proc_writers[f.key] = (writer, known[1])
        return dict(zip(WRITER_COLUMNS, writer))

    def _proc_writer(self, f) -> tuple:
        """The /proc fallback, with the writer's container (through the
        containers unit's resolver, from its cgroup) and namespaces."""
        pid, exe, ancestry = proc_writer(f.dev, f.ino)
        if pid is None:
            return tuple(NO_WRITER.values())
        container = self.containers.by_pid(pid)[0] if self.containers is not None else HOST
        return (pid, exe, ancestry, *container, *namespaces_of(pid))

    # --- status -------------------------------------------------------------
    def stats(self) -> dict:
        s = super().stats()
        t = self.tailer
        if t is not None:
            c = t.counters
            files = list(t.files.values())     # the reader thread changes the dict
            s.update(files=sum(1 for f in files if f.fd is not None),
                     known_files=len(files), lines=c.lines, matched=c.matched, filtered=c.filtered,
                     partial_lines=c.partial, cut_lines=c.cut, invalid_utf8_lines=c.invalid,
                     truncations=c.truncations, copytruncate_copies=c.copies, rotations=c.rotations,
                     scans=c.scans, read_errors=c.errors)
        s.update(inotify_events=self.inotify_events, inotify_wakes=self.inotify_wakes,
                 inotify_overflows=self.overflows, rescans=self.rescans,
                 watched_directories=len(self._watches), watch_failures=self.watch_failures,
                 backpressure_waits=self.backpressure_waits, writer_attribution=self.writes_collected)
        if self.journal is not None:
            s["journal"] = self.journal.stats()
        return s

    def snapshots(self) -> dict:
        return {LIVE_TABLE: self._live_rows}

    def _live_rows(self) -> list[dict]:
        if self.tailer is None:
            return []
        # Read from the loop while the reader thread works: a copy of the list.
        return [TABLES[LIVE_TABLE].row(**r) for r in self.tailer.rows()]

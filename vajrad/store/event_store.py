"""SQLite event store: WAL, batched writes on a writer thread, bounded retention.

Rows are committed in batches by one writer thread, so the event loop never
waits on disk. eids are assigned inside the writing transaction from
sqlite_sequence, which keeps them monotonic across restarts and retention.
With synchronous=FULL a crash of the process or the machine loses at most
the rows queued and not yet committed, and never the file. That queue is
bounded in time (the oldest queued row is committed within max_pending_ms
while the writer keeps up: the writer commits by age as well as by size, and
a row that finds the last commit max_pending_ms old is committed at once)
and in rows (beyond max_pending_rows, rows are dropped and counted rather
than queued). Retention runs on its own thread and connection, whether or not
rows arrive: it deletes by eid ranges, a bounded chunk per transaction, so the
writer waits at most one chunk for SQLite's write lock. See docs/storage.md for
the synchronous setting and its loss bound.

The store and its side files (-wal, -shm) are 0640, root:vajra where that
group exists (members read them with `vajractl query`), whatever the umask;
a directory the store creates is 0750. An existing directory that other
users may write to is refused; one they may read is reported (see
docs/storage.md).

A `shared` column (ancestry) lives in a side table and rows hold its id: see
vajrad/store/shared_columns.py.

Units that resume a source where they left it (log files' offsets, the
journal's cursor, alert watermarks) keep that position in `unit_state`,
written in the same transaction as the rows it accounts for (submit's
`state`), so a crash leaves the rows and the position agreeing: nothing read
twice, nothing skipped. `load_state(unit)` gives it back at start.
"""
from __future__ import annotations

import grp
import json
import logging
import operator
import os
import queue
import sqlite3
import stat
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from vajrad.errors import VajraError
from vajrad.schema import Table
from vajrad.store.shared_columns import SharedColumnWriter, column_sql, quote, read_view, side_table

_quote = quote
from vajrad.threads import name_native_thread

log = logging.getLogger(__name__)

_STOP = object()
NARROW_WINDOW_ROWS = 50_000      # below this, time-bounded queries go through the time index
SHARED_GENERATION_S = 60         # how often a new generation of shared values starts
SHARED_TEXTS_KEPT = 1024         # shared-column texts a reading thread keeps by id
MAX_PENDING_MS = 100             # the oldest queued row waits at most this long for its commit
MAX_PENDING_ROWS = 50_000        # rows queued beyond this are dropped and counted
BATCH_ROWS = 5_000               # a batch this large is committed at once, whatever its age
RETENTION_CHUNK_EIDS = 2_000     # eids per retention transaction: what the writer may wait behind
FILE_MODE = 0o640                # the store and its side files; group vajra reads them
DIR_MODE = 0o750
STORE_GROUP = "vajra"
SIDE_FILES = ("-wal", "-shm", "-journal")
# Rows per INSERT statement. One multi-row statement is one sqlite3_step, and
# so one release of the GIL, where executemany releases and retakes it per
# row and hands it to the collector's thread each time.
INSERT_CHUNKS = (256, 64, 16, 4, 1)
STORE_FILLED = frozenset({"eid", "host_identifier", "is_open"})    # set by the writer when absent
UNIT_STATE = "unit_state"        # (unit, key) -> JSON value, written with the rows it accounts for

# One change of a unit's saved state: (unit, key, JSON-able value, or None to forget the key).
StateChange = tuple[str, str, object]




class StoreError(VajraError):
    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"event store {path}: {message}")


def _store_gid() -> int | None:
    """Group vajra's id when we may give files to it (as root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(STORE_GROUP).gr_gid
    except KeyError:
        return None


def _restrict(fd: int, gid: int | None) -> None:
    """0640 or tighter (an admin's 0600 stays), and group vajra when it exists."""
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode) & FILE_MODE
    if mode != stat.S_IMODE(st.st_mode):
        os.fchmod(fd, mode)
    if gid is not None and (st.st_uid, st.st_gid) != (0, gid):
        os.fchown(fd, 0, gid)


@dataclass
class Filter:
    """What event/list and ListEvents may filter on; values already checked."""
    host_identifier: str | None = None
    is_open: bool | None = None
    start_time: int | None = None
    end_time: int | None = None
    start_eid: int | None = None
    end_eid: int | None = None

    def where(self) -> tuple[str, list]:
        clauses, params = [], []
        for attr, clause in _FILTER_CLAUSES:
            value = getattr(self, attr)
            if value is not None:
                clauses.append(clause)
                params.append(int(value) if attr == "is_open" else value)
        return " AND ".join(clauses), params


_FILTER_CLAUSES = (
    ("host_identifier", "host_identifier = ?"), ("is_open", "is_open = ?"),
    ("start_time", "time >= ?"), ("end_time", "time <= ?"),
    ("start_eid", "eid >= ?"), ("end_eid", "eid <= ?"),
)


class StoreTransaction:
    """What a unit's transaction (EventStore.transact) may do, on the writer
    thread, inside one SQLite transaction: insert rows of event tables (eids
    assigned, committed rows handed to on_commit like any others), keep
    key/value state, and run its own statements on `conn`."""

    def __init__(self, store: "EventStore", conn: sqlite3.Connection, seq: dict[str, int]):
        self.store, self.conn, self._seq = store, conn, seq
        self.inserted: dict[str, list[dict]] = {}

    def insert(self, table: str, rows: list[dict], host_identifier: str | None = None) -> list[dict]:
        """Inserts rows (dicts of exactly the table's columns, less those the
        store fills); returns them with their eids set."""
        store = self.store
        if table not in store.tables:
            raise StoreError(store.path, f"transaction: {table} is not an event table")
        if store._shared[table]:
            raise StoreError(store.path, f"transaction: {table} has shared columns, which only batches write")
        known, required = store._columns[table]
        names = store.tables[table].column_names
        n = self._seq[table]
        params: list = []
        for row in rows:
            keys = row.keys()
            if not (keys <= known and required <= keys):
                raise StoreError(store.path, f"transaction: {table} row keys {sorted(keys ^ known)} "
                                             f"do not fit its columns")
            n += 1
            row["eid"] = n
            if host_identifier is not None or "host_identifier" not in row:
                row["host_identifier"] = host_identifier
            if row.get("is_open") is None:
                row["is_open"] = 0
            params += [row[c] for c in names]
        store._insert(self.conn, table, params, len(rows))
        self._seq[table] = n
        self.inserted.setdefault(table, []).extend(rows)
        return rows

    def set_state(self, unit: str, key: str, value: object) -> None:
        """unit_state[unit, key] = value (JSON-able; None deletes it), committed
        with the rest; read back with EventStore.load_state."""
        EventStore._save_state(self.conn, [(unit, key, None if value is None
                                            else json.dumps(value, separators=(",", ":")))])


@dataclass
class _Transaction:
    apply: Callable[[StoreTransaction], Any]
    future: Future
    queued: float


class EventStore:
    def __init__(self, path: str, tables: dict[str, Table], *, expiry: int, max_rows: int,
                 max_pending_rows: int = MAX_PENDING_ROWS, max_pending_ms: int = MAX_PENDING_MS,
                 batch_rows: int = BATCH_ROWS, retention_interval: float = 5.0):
        self.path = path
        self.tables = {n: t for n, t in tables.items() if t.evented}
        self.expiry, self.max_rows = expiry, max_rows
        self.max_pending_s = max_pending_ms / 1000
        self.batch_rows = batch_rows
        self.retention_interval = retention_interval
        # Committed batches, rows as submitted (dicts or lists) with eids set.
        self.on_commit: Callable[[list[tuple[str, list]]], None] | None = None
        # Items: (table, rows, host_identifier, monotonic time queued), or _STOP.
        self._queue: queue.Queue = queue.Queue()
        self._queue_rows_max = max_pending_rows
        self._pending = 0
        self._batch_since: float | None = None     # queued time of the oldest row the writer holds
        self.commits = 0
        self._last_commit = 0.0
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        # Retention: its own thread and connection. _shared_lock keeps it out of
        # the shared columns' bookkeeping while the writer uses it.
        self._retention_thread: threading.Thread | None = None
        self._retention_conn: sqlite3.Connection | None = None
        self._retention_lock = threading.Lock()
        self._retention_stop = threading.Event()
        self._shared_lock = threading.Lock()
        self._seq: dict[str, int] = {}
        self._insert_sql: dict[str, dict[int, str]] = {}     # table -> rows per statement -> SQL
        self._row_values: dict[str, Callable[[dict], tuple]] = {}
        self._slots: dict[str, tuple[int, int, int]] = {}     # table -> where eid, host_identifier, is_open go
        self._shared: dict[str, list[SharedColumnWriter]] = {}
        self._local = threading.local()
        self.stored = 0
        self.dropped = 0
        # Rows refused because their keys are not their table's columns: a
        # collector's bug, counted as lost_collector and logged once per key.
        self.rejected = 0
        self._bad_keys_logged: set[tuple[str, str, str]] = set()
        self._columns = {name: (frozenset(t.column_names), frozenset(t.column_names) - STORE_FILLED)
                         for name, t in self.tables.items()}
        self.expired = 0
        self.last_error: str | None = None
        self._write_failed = False

    # --- set-up -----------------------------------------------------------
    def open(self) -> None:
        directory = os.path.dirname(self.path) or "."
        try:
            self._prepare_files(directory)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            for table in self.tables.values():
                self._create(conn, table)
                self._create_read_view(conn, table)
            conn.execute(f"CREATE TABLE IF NOT EXISTS {UNIT_STATE} "
                         f"(unit TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
                         f"PRIMARY KEY (unit, key)) WITHOUT ROWID")
            for table in self.tables:
                self._seq[table] = self._high_water(conn, table)
                for shared in self._shared[table]:
                    # What an earlier run wrote is one closed generation.
                    top = conn.execute(f"SELECT MAX(id) FROM {_quote(side_table(table, shared.column))}"
                                       ).fetchone()[0] or 0
                    shared.next_id = shared.floor = top + 1
                    if top:
                        shared.closed.append((1, top + 1, self._seq[table]))
        except (OSError, sqlite3.Error) as e:
            raise StoreError(self.path, str(e)) from e
        self._conn = conn

    def _prepare_files(self, directory: str) -> None:
        """Modes and owners before SQLite opens anything: the directories it
        lacks are made 0750, the store file is made (or tightened to) 0640,
        and SQLite gives -wal and -shm the store file's mode and owner when
        it creates them. Explicit chmods, so the umask does not matter."""
        gid = _store_gid()
        missing = []
        head = os.path.abspath(directory)
        while not os.path.isdir(head):
            missing.append(head)
            head = os.path.dirname(head)
        for d in reversed(missing):
            os.mkdir(d, DIR_MODE)
            os.chmod(d, DIR_MODE)
            if gid is not None:
                os.chown(d, 0, gid)
        st = os.stat(directory)
        if not missing:
            others = stat.S_IMODE(st.st_mode) & 0o007
            if others & 0o002:
                raise StoreError(self.path, f"directory {directory} is writable by every user (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}): any of them could replace the store or "
                                 f"plant its -wal; use a directory only root may write to")
            if others:
                warning = (f"directory {directory} is mode {stat.S_IMODE(st.st_mode):04o}: other users "
                           f"see the store's file names and sizes (its contents stay 0640); "
                           f"chmod o-rwx {directory} to hide them")
                self.warnings.append(warning)
                log.warning("event store: %s", warning)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            _restrict(fd, gid)
        finally:
            os.close(fd)
        for suffix in SIDE_FILES:          # left by an earlier run, perhaps under an older vajrad
            try:
                fd = os.open(self.path + suffix, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                _restrict(fd, gid)
            finally:
                os.close(fd)

    def _create(self, conn: sqlite3.Connection, table: Table) -> None:
        t = _quote(table.name)
        physical = [(c.name, c.sqlite_type) for c in table.columns if c.name != "eid"]
        physical += [(c.name + "_ref", "INTEGER") for c in table.columns if c.shared]
        cols = ", ".join(f"{_quote(n)} {kind}" for n, kind in physical)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {t} (eid INTEGER PRIMARY KEY AUTOINCREMENT, {cols})")
        # A store written by an older vajrad gains the columns added since.
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({t})")}
        for name, kind in physical:
            if name not in have:
                conn.execute(f"ALTER TABLE {t} ADD COLUMN {_quote(name)} {kind}")
        conn.execute(f"CREATE INDEX IF NOT EXISTS {_quote(table.name + '_time')} ON {t}(time)")
        names = table.column_names
        stored = [n + "_ref" if table.column(n).shared else n for n in names]
        one = f"({', '.join('?' for _ in names)})"
        self._insert_sql[table.name] = {
            rows: f"INSERT INTO {t} ({', '.join(_quote(n) for n in stored)}) VALUES " + ", ".join([one] * rows)
            for rows in INSERT_CHUNKS}
        self._row_values[table.name] = operator.itemgetter(*names)
        self._slots[table.name] = (names.index("eid"), names.index("host_identifier"), names.index("is_open"))
        self._shared[table.name] = []
        for i, c in enumerate(table.columns):
            if c.shared:
                side = _quote(side_table(table.name, c.name))
                conn.execute(f"CREATE TABLE IF NOT EXISTS {side} "
                             f"(id INTEGER PRIMARY KEY, value TEXT, parent INTEGER, depth INTEGER)")
                have = {row[1] for row in conn.execute(f"PRAGMA table_info({side})")}
                for extra in ("parent", "depth"):     # whole values only, from before node chains
                    if extra not in have:
                        conn.execute(f"ALTER TABLE {side} ADD COLUMN {extra} INTEGER")
                self._shared[table.name].append(SharedColumnWriter(table.name, c.name, i))

    @staticmethod
    def _create_read_view(conn: sqlite3.Connection, table: Table) -> None:
        """"<table>__read": the table as its columns read, shared ones put back
        together, for SQL readers (vajractl query) that know nothing of the
        side tables. Made anew at each start, so it follows this version's layout."""
        view = quote(read_view(table.name))
        conn.execute(f"DROP VIEW IF EXISTS {view}")
        select = ", ".join(f"{column_sql(table, c.name)} AS {quote(c.name)}" for c in table.columns)
        conn.execute(f"CREATE VIEW {view} AS SELECT {select} FROM {quote(table.name)} t")

    @staticmethod
    def _high_water(conn: sqlite3.Connection, table: str) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        top = conn.execute(f"SELECT MAX(eid) FROM {_quote(table)}").fetchone()
        return max(row[0] if row else 0, top[0] or 0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._writer, name="vajra-store", daemon=True)
        self._thread.start()
        self._retention_stop.clear()
        self._retention_thread = threading.Thread(target=self._retainer, name="vajra-retention", daemon=True)
        self._retention_thread.start()

    def stop(self) -> None:
        """Commits everything queued, then closes."""
        if self._retention_thread:
            self._retention_stop.set()
            self._retention_thread.join()
            self._retention_thread = None
        if self._thread:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        with self._retention_lock:
            if self._retention_conn:
                self._retention_conn.close()
                self._retention_conn = None
        if self._conn:
            self._conn.close()
            self._conn = None

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._write_failed

    @property
    def pending(self) -> int:
        return self._pending

    # --- writing ----------------------------------------------------------
    def submit(self, table: str, rows: list, host_identifier: str | None = None,
               state: list[StateChange] | None = None) -> int:
        """Queues rows for the writer. Beyond the bound they are dropped and counted.

        Rows are dicts, or lists in the table's column order (the fast path
        of busy collectors; they become dicts only for live listeners). The
        writer sets eid, host_identifier (when given here) and an unset
        is_open to 0.

        `state`: changes to units' saved state, committed in the same
        transaction as these rows (and with none, when the rows are
        dropped); rows may then be empty. Returns the rows queued."""
        if not rows and not state:
            return 0
        if rows and type(rows[0]) is dict:
            rows = self._conforming(table, rows)
            if not rows and not state:
                return 0
        with self._lock:
            if rows and self._pending + len(rows) > self._queue_rows_max:
                self.dropped += len(rows)
                return 0
            self._pending += len(rows)
        if state:
            state = [(unit, key, None if value is None else json.dumps(value, separators=(",", ":")))
                     for unit, key, value in state]
        self._queue.put((table, rows, host_identifier, time.monotonic(), state))
        return len(rows)

    def load_state(self, unit: str) -> dict[str, object]:
        """A unit's saved state as last committed: {key: value}. Blocking; at start."""
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                conn.execute("PRAGMA busy_timeout=5000")
                found = conn.execute(f"SELECT key, value FROM {UNIT_STATE} WHERE unit = ?", (unit,)).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as e:
            raise StoreError(self.path, f"reading the saved state of {unit} failed: {e}") from e
        return {key: json.loads(value) for key, value in found}

    def transact(self, apply: Callable[[StoreTransaction], Any]) -> Future:
        """Runs apply(StoreTransaction) on the writer thread, in a transaction
        of its own (after the rows queued before it), and commits it: the
        returned future holds apply's result once committed, or its exception
        once rolled back. For units whose rows must be committed together
        with their own state (a detection's alerts and its watermark), and
        for updates of stored rows: every write goes through this one writer.
        Never dropped by the queue bound (they are few and small)."""
        future: Future = Future()
        self._queue.put(_Transaction(apply, future, time.monotonic()))
        return future

    def _conforming(self, table: str, rows: list[dict]) -> list[dict]:
        """The rows whose keys are exactly their table's columns (less those the
        writer fills). A misspelt key would otherwise be stored as NULL and an
        extra one dropped, silently."""
        known, required = self._columns[table]
        good = []
        for row in rows:
            keys = row.keys()
            if keys <= known and required <= keys:
                good.append(row)
                continue
            self.rejected += 1
            for kind, names in (("unknown", keys - known), ("missing", required - keys)):
                for name in sorted(names):
                    if (table, kind, name) not in self._bad_keys_logged:
                        self._bad_keys_logged.add((table, kind, name))
                        log.error("event store: %s rows with %s key %r are refused (a collector bug; "
                                  "counted in lost_collector)", table, kind, name)
        return good

    def oldest_pending_ms(self) -> int:
        """How long the oldest row not yet committed has waited, in ms (0: none)."""
        since = self._batch_since
        with self._queue.mutex:
            head = self._queue.queue[0] if self._queue.queue else None
        if isinstance(head, tuple) and (since is None or head[3] < since):
            since = head[3]
        return 0 if since is None else int((time.monotonic() - since) * 1000)

    def _writer(self) -> None:
        name_native_thread("vajra-store")
        stopping = False
        while not stopping:
            stopping = self._collect_and_write(self._queue.get())

    def _retainer(self) -> None:
        """Applies retention every retention_interval, rows arriving or not,
        so that expired rows go on a quiet host too."""
        name_native_thread("vajra-retention")
        while not self._retention_stop.wait(self.retention_interval):
            self.apply_retention()

    def _collect_and_write(self, item) -> bool:
        """Gathers one batch from `item` on and commits it: once max_pending_s
        has passed since the last commit (by age: so a row that arrives after
        a quiet spell goes at once, and under load commits come at most every
        max_pending_s, with no row waiting longer than that), when it holds
        batch_rows rows (by size), or at stop. Returns whether stop was asked."""
        batch: list = []
        rows = 0
        stopping = False
        transaction: _Transaction | None = None
        # A row queued while the last commit ran keeps its own bound.
        deadline = item.queued if isinstance(item, _Transaction) else time.monotonic() if item is _STOP else \
            min(item[3] + self.max_pending_s, max(item[3], self._last_commit + self.max_pending_s))
        while True:
            if item is _STOP:
                stopping = True
            elif isinstance(item, _Transaction):
                transaction = item        # after the rows queued before it
                break
            else:
                if not batch:
                    self._batch_since = item[3]
                batch.append(item)
                rows += len(item[1])
            if rows >= self.batch_rows:
                break
            try:
                remaining = deadline - time.monotonic()
                # Past the deadline (or stopping), take what is queued already, then commit.
                item = self._queue.get(timeout=remaining) if remaining > 0 and not stopping \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
        if batch:
            self._write(batch)
            self._last_commit = time.monotonic()
        self._batch_since = None
        if transaction is not None:
            self._write_transaction(transaction)
        return stopping

    def _write_transaction(self, item: _Transaction) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        conn = self._conn
        tx = StoreTransaction(self, conn, dict(self._seq))
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = item.apply(tx)
            conn.execute("COMMIT")
        except Exception as e:      # the unit's statements too: its rows and state are not kept
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(e, sqlite3.Error):
                e = StoreError(self.path, f"transaction failed: {e}")
            item.future.set_exception(e)
            return
        self._seq = tx._seq
        count = sum(len(rows) for rows in tx.inserted.values())
        if count:
            self.commits += 1
            with self._lock:
                self.stored += count
        item.future.set_result(result)
        if count and self.on_commit:
            self.on_commit(list(tx.inserted.items()))

    def _write(self, batch: list[tuple[str, list, str | None, float, list | None]]) -> None:
        conn = self._conn
        committed: dict[str, list] = {}
        count = sum(len(item[1]) for item in batch)
        seq = dict(self._seq)
        with self._shared_lock:
            self._write_locked(conn, batch, committed, count, seq)

    def _write_locked(self, conn: sqlite3.Connection, batch: list, committed: dict, count: int,
                      seq: dict) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            for table, rows, host, _, state in batch:
                if state:
                    self._save_state(conn, state)
                if not rows:
                    continue
                shared = self._shared[table]
                eid_at, host_at, open_at = self._slots[table]
                n = seq[table]
                params: list = []
                refs = [(col.position, col.ref) for col in shared]
                if type(rows[0]) is list:
                    for v in rows:
                        n += 1
                        v[eid_at] = n
                        if host is not None:
                            v[host_at] = host
                        if v[open_at] is None:
                            v[open_at] = 0
                        at = len(params)
                        params += v
                        for pos, ref in refs:
                            params[at + pos] = ref(v[pos])
                else:
                    row_values = self._row_values[table]
                    for row in rows:
                        n += 1
                        row["eid"] = n
                        if host is not None:
                            row["host_identifier"] = host
                        elif "host_identifier" not in row:
                            row["host_identifier"] = None
                        if row.get("is_open") is None:
                            row["is_open"] = 0
                        v = row_values(row)     # submit() checked the keys
                        at = len(params)
                        params += v
                        for pos, ref in refs:
                            params[at + pos] = ref(v[pos])
                seq[table] = n
                for col in shared:
                    col.flush(conn)
                self._insert(conn, table, params, len(rows))
                committed.setdefault(table, []).extend(rows)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.last_error = str(e)
            for shared in (c for cols in self._shared.values() for c in cols):
                shared.forget()           # side rows of the rolled-back batch are gone too
            log.error("event store %s: write of %d rows failed: %s", self.path, count, e)
            with self._lock:
                self.dropped += count
                self._pending -= count
            self._write_failed = True
            return
        self._write_failed = False
        self._seq = seq
        self.commits += 1
        with self._lock:
            self.stored += count
            self._pending -= count
        if self.on_commit:
            self.on_commit(list(committed.items()))

    @staticmethod
    def _save_state(conn: sqlite3.Connection, changes: list) -> None:
        for unit, key, value in changes:
            if value is None:
                conn.execute(f"DELETE FROM {UNIT_STATE} WHERE unit = ? AND key = ?", (unit, key))
            else:
                conn.execute(f"INSERT OR REPLACE INTO {UNIT_STATE} (unit, key, value) VALUES (?, ?, ?)",
                             (unit, key, value))

    def _insert(self, conn: sqlite3.Connection, table: str, params: list, count: int) -> None:
        """params: count rows' values, one after the other."""
        statements, width = self._insert_sql[table], len(self.tables[table].columns)
        done = at = 0
        for rows in INSERT_CHUNKS:
            sql, step = statements[rows], rows * width
            while count - done >= rows:
                conn.execute(sql, params[at:at + step])
                at += step
                done += rows

    def _retention_connection(self) -> sqlite3.Connection:
        """Retention's own connection. synchronous=NORMAL: a delete that a
        power loss rolls back only brings back rows the next pass deletes
        again, and the writer's FULL commits make it durable anyway (they sync
        the WAL up to their own frames, which follow it)."""
        if self._retention_conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._retention_conn = conn
        return self._retention_conn

    def apply_retention(self, now: float | None = None) -> int:
        """Deletes rows older than expiry and beyond max_rows per table. Both
        become an eid bound, found through an index without holding the write
        lock; rows up to it go oldest first, RETENTION_CHUNK_EIDS eids per
        transaction, so the writer never waits behind a large delete. Expiry
        keeps its time test inside each range: a row whose time is newer than
        rows committed after it is never deleted early (it may outlive expiry
        until the bound passes its eid). Rows awaiting triage (is_open: an
        open alert and the events behind it) stay until triaged. Returns the
        rows deleted."""
        if self._conn is None:
            return 0
        now = time.time() if now is None else now
        removed = 0
        with self._retention_lock:
            try:
                conn = self._retention_connection()
                for table in self.tables:
                    t = _quote(table)
                    if self.max_rows > 0:
                        bound = conn.execute(f"SELECT eid FROM {t} ORDER BY eid DESC LIMIT 1 OFFSET ?",
                                             (self.max_rows,)).fetchone()
                        if bound is not None:
                            removed += self._delete_through(conn, t, bound[0], " AND is_open = 0", ())
                    if self.expiry > 0:
                        cut = int(now) - self.expiry
                        # The index's last entry before the cut: ties on time
                        # sort by eid, so this is the highest eid at that time.
                        bound = conn.execute(f"SELECT eid FROM {t} WHERE time < ? ORDER BY time DESC LIMIT 1",
                                             (cut,)).fetchone()
                        if bound is not None:
                            removed += self._delete_through(conn, t, bound[0], " AND time < ? AND is_open = 0", (cut,))
                    with self._shared_lock:
                        self._collect_shared(conn, table)
            except sqlite3.Error as e:
                log.error("event store %s: retention failed: %s", self.path, e)
                self.expired += removed
                return removed
        self.expired += removed
        return removed

    def _delete_through(self, conn: sqlite3.Connection, t: str, bound: int, also: str, params: tuple) -> int:
        """Deletes rows with eid <= bound (and `also`), in eid ranges, one
        short transaction each, skipping the gaps earlier passes left."""
        removed = 0
        low = conn.execute(f"SELECT MIN(eid) FROM {t}").fetchone()[0]
        while low is not None and low <= bound and not self._retention_stop.is_set():
            high = min(bound, low + RETENTION_CHUNK_EIDS - 1)
            removed += conn.execute(f"DELETE FROM {t} WHERE eid BETWEEN ? AND ?{also}",
                                    (low, high, *params)).rowcount
            low = conn.execute(f"SELECT MIN(eid) FROM {t} WHERE eid > ?", (high,)).fetchone()[0]
        return removed

    def _collect_shared(self, conn: sqlite3.Connection, table: str) -> None:
        """Starts a new generation of shared values when the current one is old
        enough, and deletes each closed generation none of whose rows is left.
        Called with _shared_lock held: the writer's bookkeeping stays still."""
        shared = self._shared[table]
        if not shared:
            return
        for col in shared:
            if time.monotonic() - col.started >= SHARED_GENERATION_S:
                col.rotate(self._seq[table])
        oldest = conn.execute(f"SELECT MIN(eid) FROM {_quote(table)}").fetchone()[0]
        for col in shared:
            while col.closed and (oldest is None or col.closed[0][2] < oldest):
                first, end, _ = col.closed.pop(0)
                conn.execute(f"DELETE FROM {_quote(side_table(table, col.column))} WHERE id >= ? AND id < ?",
                             (first, end))

    # --- reading ----------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def query(self, table: str, flt: Filter, limit: int, after_eid: int = 0,
              columns: Iterable[str] | None = None) -> list[dict]:
        """Rows of one table with eid > after_eid matching flt, oldest first.
        Blocking: call it through asyncio.to_thread from the event loop."""
        spec = self.tables[table]
        names = list(columns) if columns else list(spec.column_names)
        shared = [n for n in names if spec.column(n).shared]
        where, params = flt.where()
        try:
            conn = self._reader()
            hint = f" INDEXED BY {_quote(table + '_time')}" if self._narrow_window(conn, table, flt) else ""
            # A shared column comes back as its id (and, for rows from before
            # it was shared, its text), and is put together below once per
            # distinct id: the rows of a window share a handful of ancestries.
            select = [f"t.{_quote(n)} AS {_quote(n)}" for n in names]
            select += [f"t.{_quote(n + '_ref')} AS {_quote(n + '_ref')}" for n in shared]
            sql = (f"SELECT {', '.join(select)} FROM {_quote(table)} t{hint} WHERE eid > ?"
                   + (f" AND {where}" if where else "") + " ORDER BY eid LIMIT ?")
            rows = [dict(r) for r in conn.execute(sql, [after_eid, *params, limit])]
            for name in shared:
                texts = self._shared_texts(spec, name)
                for row in rows:
                    ref = row.pop(name + "_ref")
                    if ref is not None:
                        text = texts.get(ref)
                        if text is None:
                            text = texts[ref] = conn.execute(
                                f"SELECT {column_sql(spec, name)} FROM (SELECT ? AS {_quote(name + '_ref')}, "
                                f"NULL AS {_quote(name)}) t", (ref,)).fetchone()[0]
                        row[name] = text
            return rows
        except sqlite3.Error as e:
            raise StoreError(self.path, f"query on {table} failed: {e}") from e

    def _shared_texts(self, table: Table, name: str) -> dict:
        """Texts of a shared column by side-row id, kept per reading thread: a
        side row never changes, and its id is never given to another value."""
        memo = self._local.__dict__.setdefault("shared_texts", {})
        texts = memo.setdefault((table.name, name), {})
        if len(texts) > SHARED_TEXTS_KEPT:
            texts.clear()
        return texts

    @staticmethod
    def _narrow_window(conn: sqlite3.Connection, table: str, flt: Filter) -> bool:
        """Whether the time index beats walking eids for this filter.

        SQLite alone walks eids (for ORDER BY eid) and tests each row's time,
        which costs the whole table for a one-minute window. The time index
        costs the rows inside the window. Since time grows with eid, the eids
        at the window's edges, found in O(log n) through the time index,
        estimate its size."""
        if not flt.start_time and flt.end_time is None:
            return False
        t = _quote(table)
        lo = conn.execute(f"SELECT eid FROM {t} WHERE time >= ? ORDER BY time LIMIT 1",
                          (flt.start_time or 0,)).fetchone()
        hi = conn.execute(f"SELECT eid FROM {t} WHERE time <= ? ORDER BY time DESC LIMIT 1",
                          (flt.end_time if flt.end_time is not None else 1 << 62,)).fetchone()
        return lo is None or hi is None or hi[0] - lo[0] <= NARROW_WINDOW_ROWS

    def stats(self) -> dict:
        return {"stored": self.stored, "dropped": self.dropped, "rejected": self.rejected,
                "pending": self._pending, "oldest_pending_ms": self.oldest_pending_ms(),
                "max_pending_ms": int(self.max_pending_s * 1000), "max_pending_rows": self._queue_rows_max,
                "commits": self.commits, "expired": self.expired, "path": self.path,
                "last_error": self.last_error, "warnings": list(self.warnings)}

"""The SQLite store on its own: eids, retention, overload, schema upgrades."""
import grp
import json
import os
import sqlite3
import stat
import threading
import time

import pytest

from vajrad.tables import TABLES
from vajrad.client.sql import ReadOnlySql
from vajrad.store.event_store import EventStore, Filter, StoreError

T = "bpf_process_events"


def rows(n, t=None, start=0):
    t = int(time.time()) if t is None else t
    return [TABLES[T].row(pid=start + i, time=t, host_identifier="h", is_open=0) for i in range(n)]


def open_store(path, **kw):
    s = EventStore(str(path), TABLES, expiry=kw.pop("expiry", 0), max_rows=kw.pop("max_rows", 0), **kw)
    s.open()
    s.start()
    return s


def test_eids_are_monotonic_across_reopen_and_retention(tmp_path):
    db = tmp_path / "e.db"
    s = open_store(db, max_rows=5)
    s.submit(T, rows(10))
    s.stop()
    s = open_store(db, max_rows=5)
    assert s.apply_retention() == 5
    s.submit(T, rows(3))
    s.stop()
    s = open_store(db, max_rows=5)
    assert s.apply_retention() == 3
    got = [r["eid"] for r in s.query(T, Filter(start_time=0), 100)]
    s.stop()
    assert got == [9, 10, 11, 12, 13]       # eids never reused, even after deletes


def test_expiry_by_age(tmp_path):
    s = open_store(tmp_path / "e.db", expiry=60)
    now = int(time.time())
    s.submit(T, rows(4, t=now - 120) + rows(2, t=now))
    s.stop()
    s = open_store(tmp_path / "e.db", expiry=60)
    assert s.apply_retention(now) == 4
    assert len(s.query(T, Filter(start_time=0), 100)) == 2
    s.stop()


def test_rows_beyond_the_queue_bound_are_dropped_and_counted(tmp_path):
    s = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0, max_pending_rows=100)
    s.open()                 # writer not started: nothing drains the queue
    assert s.submit(T, rows(80)) == 80
    assert s.submit(T, rows(30)) == 0
    assert s.dropped == 30 and s.pending == 80
    s.start()
    s.stop()
    assert s.stored == 80


def test_commit_callback_gets_eids(tmp_path):
    s = open_store(tmp_path / "e.db")
    got, done = [], threading.Event()
    s.on_commit = lambda batches: (got.extend(batches), done.set())
    s.submit(T, rows(3))
    assert done.wait(5)
    s.stop()
    assert [r["eid"] for _, rs in got for r in rs] == [1, 2, 3]


def test_older_store_gains_new_columns(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute(f'CREATE TABLE "{T}" (eid INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, time INTEGER)')
    con.execute(f'INSERT INTO "{T}" (pid, time) VALUES (42, 1)')
    con.commit()
    con.close()
    s = open_store(db)
    s.submit(T, rows(1, start=7))
    s.stop()
    s = open_store(db)
    got = s.query(T, Filter(start_time=0), 10)
    s.stop()
    assert [(r["eid"], r["pid"]) for r in got] == [(1, 42), (2, 7)]
    assert "cmdline" in got[0]


def test_ancestry_from_before_it_was_shared_still_reads(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute(f'CREATE TABLE "{T}" (eid INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, time INTEGER, '
                f'ancestry TEXT)')
    con.execute(f'INSERT INTO "{T}" (pid, time, ancestry) VALUES (42, 1, \'[{{"pid": 1}}]\')')
    con.commit()
    con.close()
    s = open_store(db)
    s.submit(T, [dict(r, ancestry='[{"pid": 2}]') for r in rows(1, start=7)])
    s.stop()
    s = open_store(db)
    got = s.query(T, Filter(start_time=0), 10)
    s.stop()
    assert [(r["pid"], r["ancestry"]) for r in got] == [(42, '[{"pid": 1}]'), (7, '[{"pid": 2}]')]
    assert ReadOnlySql(str(db)).run(f"SELECT ancestry FROM {T} ORDER BY eid")[1] == \
        [('[{"pid": 1}]',), ('[{"pid": 2}]',)]


def wait_stored(s, n):
    deadline = time.monotonic() + 5
    while s.stored < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.stored == n


def side_ids(db):
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute(f'SELECT id FROM "{T}__ancestry" ORDER BY id')]
    finally:
        con.close()


def test_a_shared_value_is_stored_once_and_read_back_everywhere(tmp_path):
    db = tmp_path / "e.db"
    a, b = '[{"pid": 1, "cmdline": "init"}]', '[{"pid": 9}]'
    s = open_store(db)
    s.submit(T, [dict(r, ancestry=v) for r, v in zip(rows(4), (a, a, b, a))])
    s.stop()
    con = sqlite3.connect(db)
    stored = con.execute(f'SELECT ancestry, ancestry_ref FROM "{T}" ORDER BY eid').fetchall()
    assert [text for text, _ in stored] == [None] * 4 and stored[0][1] == stored[1][1] == stored[3][1]
    assert con.execute(f'SELECT COUNT(*) FROM "{T}__ancestry"').fetchone()[0] == 2
    s = open_store(db)
    assert [r["ancestry"] for r in s.query(T, Filter(start_time=0), 10)] == [a, a, b, a]
    assert [r["ancestry"] for r in s.query(T, Filter(start_time=0), 10, columns=["pid", "ancestry"])] == [a, a, b, a]
    s.stop()
    sql = ReadOnlySql(str(db))
    assert [r[0] for r in sql.run(f"SELECT ancestry FROM {T} ORDER BY eid")[1]] == [a, a, b, a]
    assert sql.run("SELECT COUNT(*) FROM process_events WHERE ancestry LIKE '%init%'")[1] == [(3,)]
    columns, _ = sql.run(f"SELECT * FROM {T}")
    assert "ancestry_ref" not in columns and "ancestry" in columns


def test_shared_values_go_when_no_row_points_at_them(tmp_path, monkeypatch):
    import vajrad.store.event_store as store_mod
    monkeypatch.setattr(store_mod, "SHARED_GENERATION_S", 0)     # a new generation every pass
    db = tmp_path / "e.db"
    a, b = '[{"pid": 1}]', '[{"pid": 2}]'
    s = open_store(db, max_rows=2, retention_interval=3600)
    s.submit(T, [dict(r, ancestry=a) for r in rows(3)])
    wait_stored(s, 3)
    assert s.apply_retention() == 1 and side_ids(db) == [1]      # rows 2 and 3 still point at it
    s.submit(T, [dict(r, ancestry=v) for r, v in zip(rows(2), (a, b))])
    wait_stored(s, 5)
    assert s.apply_retention() == 2
    assert side_ids(db) == [2, 3]            # a, written again in the new generation, and b
    assert [r["ancestry"] for r in s.query(T, Filter(start_time=0), 10)] == [a, b]
    s.stop()
    s = open_store(db, max_rows=2, retention_interval=3600)     # restart: the old generation survives
    s.submit(T, [dict(r, ancestry=b) for r in rows(2)])
    wait_stored(s, 2)
    assert s.apply_retention() == 2
    assert side_ids(db) == [4]
    assert [r["ancestry"] for r in s.query(T, Filter(start_time=0), 10)] == [b, b]
    s.stop()


def test_wal_and_full_sync(tmp_path):
    s = open_store(tmp_path / "e.db")
    # synchronous is a property of the writer's connection, not of the file
    assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2         # FULL
    s.stop()
    con = sqlite3.connect(tmp_path / "e.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = [r[1] for r in con.execute(f'PRAGMA index_list("{T}")')]
    assert f"{T}_time" in indexes


def test_both_query_plans_give_the_same_rows(tmp_path, monkeypatch):
    import vajrad.store.event_store as store_mod
    s = open_store(tmp_path / "e.db")
    now = int(time.time())
    s.submit(T, [dict(r, time=now - 100 + i % 50) for i, r in enumerate(rows(300))])
    s.stop()
    s = open_store(tmp_path / "e.db")
    flt = Filter(start_time=now - 80, end_time=now - 60)
    conn = s._reader()
    assert s._narrow_window(conn, T, flt)
    via_index = s.query(T, flt, 1000)
    monkeypatch.setattr(store_mod, "NARROW_WINDOW_ROWS", -1)
    assert not s._narrow_window(conn, T, flt)
    via_eids = s.query(T, flt, 1000)
    s.stop()
    assert via_index == via_eids and len(via_index) == 21 * 6
    assert [r["eid"] for r in via_index] == sorted(r["eid"] for r in via_index)


def side_rows(db):
    con = sqlite3.connect(db)
    try:
        return con.execute(f'SELECT id, value, parent, depth FROM "{T}__ancestry" ORDER BY id').fetchall()
    finally:
        con.close()


def lines():
    """Ancestry texts from a ProcessCache: pid 5 and pid 6 both children of 4."""
    from vajrad.enrich.process_cache import TICK_NS, ProcessCache
    cache = ProcessCache(size=100, max_depth=3, proc="/nonexistent")
    cache.executed(1, TICK_NS, 0, 0, "/sbin/init", "init")
    for pid, ppid in ((2, 1), (3, 2), (4, 3), (5, 4), (6, 4)):
        cache.forked(pid, pid * TICK_NS, ppid, ppid * TICK_NS)
        cache.executed(pid, pid * TICK_NS, ppid, ppid * TICK_NS, f"/bin/p{pid}", f'p{pid} "quoted"\nline')
    return [cache.ancestry(pid, pid * TICK_NS) for pid in (5, 6, 4, 1)]


def test_ancestry_chains_keep_each_entry_once(tmp_path):
    db = tmp_path / "e.db"
    texts = lines()
    assert [len(json.loads(t)) for t in texts] == [3, 3, 3, 1]     # max_depth 3
    s = open_store(db)
    s.submit(T, [dict(r, ancestry=v) for r, v in zip(rows(6), texts + ["[]", texts[0]])])
    s.stop()
    # One side row per process image (1, 2, 3, 4, 5, 6) and one for "[]",
    # not one whole text per distinct array.
    side = side_rows(db)
    entries = [json.loads(v)["pid"] for _, v, _, depth in side if depth]
    assert sorted(entries) == [1, 2, 3, 4, 5, 6] and len(side) == 7
    s = open_store(db)
    want = texts + ["[]", texts[0]]
    assert [r["ancestry"] for r in s.query(T, Filter(start_time=0), 10)] == want
    s.stop()
    sql = ReadOnlySql(str(db))
    assert [r[0] for r in sql.run(f"SELECT ancestry FROM {T} ORDER BY eid")[1]] == want
    assert sql.run(f"SELECT JSON_ARRAY_LENGTH(ancestry), JSON_EXTRACT(ancestry, '$[2].pid') FROM {T} "
                   f"ORDER BY eid LIMIT 1")[1] == [(3, 3)]


def test_a_chain_is_written_again_in_a_new_generation(tmp_path, monkeypatch):
    """Nothing of a generation points into an older one, so deleting a
    generation never leaves a chain without its ancestors."""
    import vajrad.store.event_store as store_mod
    monkeypatch.setattr(store_mod, "SHARED_GENERATION_S", 0)
    db = tmp_path / "e.db"
    a, b = lines()[:2]
    s = open_store(db, max_rows=1, retention_interval=3600)
    s.submit(T, [dict(r, ancestry=a) for r in rows(1)])
    wait_stored(s, 1)
    s.apply_retention()                      # closes the generation holding a's chain
    s.submit(T, [dict(r, ancestry=b) for r in rows(1)])
    wait_stored(s, 2)
    s.apply_retention()                      # a's row goes, and with it its generation
    assert [r["ancestry"] for r in s.query(T, Filter(start_time=0), 10)] == [b]
    ids = {i for i, *_ in side_rows(db)}
    assert all(parent in ids for _, _, parent, _ in side_rows(db) if parent)
    s.stop()


def test_whole_values_from_before_chains_still_read(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute(f'CREATE TABLE "{T}" (eid INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, time INTEGER, '
                f'ancestry TEXT, ancestry_ref INTEGER)')
    con.execute(f'CREATE TABLE "{T}__ancestry" (id INTEGER PRIMARY KEY, value TEXT)')
    con.execute(f'INSERT INTO "{T}__ancestry" VALUES (1, \'[{{"pid": 1}}]\')')
    con.execute(f'INSERT INTO "{T}" (pid, time, ancestry_ref) VALUES (42, 1, 1)')
    con.commit()
    con.close()
    s = open_store(db)
    s.submit(T, [dict(r, ancestry=lines()[0]) for r in rows(1, start=7)])
    s.stop()
    s = open_store(db)
    got = s.query(T, Filter(start_time=0), 10)
    s.stop()
    assert got[0]["ancestry"] == '[{"pid": 1}]' and pids_of(got[1]["ancestry"]) == [5, 4, 3]


def pids_of(text):
    return [e["pid"] for e in json.loads(text)]


def test_a_chain_shared_by_two_tables_is_written_once_in_each(tmp_path):
    """A node remembers its side row per event table: rows of one table do
    not make the other write the chain again."""
    db = tmp_path / "e.db"
    a = lines()[0]                  # pid 5's line: nodes of 5, 4, 3, 2 and 1
    s = open_store(db)
    for i in range(3):              # separate commits, each with rows of both tables
        s.submit(T, [dict(r, ancestry=a) for r in rows(2)])
        s.submit("bpf_socket_events", [TABLES["bpf_socket_events"].row(pid=r["pid"], time=r["time"], ancestry=a)
                                       for r in rows(2)])
        wait_stored(s, 4 * (i + 1))
        time.sleep(0.3)
    s.stop()
    con = sqlite3.connect(db)
    for table in (T, "bpf_socket_events"):
        assert con.execute(f'SELECT COUNT(*) FROM "{table}__ancestry"').fetchone()[0] == 5, table
    s = open_store(db)
    assert {r["ancestry"] for t in (T, "bpf_socket_events") for r in s.query(t, Filter(start_time=0), 10)} == {a}
    s.stop()


def test_rows_whose_keys_are_not_the_columns_are_refused_and_counted(tmp_path, caplog):
    s = open_store(tmp_path / "e.db")
    good = TABLES[T].row(pid=1, time=1)
    misspelt = dict(TABLES[T].row(pid=2, time=1))
    misspelt["cmdlin"] = misspelt.pop("cmdline")
    extra = dict(TABLES[T].row(pid=3, time=1), container="x")
    missing = TABLES[T].row(pid=4, time=1)
    del missing["path"]
    assert s.submit(T, [good, misspelt, extra, missing, dict(misspelt, pid=5)]) == 1
    s.stop()
    assert s.stats()["rejected"] == 4
    s = open_store(tmp_path / "e.db")
    assert [r["pid"] for r in s.query(T, Filter(), 10)] == [1]
    s.stop()
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # Each bad key named once, with its table, however many rows carry it.
    assert len(refused) == 4
    assert any("'cmdlin'" in m and "unknown" in m and T in m for m in refused)
    assert any("'cmdline'" in m and "missing" in m for m in refused)
    assert any("'container'" in m and "unknown" in m for m in refused)
    assert any("'path'" in m and "missing" in m for m in refused)


def count_rows(path, table=T) -> int:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]
    finally:
        con.close()


def test_retention_runs_on_a_quiet_store(tmp_path):
    """Issue 21, defect 1: the writer blocked on its queue, so retention ran
    only after a write and expired rows outlived events_expiry on a quiet host."""
    db = tmp_path / "e.db"
    now = int(time.time())
    s = open_store(db)                        # no expiry while seeding
    s.submit(T, rows(5, t=now - 600) + rows(2, t=now + 600))
    s.stop()
    assert count_rows(db) == 7
    s = open_store(db, expiry=60, retention_interval=0.1)
    try:
        deadline = time.monotonic() + 20      # no row is submitted from here on
        # the count moves just after the delete commits: wait for both
        while (count_rows(db) != 2 or s.expired != 5) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count_rows(db) == 2 and s.expired == 5
        assert s.stored == 0 and s.commits == 0
    finally:
        s.stop()


def test_a_full_batch_is_committed_without_waiting_for_its_age(tmp_path):
    s = open_store(tmp_path / "e.db", max_pending_ms=60_000, batch_rows=50)
    done = threading.Event()
    s.on_commit = lambda batches: done.set()
    try:
        s.submit(T, rows(1))
        wait_stored(s, 1)                     # the first row after a quiet spell goes at once
        done.clear()
        s.submit(T, rows(30))
        s.submit(T, rows(30))
        assert done.wait(30)                  # not 60 s: by size, not by age
        assert s.stored == 61
    finally:
        s.stop()


def test_status_shows_pending_rows_and_the_age_of_the_oldest(tmp_path):
    s = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0, max_pending_ms=150)
    s.open()                 # writer not started: rows stay queued
    assert s.stats()["oldest_pending_ms"] == 0 and s.stats()["pending"] == 0
    t0 = time.monotonic()
    s.submit(T, rows(3))
    s.submit(T, rows(4))
    time.sleep(0.1)
    waited_ms = (time.monotonic() - t0) * 1000
    stats = s.stats()
    assert stats["pending"] == 7 and stats["oldest_pending_ms"] >= int(waited_ms) - 1
    assert stats["max_pending_ms"] == 150
    s.start()
    s.stop()
    assert s.stats()["pending"] == 0 and s.stats()["oldest_pending_ms"] == 0 and s.stored == 7


def modes(*paths):
    return [stat.S_IMODE(os.stat(p).st_mode) for p in paths]


def vajra_gid():
    try:
        return grp.getgrnam("vajra").gr_gid
    except KeyError:
        return None


def test_store_files_are_private_whatever_the_umask(tmp_path):
    """Issue 17 item 4: under umask 022 the store, -wal and -shm were 0644."""
    db = tmp_path / "new" / "sub" / "e.db"
    old = os.umask(0)
    try:
        s = open_store(db)
        s.submit(T, rows(3))
        s.stop()
        s = open_store(db)        # -wal and -shm exist while it is open
        files = [db, f"{db}-wal", f"{db}-shm"]
        assert modes(*files) == [0o640] * 3
        assert modes(tmp_path / "new", tmp_path / "new" / "sub") == [0o750] * 2
        if os.geteuid() == 0 and vajra_gid() is not None:
            assert {os.stat(p).st_gid for p in files} == {vajra_gid()}
        assert s.stats()["warnings"] == []
        s.stop()
    finally:
        os.umask(old)


def test_an_older_open_store_is_tightened_and_a_tighter_one_kept(tmp_path):
    db = tmp_path / "e.db"
    s = open_store(db)
    s.submit(T, rows(2))
    s.stop()
    os.chmod(db, 0o666)
    (tmp_path / "e.db-wal").write_bytes(b"")
    os.chmod(tmp_path / "e.db-wal", 0o644)
    s = open_store(db)
    assert modes(db) == [0o640]
    s.stop()
    os.chmod(db, 0o600)
    s = open_store(db)
    assert modes(db) == [0o600]
    assert len(s.query(T, Filter(start_time=0), 10)) == 2
    s.stop()


def test_an_open_directory_is_reported_and_a_writable_one_refused(tmp_path):
    readable = tmp_path / "readable"
    readable.mkdir()
    os.chmod(readable, 0o755)
    s = open_store(readable / "e.db")
    [warning] = s.stats()["warnings"]
    assert str(readable) in warning and "0755" in warning
    assert modes(readable) == [0o755]           # not ours to change
    s.stop()
    writable = tmp_path / "writable"
    writable.mkdir()
    os.chmod(writable, 0o1777)
    with pytest.raises(StoreError, match="writable by every user"):
        EventStore(str(writable / "e.db"), TABLES, expiry=0, max_rows=0).open()
    assert not (writable / "e.db").exists()


# --- units' saved state (log offsets, journal cursors, watermarks) -----------------

def test_unit_state_is_committed_with_its_rows_and_read_back(tmp_path):
    db = tmp_path / "e.db"
    s = open_store(db)
    s.submit(T, rows(2), state=[("logs", "file:1:2", {"offset": 10}), ("logs", "other", [1, "x"])])
    s.submit(T, [], state=[("logs", "file:1:2", {"offset": 25})])     # state alone, no rows
    s.submit(T, rows(1), state=[("alerts", "watermark", 7), ("logs", "other", None)])
    s.stop()
    s = open_store(db)
    assert s.load_state("logs") == {"file:1:2": {"offset": 25}}    # None forgot "other"
    assert s.load_state("alerts") == {"watermark": 7}
    assert s.load_state("nobody") == {}
    s.stop()
    assert count_rows(db) == 3


def test_unit_state_of_dropped_rows_is_not_saved(tmp_path):
    s = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0, max_pending_rows=100)
    s.open()
    assert s.submit(T, rows(80), state=[("logs", "k", 80)]) == 80
    assert s.submit(T, rows(30), state=[("logs", "k", 110)]) == 0     # over the bound: neither
    s.start()
    s.stop()
    s = open_store(tmp_path / "e.db")
    assert s.load_state("logs") == {"k": 80}
    s.stop()


def test_unit_state_rolls_back_with_its_rows(tmp_path, monkeypatch):
    """A failed transaction loses the rows and the position together, so the
    unit reads them again rather than skipping them."""
    db = tmp_path / "e.db"
    s = open_store(db)
    s.submit(T, rows(1), state=[("logs", "k", 1)])
    s.stop()
    s = open_store(db)
    real_insert = EventStore._insert

    def failing_insert(self, conn, table, params, count):
        raise sqlite3.OperationalError("disk I/O error (injected)")
    monkeypatch.setattr(EventStore, "_insert", failing_insert)
    s.submit(T, rows(1), state=[("logs", "k", 2)])
    s.stop()
    monkeypatch.setattr(EventStore, "_insert", real_insert)
    s = open_store(db)
    assert s.load_state("logs") == {"k": 1}
    s.stop()
    assert count_rows(db) == 1
def test_retention_deletes_in_short_eid_ranges(tmp_path, monkeypatch):
    """Issue 20, item 3: retention deletes oldest eids first, a bounded range
    per transaction, so a reader (and the writer, waiting for the write lock)
    sees it advance chunk by chunk rather than behind one long DELETE."""
    import vajrad.store.event_store as store_mod
    monkeypatch.setattr(store_mod, "RETENTION_CHUNK_EIDS", 500, raising=False)
    db = tmp_path / "e.db"
    now = int(time.time())
    s = open_store(db, batch_rows=100_000, max_pending_rows=100_000)
    s.submit(T, rows(20_000, t=now - 600) + rows(3, t=now + 600))
    s.stop()
    s = open_store(db, expiry=60, retention_interval=3600)
    seen, done = set(), threading.Event()

    def watch():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        while not done.is_set():
            seen.add(con.execute(f'SELECT COUNT(*) FROM "{T}"').fetchone()[0])
        con.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        removed = s.apply_retention(now)
    finally:
        done.set()
        watcher.join()
        s.stop()
    assert removed == 20_000 and count_rows(db) == 3
    partial = sorted(n for n in seen if 3 < n < 20_003)
    assert partial and all((20_003 - n) % 500 == 0 for n in partial), partial      # whole chunks only


def test_expiry_keeps_a_row_newer_than_later_ones(tmp_path):
    """Rows arrive about in time order, not exactly: expiry by eid range keeps
    its time test, so a fresh row among expired eids stays."""
    db = tmp_path / "e.db"
    now = int(time.time())
    s = open_store(db)
    s.submit(T, rows(2, t=now - 600) + rows(1, t=now, start=50) + rows(2, t=now - 600, start=60))
    s.stop()
    s = open_store(db, expiry=60)
    assert s.apply_retention(now) == 4
    assert [r["pid"] for r in s.query(T, Filter(start_time=0), 10)] == [50]
    s.stop()


def test_a_row_after_a_quiet_spell_is_committed_at_once_and_commits_stay_spaced(tmp_path):
    """Issue 20, item 2: a row waited max_pending_ms in the queue even when
    nothing had been committed for minutes; now only rows arriving within
    max_pending_ms of the last commit wait, for what is left of it."""
    s = open_store(tmp_path / "e.db", max_pending_ms=60_000)
    commits = []
    s.on_commit = lambda batches: commits.append(time.monotonic())
    try:
        s.submit(T, rows(2))
        wait_stored(s, 2)                     # not 60 s
    finally:
        s.stop()
    s = open_store(tmp_path / "e.db", max_pending_ms=400)
    s.on_commit = lambda batches: commits.append(time.monotonic())
    try:
        s.submit(T, rows(1))
        wait_stored(s, 1)
        s.submit(T, rows(1))                  # within 400 ms of that commit: waits for the rest of it
        wait_stored(s, 2)
        assert commits[-1] - commits[-2] >= 0.4 - 0.01
    finally:
        s.stop()
# --- units' transactions and state (EventStore.transact, unit_state) ---------

F = "file_events"       # no shared column: a transaction may insert into it


def frows(n, t=None):
    t = int(time.time()) if t is None else t
    return [TABLES[F].row(target_path=f"/f{i}", time=t) for i in range(n)]

def test_a_transaction_commits_rows_and_state_together(tmp_path):
    db = tmp_path / "e.db"
    s = open_store(db)
    committed = []
    s.on_commit = committed.extend
    s.submit(T, rows(2))

    def apply(tx):
        # Runs after the rows queued before it: it sees and may update them.
        tx.conn.execute(f'UPDATE "{T}" SET is_open = 1 WHERE eid = 2')
        inserted = tx.insert(F, frows(1))
        tx.set_state("unit_a", "watermark", "2")
        tx.set_state("unit_b", "other", "x")
        return inserted[0]["eid"]

    assert s.transact(apply).result(10) == 1
    assert s.load_state("unit_a") == {"watermark": "2"}
    s.transact(lambda tx: tx.set_state("unit_b", "other", None)).result(10)
    assert s.load_state("unit_b") == {}
    assert [(t, [r["eid"] for r in rs]) for t, rs in committed] == [(T, [1, 2]), (F, [1])]
    s.stop()
    s = open_store(db)                           # state and rows survive a restart
    assert s.load_state("unit_a") == {"watermark": "2"}
    got = {r["eid"]: r["is_open"] for r in s.query(T, Filter(start_time=0), 10)}
    assert got == {1: 0, 2: 1}
    assert [r["target_path"] for r in s.query(F, Filter(start_time=0), 10)] == ["/f0"]
    s.stop()


def test_a_failed_transaction_keeps_nothing_of_its_own_and_nothing_else_is_lost(tmp_path):
    s = open_store(tmp_path / "e.db")
    committed = []
    s.on_commit = committed.extend

    def apply(tx):
        tx.insert(F, frows(3))
        tx.set_state("u", "k", "v")
        raise ValueError("the unit changed its mind")

    s.submit(T, rows(2))
    failed = s.transact(apply)
    with pytest.raises(ValueError, match="changed its mind"):
        failed.result(10)
    s.submit(T, rows(1))
    assert s.transact(lambda tx: tx.insert(F, frows(1))[0]["eid"]).result(10) == 1   # no eid burnt
    assert s.load_state("u") == {}
    s.stop()
    assert [(t, r["eid"]) for t, rs in committed for r in rs] == [(T, 1), (T, 2), (T, 3), (F, 1)]
    assert s.stored == 4


def test_a_transaction_refuses_rows_that_are_not_its_tables(tmp_path):
    s = open_store(tmp_path / "e.db")
    with pytest.raises(StoreError, match="do not fit its columns"):
        s.transact(lambda tx: tx.insert(F, [{"pid": 1, "nope": 2}])).result(10)
    with pytest.raises(StoreError, match="shared columns"):
        s.transact(lambda tx: tx.insert(T, rows(1))).result(10)
    with pytest.raises(StoreError, match="not an event table"):
        s.transact(lambda tx: tx.insert("no_such_table", [{}])).result(10)
    s.stop()


def test_retention_keeps_rows_awaiting_triage(tmp_path):
    s = open_store(tmp_path / "e.db", expiry=60, max_rows=2)
    now = int(time.time())
    old = rows(4, t=now - 120)
    old[1]["is_open"] = 1
    s.submit(T, old + rows(3, t=now))
    s.stop()
    s = open_store(tmp_path / "e.db", expiry=60, max_rows=2)
    s.apply_retention(now)
    left = [(r["eid"], r["is_open"]) for r in s.query(T, Filter(start_time=0), 100)]
    s.stop()
    assert left == [(2, 1), (6, 0), (7, 0)]

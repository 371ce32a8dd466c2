"""The SQLite store on its own: eids, retention, overload, schema upgrades."""
import json
import sqlite3
import threading
import time

from vajrad.tables import TABLES
from vajrad.client.sql import ReadOnlySql
from vajrad.store.event_store import EventStore, Filter

T = "bpf_process_events"


def rows(n, t=None, start=0):
    t = int(time.time()) if t is None else t
    return [{"pid": start + i, "time": t, "host_identifier": "h", "is_open": 0} for i in range(n)]


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
    s = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0, queue_rows=100)
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
        s.submit("bpf_socket_events", [dict(r, ancestry=a) for r in rows(2)])
        wait_stored(s, 4 * (i + 1))
        time.sleep(0.3)
    s.stop()
    con = sqlite3.connect(db)
    for table in (T, "bpf_socket_events"):
        assert con.execute(f'SELECT COUNT(*) FROM "{table}__ancestry"').fetchone()[0] == 5, table
    s = open_store(db)
    assert {r["ancestry"] for t in (T, "bpf_socket_events") for r in s.query(t, Filter(start_time=0), 10)} == {a}
    s.stop()

"""The SQLite store on its own: eids, retention, overload, schema upgrades."""
import sqlite3
import threading
import time

from vajrad.schema import TABLES
from vajrad.store import EventStore, Filter

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


def test_wal_and_full_sync(tmp_path):
    s = open_store(tmp_path / "e.db")
    s.stop()
    con = sqlite3.connect(tmp_path / "e.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = [r[1] for r in con.execute(f'PRAGMA index_list("{T}")')]
    assert f"{T}_time" in indexes


def test_both_query_plans_give_the_same_rows(tmp_path, monkeypatch):
    import vajrad.store as store_mod
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

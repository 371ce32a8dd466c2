"""vajractl query: read-only SQL over the local store."""
import json
import os
import subprocess
import sys

import pytest

from test_api import NOW, seed


@pytest.fixture
def store(workdir):
    db = os.path.join(workdir, "q.db")
    seed(db)
    return db


def query(db, sql, *extra):
    return subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "--socket", "/nonexistent.sock", "query",
                           "--database", db, *extra, sql], capture_output=True, text=True)


def test_select_json_and_alias(store):
    r = query(store, "SELECT pid, cmdline FROM bpf_process_events WHERE pid >= 1028 ORDER BY pid", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == [
        {"pid": 1028, "cmdline": "p28 --x"}, {"pid": 1029, "cmdline": "p29 --x"}]
    # osquery's name for the table, as the process-ancestry README's queries use it
    r = query(store, "SELECT COUNT(*) AS n FROM process_events WHERE path LIKE '%/p1%'")
    assert r.returncode == 0 and r.stdout.split() == ["n", "11"]
    r = query(store, "SELECT JSON_ARRAY_LENGTH(json_cmdline) AS depth FROM process_events LIMIT 1")
    assert r.returncode == 0 and r.stdout.split() == ["depth"]        # NULL json_cmdline in seed


@pytest.mark.parametrize("sql,needle", [
    ("DELETE FROM bpf_process_events", "DELETE"),
    ("INSERT INTO bpf_process_events (pid) VALUES (1)", "INSERT"),
    ("UPDATE bpf_process_events SET pid = 0", "UPDATE"),
    ("DROP TABLE bpf_process_events", "schema change"),
    ("CREATE TABLE x (a)", "schema change"),
    ("CREATE TEMP VIEW v AS SELECT 1", "schema change"),
    ("ATTACH DATABASE '/tmp/x.db' AS x", "ATTACH"),
    ("SELECT load_extension('/tmp/evil.so')", "load_extension"),
    ("PRAGMA writable_schema = 1", "PRAGMA"),
    ("SELECT * FROM pragma_journal_mode('delete')", "refused"),
    ("SELECT * FROM pragma_writable_schema", "refused"),
])
def test_writes_attach_and_extensions_are_refused(store, sql, needle):
    r = query(store, sql)
    assert r.returncode == 1 and "read-only" in r.stderr and needle in r.stderr
    assert query(store, "SELECT COUNT(*) FROM bpf_process_events").stdout.split()[-1] == "30"


def test_read_only_pragma_functions_are_allowed(store):
    """Issue 17 item 8: pragma_table_info() was refused as a PRAGMA."""
    r = query(store, "SELECT name FROM pragma_table_info('bpf_process_events') WHERE name IN ('pid', 'cmdline')"
                     " ORDER BY cid", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["name"] for line in r.stdout.splitlines()] == ["pid", "cmdline"]
    r = query(store, "SELECT COUNT(*) > 0 AS n FROM pragma_index_list('bpf_process_events', 'main')")
    assert r.returncode == 0 and r.stdout.split() == ["n", "1"], r.stderr


def test_bad_sql_and_missing_store(store, workdir):
    r = query(store, "SELEC nonsense")
    assert r.returncode == 1 and "syntax error" in r.stderr
    r = query(store, "SELECT 1; SELECT 2")
    assert r.returncode == 1 and "one statement" in r.stderr
    r = query(os.path.join(workdir, "absent.db"), "SELECT 1")
    assert r.returncode == 1 and "no event store" in r.stderr


PACK_ROWS = [   # (path, uid, probe_error)
    ("/tmp/dropper", 1000, 0), ("/dev/shm/x", 1000, 0), ("/var/tmp/y", 0, 0),
    ("/usr/bin/bash", 33, 0), ("/usr/bin/dash", 0, 0), ("/usr/bin/sh", 1000, 0),
    ("/home/eve/tool", 0, 0), ("/usr/bin/ls", 0, 0), ("/opt/app/run", 0, 0),
    ("/usr/bin/curl", 1000, 0), ("/usr/bin/wget", 1000, 0), ("/usr/bin/curly", 1000, 0),
    ("/usr/bin/cat", 1000, 1), ("/usr/bin/nc", 1000, 2),
]
# What each of the pack's queries must find in PACK_ROWS, by path.
PACK_EXPECTED = {
    "vajra_exec_from_tmp": {"/tmp/dropper", "/dev/shm/x", "/var/tmp/y"},
    "vajra_shells_by_services": {"/usr/bin/bash"},
    "vajra_root_execs_outside_system_paths": {"/var/tmp/y", "/home/eve/tool"},
    "vajra_download_tools": {"/usr/bin/curl", "/usr/bin/wget", "/usr/bin/nc"},
    "vajra_truncated_probes": {"/usr/bin/cat", "/usr/bin/nc"},
}


def test_example_pack_queries_find_what_they_should(workdir):
    """The pack is written for osquery (tables by their vajra_ names there);
    over the local store the same SQL runs with vajrad's table names."""
    from pathlib import Path
    from vajrad.client.sql import ReadOnlySql
    from vajrad.osquery.extension import osquery_name
    from vajrad.store.event_store import EventStore
    from vajrad.tables import TABLES
    db_path = os.path.join(workdir, "pack.db")
    store = EventStore(db_path, TABLES, expiry=0, max_rows=0)
    store.open()
    store.start()
    store.submit("bpf_process_events", [
        {"pid": 2000 + i, "tid": 2000 + i, "parent": 1, "uid": uid, "syscall": "exec", "path": path,
         "cmdline": path, "cwd": "/", "time": NOW, "host_identifier": "h", "exit_code": "0",
         "probe_error": probe_error, "ntime": str(i)}
        for i, (path, uid, probe_error) in enumerate(PACK_ROWS)])
    store.stop()
    pack = json.loads((Path(__file__).resolve().parent.parent / "docs/examples/vajra-pack.json").read_text())
    assert set(pack["queries"]) == set(PACK_EXPECTED)
    db = ReadOnlySql(db_path)
    try:
        for name, q in pack["queries"].items():
            sql = q["query"]
            for table in TABLES:
                assert f" {table} " not in sql, (name, "osquery knows the table as " + osquery_name(table))
                sql = sql.replace(f" {osquery_name(table)} ", f" {table} ")
            columns, rows = db.run(sql)
            found = {dict(zip(columns, r))["path"] for r in rows}
            assert found == PACK_EXPECTED[name], name
    finally:
        db.close()

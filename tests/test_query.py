"""vajractl query: read-only SQL over the local store."""
import json
import os
import subprocess
import sys

import pytest

from test_api import seed


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


def test_example_pack_queries_run(store):
    from pathlib import Path
    from vajrad.client.sql import ReadOnlySql
    pack = json.loads((Path(__file__).resolve().parent.parent / "docs/examples/vajra-pack.json").read_text())
    db = ReadOnlySql(store)
    try:
        for name, q in pack["queries"].items():
            columns, _ = db.run(q["query"])
            assert columns, name
    finally:
        db.close()

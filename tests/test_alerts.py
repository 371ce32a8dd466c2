"""The detection engine in-process on a real store (no root): rules loaded and
refused, matches, suppression, exceptions, watermarks across restarts, triage."""
import asyncio
import json
import textwrap
import time

import pytest

from vajrad.collectors.alerts import rules as rule_files
from vajrad.collectors.alerts.engine import AlertEngine
from vajrad.errors import RequestError
from vajrad.store.event_store import EventStore, Filter
from vajrad.tables import TABLES

P = "bpf_process_events"


def write_rules(directory, name, text):
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(textwrap.dedent(text))


def proc(path, cmdline="", pid=1, uid=0, t=None, syscall="exec", **kw):
    return TABLES[P].row(path=path, cmdline=cmdline, pid=pid, uid=uid, syscall=syscall,
                         time=int(time.time()) if t is None else t, ancestry="[]", **kw)


class Rig:
    """A store, and an engine fed its commits the way the daemon feeds them."""

    def __init__(self, db, rule_dirs):
        self.db, self.rule_dirs = str(db), [str(d) for d in rule_dirs]

    async def __aenter__(self):
        self.store = EventStore(self.db, TABLES, expiry=0, max_rows=0, max_pending_ms=20)
        self.store.open()
        loop = asyncio.get_running_loop()
        self.engine = AlertEngine(self.store, TABLES, self.rule_dirs, interval_ms=10)
        self.published = []

        def committed(batches):
            for table, rows in batches:
                self.published.append((table, rows))
                if table in self.engine.observes:
                    self.engine.observe(table, rows)

        self.store.on_commit = lambda b: loop.call_soon_threadsafe(committed, b)
        self.store.start()
        await self.engine.start()
        return self

    async def __aexit__(self, *exc):
        await self.engine.stop()
        await asyncio.to_thread(self.store.stop)

    async def submit(self, table, rows):
        """Submits rows and waits until every enabled rule has evaluated them."""
        target = await asyncio.to_thread(self._high, table) + len(rows)
        self.store.submit(table, rows)
        deadline = time.monotonic() + 10
        while True:
            high = await asyncio.to_thread(self._high, table)
            if high >= target and all(self.engine.watermarks.get(r.id, 0) >= high for r in self.engine.rules.values()
                            if r.enabled and r.table == table):
                return
            assert time.monotonic() < deadline, (high, self.engine.watermarks, self.engine.stats())
            await asyncio.sleep(0.02)

    def _high(self, table):
        rows = self.store.query(table, Filter(start_time=0), 100000)
        return rows[-1]["eid"] if rows else 0

    async def alerts(self, **flt):
        return await asyncio.to_thread(self.store.query, "alerts", Filter(start_eid=0, **flt), 1000)

    async def rows(self, table, **flt):
        return await asyncio.to_thread(self.store.query, table, Filter(start_eid=0, **flt), 1000)


TMP_RULE = """
- id: test.exec_tmp
  version: 2
  name: exec from /tmp
  table: bpf_process_events
  where: path LIKE '/tmp/%'
  severity: high
  mitre: [T1059]
  group_by: [path, uid]
  suppress_for: 3600
  exceptions:
    - cmdline LIKE '%--allowed%'
"""


def test_a_match_opens_an_alert_and_marks_the_event_open(tmp_path):
    write_rules(tmp_path / "r", "a.yml", TMP_RULE)

    async def scenario():
        async with Rig(tmp_path / "e.db", [tmp_path / "r"]) as rig:
            await rig.submit(P, [proc("/usr/bin/true"), proc("/tmp/x", "/tmp/x -v"), proc("/usr/bin/ls")])
            alerts = await rig.alerts()
            assert len(alerts) == 1
            a = alerts[0]
            assert (a["rule_id"], a["rule_version"], a["severity"], a["status"], a["is_open"], a["hit_count"]) == \
                ("test.exec_tmp", 2, "high", "open", 1, 1)
            assert a["event_table"] == P and a["first_eid"] == a["last_eid"] == 2
            assert json.loads(a["mitre"]) == ["T1059"] and json.loads(a["group_key"]) == ["/tmp/x", 0]
            assert [e["eid"] for e in await rig.rows(P, is_open=True)] == [2]
            assert [t for t, _ in rig.published].count("alerts") == 1       # streamed like any row
            stats = rig.engine.stats()["rules"]["test.exec_tmp"]
            assert stats["rows_evaluated"] == 3 and stats["alerts"] == 1 and stats["time_ms"] > 0

    asyncio.run(scenario())


def test_suppression_by_group_within_the_window_with_nulls_and_an_exception(tmp_path):
    write_rules(tmp_path / "r", "a.yml", TMP_RULE)
    now = int(time.time())

    async def scenario():
        async with Rig(tmp_path / "e.db", [tmp_path / "r"]) as rig:
            await rig.submit(P, [proc("/tmp/x", t=now), proc("/tmp/x", t=now + 5),        # one alert, 2 hits
                                 proc("/tmp/x", uid=1000, t=now),                        # another group
                                 proc("/tmp/x", uid=None, t=now), proc("/tmp/x", uid=None, t=now + 1),  # NULL groups together
                                 proc("/tmp/x", "/tmp/x --allowed", t=now)])             # excepted
            await rig.submit(P, [proc("/tmp/x", t=now + 3599),                           # still inside the window
                                 proc("/tmp/x", t=now + 3601)])                          # past it: a new alert
            alerts = await rig.alerts()
            uid = [json.loads(a["group_key"])[1] for a in alerts]
            got = sorted((-1 if u is None else u, a["first_seen"] - now, a["hit_count"],
                          a["last_seen"] - now) for u, a in zip(uid, alerts))
            assert got == [(-1, 0, 2, 1), (0, 0, 3, 3599), (0, 3601, 1, 3601), (1000, 0, 1, 0)]
            excepted = [e["eid"] for e in await rig.rows(P) if "--allowed" in e["cmdline"]]
            assert excepted and not any(e["is_open"] for e in await rig.rows(P) if e["eid"] in excepted)

    asyncio.run(scenario())


def test_watermarks_survive_a_restart_without_firing_twice_or_skipping(tmp_path):
    write_rules(tmp_path / "r", "a.yml", TMP_RULE.replace("suppress_for: 3600", "suppress_for: 0"))
    db = tmp_path / "e.db"

    async def first():
        async with Rig(db, [tmp_path / "r"]) as rig:
            await rig.submit(P, [proc("/tmp/a")])
            assert len(await rig.alerts()) == 1

    async def down():
        # Rows committed while no engine runs: as if vajrad died between the
        # commit of the events and the commit of their alerts.
        store = EventStore(str(db), TABLES, expiry=0, max_rows=0)
        store.open()
        store.start()
        store.submit(P, [proc("/tmp/b"), proc("/usr/bin/true")])
        await asyncio.to_thread(store.stop)

    async def second():
        async with Rig(db, [tmp_path / "r"]) as rig:
            deadline = time.monotonic() + 10
            while len(await rig.alerts()) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await rig.submit(P, [proc("/tmp/c")])
            paths = [json.loads(a["group_key"])[0] for a in await rig.alerts()]
            assert paths == ["/tmp/a", "/tmp/b", "/tmp/c"]       # /tmp/a not again, /tmp/b not skipped

    asyncio.run(first())
    asyncio.run(down())
    asyncio.run(second())


def test_a_new_rule_does_not_sweep_history(tmp_path):
    db = tmp_path / "e.db"

    async def scenario():
        async with Rig(db, [tmp_path / "r"]) as rig:
            await rig.submit(P, [proc("/tmp/old")])
            write_rules(tmp_path / "r", "a.yml", TMP_RULE)
            await rig.engine._reload()
            assert list(rig.engine.rules) == ["test.exec_tmp"]
            await rig.submit(P, [proc("/tmp/new")])
            assert [json.loads(a["group_key"])[0] for a in await rig.alerts()] == ["/tmp/new"]

    asyncio.run(scenario())


def test_triage_transitions_history_and_event_is_open(tmp_path):
    write_rules(tmp_path / "r", "a.yml", TMP_RULE)

    async def scenario():
        async with Rig(tmp_path / "e.db", [tmp_path / "r"]) as rig:
            await rig.submit(P, [proc("/tmp/x"), proc("/tmp/x")])
            (alert,) = await rig.alerts()
            eid = alert["eid"]
            assert len(await rig.rows(P, is_open=True)) == 2
            acked = await rig.engine.update_alert(eid, "acknowledged", None, "looking", 1000)
            assert (acked["status"], acked["is_open"], acked["status_by"], acked["comment"]) == \
                ("acknowledged", False, 1000, "looking")
            assert await rig.alerts(is_open=True) == [] and await rig.rows(P, is_open=True) == []
            with pytest.raises(RequestError) as e:
                await rig.engine.update_alert(eid, "acknowledged", None, None, 0)
            assert e.value.field == "status" and "already acknowledged" in str(e.value)
            closed = await rig.engine.update_alert(eid, "closed", "benign_positive", None, 0)
            assert (closed["close_reason"], closed["comment"]) == ("benign_positive", "looking")
            with pytest.raises(RequestError, match="closed, which may become open, not acknowledged"):
                await rig.engine.update_alert(eid, "acknowledged", None, None, 0)
            reopened = await rig.engine.update_alert(eid, "open", None, None, 0)
            assert reopened["is_open"] is True and reopened["close_reason"] is None
            assert len(await rig.rows(P, is_open=True)) == 2
            with pytest.raises(RequestError) as e:
                await rig.engine.update_alert(eid + 100, "closed", "other", None, 0)
            assert e.value.field == "eid"
            history = [(h["from_status"], h["to_status"], h["status_by"]) for h in await rig.rows("alert_history")]
            assert history == [("open", "acknowledged", 1000), ("acknowledged", "closed", 0), ("closed", "open", 0)]
            # A closed alert no longer collects hits: a match opens a new one.
            await rig.engine.update_alert(eid, "closed", "true_positive", None, 0)
            await rig.submit(P, [proc("/tmp/x")])
            assert [a["status"] for a in await rig.alerts()] == ["closed", "open"]

    asyncio.run(scenario())


def test_two_concurrent_acknowledgements_one_wins(tmp_path):
    write_rules(tmp_path / "r", "a.yml", TMP_RULE)

    async def scenario():
        async with Rig(tmp_path / "e.db", [tmp_path / "r"]) as rig:
            await rig.submit(P, [proc("/tmp/x")])
            (alert,) = await rig.alerts()
            results = await asyncio.gather(*(rig.engine.update_alert(alert["eid"], "acknowledged", None, None, uid)
                                             for uid in (1, 2)), return_exceptions=True)
            ok = [r for r in results if isinstance(r, dict)]
            refused = [r for r in results if isinstance(r, RequestError)]
            assert len(ok) == 1 and len(refused) == 1 and refused[0].field == "status"
            assert len(await rig.rows("alert_history")) == 1

    asyncio.run(scenario())


# --- rule validation --------------------------------------------------------

BAD_RULES = [
    ("where: path = 'x'; DROP TABLE bpf_process_events", "where", "ends the statement"),
    ("where: \"1) UNION SELECT eid FROM alerts WHERE (1\"", "where", "closes more than"),
    ("where: \"load_extension('/tmp/x.so') IS NULL\"", "where", "function load_extension"),
    ("where: \"path IN (SELECT value FROM unit_state)\"", "where", "reading unit_state"),
    ("where: \"(SELECT load_extension('/tmp/x.so')) IS NULL\"", "where", "function load_extension"),
    ("where: \"path IN (SELECT name FROM sqlite_master)\"", "where", "reading sqlite_master"),
    ("where: \"1 IN (SELECT 1 FROM pragma_journal_mode('delete'))\"", "where", "refused"),
    ("where: \"(SELECT writefile('/tmp/x', 'y')) = 1\"", "where", "writefile"),   # not even defined here
    ("where: \"nosuchcolumn = 1\"", "where", "no such column: nosuchcolumn"),
    ("where: \"path LIKE\"", "where", "syntax error"),
    ("where: \"path REGEXP '(unclosed'\"", "where", "where"),
    ("where: \"1 /* ) */ )\"", "where", "closes more than"),
]


@pytest.mark.parametrize("line, field, message", BAD_RULES)
def test_rules_that_are_not_read_only_expressions_are_refused_by_name(tmp_path, line, field, message):
    good = "- id: good.one\n  name: g\n  table: bpf_process_events\n  where: path = '/x'\n"
    bad = f"- id: bad.one\n  name: b\n  table: bpf_process_events\n  {line}\n"
    write_rules(tmp_path / "r", "rules.yml", good + bad)
    store = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0)
    store.open()
    conn, guard = rule_files.connect_checked(store.path, TABLES)
    rules, errors = rule_files.load([str(tmp_path / "r")], TABLES, conn, guard)
    assert list(rules) == ["good.one"]                # a bad rule never stops the others
    assert len(errors) == 1, errors
    err = errors[0]
    assert (err.path, err.rule, err.field) == (str(tmp_path / "r" / "rules.yml"), "bad.one", field)
    assert message in str(err)
    # Nothing was written: the table is still there and empty.
    assert conn.execute("SELECT COUNT(*) FROM bpf_process_events").fetchone() == (0,)


def test_attach_is_refused(tmp_path):
    store = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0)
    store.open()
    conn, guard = rule_files.connect_checked(store.path, TABLES)
    with pytest.raises(rule_files.RuleError, match="closes more than"):
        rule_files.check_expression(conn, guard, TABLES[P], f"1); ATTACH '{tmp_path}/x.db' AS x; SELECT (1",
                                    "f.yml", "r", "where")
    guard.refused = None
    try:
        conn.execute(f"ATTACH '{tmp_path}/x.db' AS x")
    except Exception:
        pass
    assert guard.refused == "ATTACH"            # the guard itself refuses it, whatever wraps it


@pytest.mark.parametrize("text, field, message", [
    ("- id: 'bad id!'\n  name: n\n  table: bpf_process_events\n  where: '1'\n", "id", "letters"),
    ("- id: r\n  name: n\n  table: nope\n  where: '1'\n", "table", "unknown event table 'nope'"),
    ("- id: r\n  name: n\n  table: alerts\n  where: '1'\n", "table", "unknown event table 'alerts'"),
    ("- id: r\n  name: n\n  table: bpf_process_events\n  where: '1'\n  severity: urgent\n", "severity", "one of"),
    ("- id: r\n  name: n\n  table: bpf_process_events\n  where: '1'\n  group_by: [nope]\n", "group_by[0]",
     "no column 'nope'"),
    ("- id: r\n  name: n\n  table: bpf_process_events\n  where: '1'\n  mitre: [X1]\n", "mitre[0]", "MITRE"),
    ("- id: r\n  name: n\n  table: bpf_process_events\n  where: '1'\n  suppress_for: -1\n", "suppress_for", ">= 0"),
    ("- id: r\n  name: n\n  table: bpf_process_events\n  where: '1'\n  colour: red\n", "colour", "unknown key"),
    ("- id: r\n  name: n\n  table: bpf_process_events\n  where: '1'\n  exceptions: ['nope = 1']\n",
     "exceptions[0]", "no such column"),
])
def test_rule_fields_are_checked_by_name(tmp_path, text, field, message):
    write_rules(tmp_path / "r", "x.yaml", text)
    store = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0)
    store.open()
    conn, guard = rule_files.connect_checked(store.path, TABLES)
    rules, errors = rule_files.load([str(tmp_path / "r")], TABLES, conn, guard)
    assert rules == {} and len(errors) == 1 and errors[0].field == field and message in str(errors[0]), errors


def test_a_file_that_is_not_yaml_is_named_and_the_others_load(tmp_path):
    write_rules(tmp_path / "r", "a.yml", "- id: [unclosed\n")
    write_rules(tmp_path / "r", "b.yml", TMP_RULE)
    store = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0)
    store.open()
    conn, guard = rule_files.connect_checked(store.path, TABLES)
    rules, errors = rule_files.load([str(tmp_path / "r")], TABLES, conn, guard)
    assert list(rules) == ["test.exec_tmp"]
    assert errors[0].path.endswith("a.yml") and "not valid YAML" in str(errors[0])


def test_the_packaged_rules_all_load(tmp_path):
    store = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0)
    store.open()
    conn, guard = rule_files.connect_checked(store.path, TABLES)
    rules, errors = rule_files.load([rule_files.PACKAGED_RULES], TABLES, conn, guard)
    assert errors == [] and len(rules) >= 9 and all(r.enabled for r in rules.values())


def test_rules_of_one_table_evaluated_together_match_as_alone_and_a_failing_one_is_isolated(tmp_path):
    write_rules(tmp_path / "r", "a.yml", TMP_RULE + """
- id: test.cmd
  name: cmd
  table: bpf_process_events
  where: cmdline LIKE '%--evil%'
  group_by: [cmdline]
- id: test.fails_at_run_time
  name: a pattern that only rows reveal as bad
  table: bpf_process_events
  where: path REGEXP cmdline
""")

    async def scenario():
        async with Rig(tmp_path / "e.db", [tmp_path / "r"]) as rig:
            rig.engine.profile_min_rows = 1
            for profiled in (True, False):          # each alone (profiling), then all in one query
                rig.engine._next_profile = 0.0 if profiled else time.monotonic() + 3600
                n = len(await rig.alerts())
                await rig.submit(P, [proc(f"/tmp/{profiled}", "/tmp/x --allowed"),          # excepted
                                     proc("/usr/bin/a", f"a --evil{profiled}"),
                                     proc(f"/tmp/y{profiled}", f"y --evil{profiled}"),         # both rules
                                     proc("/usr/bin/ok", "(unclosed")])                        # the bad one fails
                got = sorted((a["rule_id"], json.loads(a["group_key"])[0]) for a in (await rig.alerts())[n:])
                assert got == [("test.cmd", f"a --evil{profiled}"), ("test.cmd", f"y --evil{profiled}"),
                               ("test.exec_tmp", f"/tmp/y{profiled}")], profiled
            stats = rig.engine.stats()["rules"]
            assert stats["test.fails_at_run_time"]["errors"] == 2 and stats["test.cmd"]["errors"] == 0
            assert stats["test.cmd"]["profiled_us_per_row"] is not None

    asyncio.run(scenario())


def test_the_combined_query_alone_matches_what_rules_alone_match(tmp_path):
    write_rules(tmp_path / "r", "a.yml", TMP_RULE + """
- id: test.cmd
  name: cmd
  table: bpf_process_events
  where: cmdline LIKE '%--evil%'
  group_by: [cmdline, uid]
  exceptions: ["uid = 7"]
""")

    async def scenario():
        async with Rig(tmp_path / "e.db", [tmp_path / "r"]) as rig:
            rig.engine._next_profile = time.monotonic() + 3600       # no rule evaluated alone
            await rig.submit(P, [proc("/tmp/x", "/tmp/x --allowed"), proc("/usr/bin/a", "a --evil"),
                                 proc("/usr/bin/a", "a --evil", uid=7), proc("/tmp/y", "y --evil", uid=None)])
            got = sorted((a["rule_id"], a["group_key"]) for a in await rig.alerts())
            assert got == [("test.cmd", '["a --evil",0]'), ("test.cmd", '["y --evil",null]'),
                           ("test.exec_tmp", '["/tmp/y",null]')]
            stats = rig.engine.stats()["rules"]
            assert all(s["profiled_us_per_row"] is None and s["rows_evaluated"] == 4 and s["time_ms"] > 0
                       for s in stats.values())

    asyncio.run(scenario())


@pytest.mark.parametrize("where, split", [
    ("syscall = 'exec' AND path = 'x'", ("syscall = 'exec'", "path = 'x'")),
    ("a = 1 AND b = 2 OR c = 3", None),                      # OR binds last: not a conjunction
    ("pid BETWEEN 1 AND 2", None),
    ("CASE WHEN a AND b THEN 1 END AND c", None),
    ("p = 'it''s AND' AND x = 1", ("p = 'it''s AND'", "x = 1")),
    ("(a OR b) AND c", ("(a OR b)", "c")),
])
def test_leading_terms_are_split_only_from_plain_conjunctions(where, split):
    assert rule_files.leading_term(where) == split


def rules_over_rows(tmp_path, wheres, rows, group_by=""):
    """Rules r0, r1, ... (one per where, in order) loaded over a store holding
    rows: the checked connection and the rules."""
    def quoted(w):
        return w.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))
    write_rules(tmp_path / "r", "a.yml", "".join(
        f"- id: r{i}\n  name: n\n  table: bpf_process_events\n  where: \"{quoted(w)}\"\n"
        + (f"  group_by: [{group_by}]\n" if group_by else "") for i, w in enumerate(wheres)))
    store = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0)
    store.open()
    store.start()
    store.submit(P, rows)
    store.stop()
    conn, guard = rule_files.connect_checked(store.path, TABLES)
    rules, errors = rule_files.load([str(tmp_path / "r")], TABLES, conn, guard)
    assert not errors
    return conn, [rules[f"r{i}"] for i in range(len(wheres))]


def alone_and_together(conn, ordered):
    """The eids each rule matches evaluated alone, and as the combined query flags them."""
    alone = [[r[0] for r in conn.execute(rule.sql, (0, 100))] for rule in ordered]
    sql, columns = rule_files.combined_sql(TABLES[P], ordered)
    together = [[] for _ in ordered]
    for row in conn.execute(sql, (0, 100)):
        for i in range(len(ordered)):
            if row[len(columns) + i]:
                together[i].append(row[0])
    return alone, together


def test_shared_leading_terms_match_as_each_rule_alone(tmp_path):
    wheres = ["syscall = 'exec' AND path LIKE '/tmp/%'", "syscall = 'exec' AND cmdline LIKE '%evil%'",
              "syscall = 'exec' AND uid = 0 OR pid = 7", "pid BETWEEN 2 AND 3 AND syscall = 'exit'",
              "syscall = 'exit' AND path REGEXP 'b$'"]
    rows = [proc(p, c, pid=n, uid=u, syscall=s) for n, (p, c, u, s) in enumerate([
        ("/tmp/a", "a", 1, "exec"), ("/usr/b", "evil b", 1, "exec"), ("/usr/c", "c", 0, "exec"),
        ("/tmp/d", "evil", 0, "exit"), ("/usr/b", "b", 1, "exit"), ("/usr/e", "e", 1, "fork"),
        ("/usr/f", "f", 1, "exit"), ("/tmp/g", "g", 7, "fork")])]
    conn, ordered = rules_over_rows(tmp_path, wheres, rows, group_by="pid")
    alone, together = alone_and_together(conn, ordered)
    assert together == alone and all(alone), alone


@pytest.mark.parametrize("pattern, literal", [
    ("/bench-3[a-z]+$", "/bench-3"),
    ("^/tmp/.*\\.sh$", "/tmp/"),          # the longer run wins; an escaped dot is a plain character
    ("ab+cdef", "cdef"),                  # a quantifier takes the character before it out of the run
    ("(?i)/tmp/evil", None),              # case ignored: no substring is sure
    ("(/tmp/|/dev/shm/)x", None),         # an alternation is not one literal
    ("ab", None),                         # too short to be worth a test
    ("[", None),                          # does not compile: no shortcut, the rule's own error stands
])
def test_a_regexp_shortcut_is_a_substring_every_match_contains(pattern, literal):
    assert rule_files.required_literal(pattern) == literal


def test_the_combined_query_looks_up_equalities_together_and_guards_regexps(tmp_path):
    """The combined query's shortcuts (one IN lookup for the equalities on a
    column, a substring test before a REGEXP) pick the same rows as each rule
    alone, on NULLs, quoted names, integer columns and look-alike values."""
    wheres = ["syscall = 'exec' AND path = '/usr/bin/a'", "syscall = 'exec' AND path IN ('/usr/bin/b', '/x')",
              "syscall = 'exec' AND \"path\" == '/usr/bin/c' AND uid = 0", "uid = '7' AND cmdline LIKE '%z%'",
              "uid IN (1, 2) AND path REGEXP 'bin/[ab]$'", "path REGEXP '^/tmp/.+\\.sh$'",
              "syscall = 'exit' AND path REGEXP '(?i)/TMP/'", "cmdline REGEXP 'it''s'"]
    rows = [proc(p, c, pid=n, uid=u, syscall=s) for n, (p, c, u, s) in enumerate([
        ("/usr/bin/a", "a", 1, "exec"), ("/usr/bin/b", "b", 1, "exec"), ("/usr/bin/c", "c", 0, "exec"),
        ("/usr/bin/c", "c", 1, "exec"), ("/x", "z z", 7, "exec"), ("/usr/bin/a", "a", 2, "fork"),
        ("/tmp/a.sh", "it's", None, "exit"), ("/tmp/a.shx", "its", 0, "exec"), ("/usr/bin/b", None, None, "exec"),
        ("/usr/bin/ab", "a", 1, "exec"), (None, None, 7, None)])]
    conn, ordered = rules_over_rows(tmp_path, wheres, rows)
    sql, _ = rule_files.combined_sql(TABLES[P], ordered)
    assert "\"path\" IN ('/usr/bin/a', '/usr/bin/b', '/usr/bin/c', '/x')" in sql
    assert "instr(\"path\", '/tmp/') > 0" in sql and "instr(\"cmdline\", 'it''s') > 0" in sql
    assert "instr(\"path\", '/TMP/')" not in sql
    alone, together = alone_and_together(conn, ordered)
    assert together == alone and all(alone), alone


def test_one_element_of_ancestry_is_read_without_the_whole_line(tmp_path):
    """`json_extract(ancestry, '$[k]...')` is evaluated from the k-th side
    row of the chain (shared_json_shortcuts), with the same result as through
    the view's whole array: on chained lines of every length, lines cut at
    max_depth, a whole value, an empty array and NULL."""
    from vajrad.enrich.process_cache import ProcessCache, TICK_NS
    cache = ProcessCache(size=100, max_depth=3, proc="/nonexistent")
    lines = []
    for n in range(1, 6):                   # pid n's parent is n - 1: lines of 1..3 entries, cut at 3
        cache.executed(n, n * TICK_NS, n - 1, (n - 1) * TICK_NS if n > 1 else 0, f"/usr/bin/p{n}", f"p{n}")
        lines.append(cache.ancestry(n, n * TICK_NS))
    assert any(hasattr(text, "node") for text in lines)
    whole = '[{"exe_name": "w0", "pid": 70}, {"exe_name": "w1", "pid": 71}]'
    wheres = ["json_extract(ancestry, '$[0].exe_name') = 'p2'", "json_extract(\"ancestry\", '$[2].pid') = 1",
              "json_extract(ancestry, '$[1]') IS NOT NULL", "json_extract(ancestry, '$[1].exe_name') = 'w1'",
              "json_extract(ancestry, '$[3].pid') IS NULL AND path = '/x'",
              "cmdline = 'json_extract(ancestry, ''$[0].pid'')'"]
    rows = [TABLES[P].row(path="/x", cmdline=f"c{i}", pid=100 + i, syscall="exec", time=int(time.time()),
                          ancestry=a) for i, a in enumerate(lines + [whole, "[]", None])]
    conn, ordered = rules_over_rows(tmp_path, wheres, rows)
    assert all("WITH RECURSIVE" not in r.where_sql and r.where_sql != r.where for r in ordered[:5])
    assert ordered[5].where_sql == ordered[5].where            # inside a string: left alone
    through_view = [[r[0] for r in conn.execute(
        f"SELECT eid FROM bpf_process_events__read WHERE eid > ? AND eid <= ? AND ({w}) ORDER BY eid", (0, 100))]
        for w in wheres]
    alone, together = alone_and_together(conn, ordered)
    assert alone == through_view == together and all(through_view[:5]), through_view


def test_a_reloaded_rule_with_the_same_id_is_evaluated_anew(tmp_path):
    two = TMP_RULE + "\n- id: test.cmd\n  name: cmd\n  table: bpf_process_events\n  where: cmdline = 'first'\n"

    async def scenario():
        write_rules(tmp_path / "r", "a.yml", two)
        async with Rig(tmp_path / "e.db", [tmp_path / "r"]) as rig:
            rig.engine._next_profile = time.monotonic() + 3600       # the combined query
            await rig.submit(P, [proc("/usr/bin/a", "first")])
            write_rules(tmp_path / "r", "a.yml", two.replace("'first'", "'second'"))
            await rig.engine._reload()
            await rig.submit(P, [proc("/usr/bin/a", "first"), proc("/usr/bin/a", "second")])
            got = [(a["rule_id"], a["first_eid"]) for a in await rig.alerts()]
            assert got == [("test.cmd", 1), ("test.cmd", 3)]

    asyncio.run(scenario())

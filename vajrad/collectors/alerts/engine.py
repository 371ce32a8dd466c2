"""The detection engine: rules evaluated over committed rows, alerts kept in the store.

Flow: the daemon hands `observe()` every committed batch of the tables the
rules read; the engine notes each table's highest committed eid and wakes its
task, which evaluates each rule over the rows past that rule's watermark (on
its own thread, with a read-only connection under the rules' authorizer) and
then commits, in one store transaction (EventStore.transact, on the writer
thread), the new alerts, the updated ones, the links from alerts to events,
the events' is_open, and the watermarks. So a restart neither fires twice
(the watermark moved with the alerts) nor skips (rows past the stored
watermark are evaluated at start). Suppression is decided inside that
transaction, from the alerts table itself, so triage (also a transaction)
and evaluation never see each other half-done.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections import defaultdict

from vajrad.collectors.alerts import rules as rule_files
from vajrad.collectors.base import Collector
from vajrad.errors import RequestError, VajraError
from vajrad.protocol import ALERT_TRANSITIONS
from vajrad.schema import Table
from vajrad.store.event_store import EventStore, StoreTransaction
from vajrad.store.shared_columns import quote

log = logging.getLogger(__name__)

UNIT = "alerts"
LINKS = "alert_events"             # which events each alert counts (for is_open), private to this unit
WATERMARK = "watermark:"           # unit_state key prefix, one per rule
STATE_EVERY_S = 5.0                # watermarks alone (no alert) are committed at most this often
RULE_BUDGET_S = 2.0                # one rule's evaluation is interrupted after this long
PROFILE_EVERY_S = 30.0             # each rule evaluated alone this often, to measure its own cost
PROFILE_MIN_ROWS = 200             # ... over at least this many rows
SETUP = (
    "CREATE INDEX IF NOT EXISTS alerts_rule_group ON alerts(rule_id, group_key)",
    f"CREATE TABLE IF NOT EXISTS {LINKS} (alert_eid INTEGER NOT NULL, event_table TEXT NOT NULL, "
    f"event_eid INTEGER NOT NULL, PRIMARY KEY (alert_eid, event_table, event_eid)) WITHOUT ROWID",
    f"CREATE INDEX IF NOT EXISTS {LINKS}_event ON {LINKS}(event_table, event_eid)",
    # links of alerts retention removed
    f"DELETE FROM {LINKS} WHERE alert_eid < (SELECT IFNULL(MIN(eid), 0) FROM alerts)",
)


class _Throttled:
    """At most `burst` log records a minute (rules that fail on every batch
    must not flood the log); what is held back is counted in the next one."""

    def __init__(self, logger: logging.Logger, burst: int = 5, period: float = 60.0):
        self.logger, self.burst, self.period = logger, burst, period
        self.window_start, self.in_window, self.held = -period, 0, 0

    def _log(self, emit, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.window_start >= self.period:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.held += 1
            return
        self.in_window += 1
        if self.held:
            message += f" ({self.held} similar messages not logged)"
            self.held = 0
        emit(message, *args)

    def warning(self, message: str, *args) -> None:
        self._log(self.logger.warning, message, *args)

    def exception(self, message: str, *args) -> None:
        self._log(self.logger.exception, message, *args)


class AlertEngine(Collector):
    name = UNIT
    source = ""
    tables = ("alerts", "alert_history")
    observes_rows_as_given = True        # only the last eid is needed
    def __init__(self, store: EventStore, tables: dict[str, Table], rule_dirs: list[str],
                 interval_ms: int = 200, host_identifier=None):
        super().__init__()
        self.store = store
        self.all_tables = tables
        self.rule_dirs = list(rule_dirs)
        self.interval = interval_ms / 1000
        self.host_identifier = host_identifier or (lambda: None)     # callable: the daemon's current one
        self.rules: dict[str, rule_files.Rule] = {}
        self.rule_errors: list[str] = []
        self.observes: tuple[str, ...] = ()
        self.watermarks: dict[str, int] = {}
        self._high: dict[str, int] = {}             # table -> highest committed eid seen
        self._eid_at: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._reloading: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vajra-alerts")
        self._conn = self._guard = None
        self._state_saved = 0.0
        self._next_profile = 0.0
        self.profile_min_rows = PROFILE_MIN_ROWS
        self._combined_sql: dict[str, tuple] = {}
        self._combined_key: dict[str, tuple] = {}
        self._stopping = False
        self.evaluations = 0
        self.alerts_opened = 0
        self.failures = 0
        self.errors = _Throttled(log)

    # --- life cycle --------------------------------------------------------
    async def start(self) -> None:
        self._open_channel()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wrap_future(self.store.transact(self._setup))
            await loop.run_in_executor(self._executor, self._connect)
            stored = await loop.run_in_executor(self._executor, self.store.load_state, UNIT)
        except (VajraError, OSError) as e:
            raise VajraError(f"alerts: cannot prepare the store: {e}") from e
        self.watermarks = {k[len(WATERMARK):]: int(v) for k, v in stored.items() if k.startswith(WATERMARK)}
        await self._load_rules()
        self.state = "running"
        self._task = asyncio.create_task(self._run())
        self._wake.set()             # catch up on rows committed past the watermarks while down

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 30)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None
        if self.state == "running":
            try:        # what was evaluated since the last save, so a restart starts there
                await asyncio.wait_for(asyncio.wrap_future(self.store.transact(self._save_watermarks)), 10)
            except (asyncio.TimeoutError, VajraError) as e:
                log.warning("alerts: could not save the rules' watermarks at stop: %s", e)
        self.state = "stopped"
        self._executor.shutdown(wait=False)
        if self._queue is not None:
            self._deliver(None)

    def _setup(self, tx: StoreTransaction) -> None:
        for statement in SETUP:
            tx.conn.execute(statement)

    def _connect(self) -> None:
        self._conn, self._guard = rule_files.connect_checked(self.store.path, self.all_tables)
        budget = {"deadline": 0.0}
        self._budget = budget
        # Interrupts a rule that runs too long (a costly subquery), checked every 10k VM steps.
        self._conn.set_progress_handler(lambda: 1 if time.monotonic() > budget["deadline"] else 0, 10_000)

    # --- rules ---------------------------------------------------------------
    async def _load_rules(self) -> None:
        loop = asyncio.get_running_loop()
        rules, errors, highs = await loop.run_in_executor(self._executor, self._read_rules)
        for e in errors:
            log.error("alerts: rule not loaded: %s", e)
        for rule in rules.values():          # keep the counters of rules that stay
            old = self.rules.get(rule.id)
            if old is not None:
                rule.stats = old.stats
            if rule.id not in self.watermarks:
                # A new rule starts at what is committed now: it does not sweep history.
                self.watermarks[rule.id] = highs.get(rule.table, 0)
                self._state_saved = 0.0      # commit the new watermark soon
        self.rules, self.rule_errors = rules, [str(e) for e in errors]
        self.observes = tuple(sorted({r.table for r in rules.values() if r.enabled}))
        for table, high in highs.items():
            self._high[table] = max(self._high.get(table, 0), high)
        log.info("alerts: %d rules loaded (%d enabled), %d refused", len(rules),
                 sum(r.enabled for r in rules.values()), len(errors))

    def _read_rules(self):
        self._budget["deadline"] = time.monotonic() + 30
        rules, errors = rule_files.load(self.rule_dirs, self.all_tables, self._conn, self._guard)
        highs = {}
        self._guard.refused = None
        for table in {r.table for r in rules.values()}:
            highs[table] = self._conn.execute(f"SELECT IFNULL(MAX(eid), 0) FROM {quote(table)}").fetchone()[0]
        return rules, errors, highs

    def reconfigure(self, config) -> None:
        """SIGHUP: the rule files are read again (and --rules_path followed)."""
        self.rule_dirs = [rule_files.PACKAGED_RULES, *(p for p in config.rules_path.split(":") if p)]
        if self.state == "running":
            self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            await self._load_rules()
        except Exception as e:      # the running rules stay
            log.error("alerts: reloading the rules failed, keeping the running ones: %s", e)
        self._wake.set()

    # --- evaluation ----------------------------------------------------------
    def observe(self, table: str, rows: list) -> None:
        last = rows[-1]
        if type(last) is dict:
            high = last["eid"]
        else:
            at = self._eid_at.get(table)
            if at is None:
                at = self._eid_at[table] = self.all_tables[table].column_names.index("eid")
            high = last[at]
        if high > self._high.get(table, 0):
            self._high[table] = high
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            work = [(rule, self.watermarks.get(rule.id, 0), self._high.get(rule.table, 0))
                    for rule in self.rules.values() if rule.enabled]
            work = [(rule, lo, hi) for rule, lo, hi in work if hi > lo]
            if work:
                try:
                    matches = await loop.run_in_executor(self._executor, self._evaluate, work)
                    await self._commit(work, matches)
                except Exception as e:       # retried at the next wake-up; the rows stay past the watermark
                    self.failures += 1
                    self.errors.exception("alerts: evaluation failed: %s", e)
                    await asyncio.sleep(1.0)
            if self._stopping:
                return
            # Batches committed meanwhile are evaluated together, at most every interval.
            await asyncio.sleep(self.interval)

    def _evaluate(self, work) -> dict[str, list]:
        """The rules over their ranges, on the engine's thread: {rule id: [(eid,
        time, key)]}. Normally one query per table evaluates every rule of it
        (a row is read once, whatever the number of rules; see _combined).
        Each rule alone when that query fails (so that one failing rule is
        found, counted and skipped, and the others go on), and every
        PROFILE_EVERY_S, to measure each rule's own cost."""
        found: dict[str, list] = {}
        by_table: dict[str, list] = defaultdict(list)
        for item in work:
            by_table[item[0].table].append(item)
        # Profiling a handful of rows would measure the query's set-up, not the rule.
        profile = time.monotonic() >= self._next_profile and \
            max(hi - lo for _, lo, hi in work) >= self.profile_min_rows
        if profile:
            self._next_profile = time.monotonic() + PROFILE_EVERY_S
        for table, items in by_table.items():
            if len(items) > 1 and not profile:
                try:
                    self._combined(table, items, found)
                    continue
                except Exception as e:      # one of the rules: find which, below
                    self.errors.warning("alerts: the rules of %s failed together (%s); evaluating them one "
                                        "by one", table, e)
            for rule, lo, hi in items:
                self._alone(rule, lo, hi, found, profile)
        return found

    def _alone(self, rule, lo: int, hi: int, found: dict, profile: bool) -> None:
        conn = self._conn
        # CPU time of this (the evaluating) thread: what the rule costs, not
        # how long a busy host kept it waiting for a core.
        t0 = time.thread_time()
        self._budget["deadline"] = time.monotonic() + RULE_BUDGET_S
        self._guard.refused = None
        try:
            rows = conn.execute(rule.sql, (lo, hi)).fetchall()
        except Exception as e:
            rule.stats["errors"] += 1
            rule.stats["last_error"] = str(e) if not self._guard.refused else f"refused {self._guard.refused}"
            self.errors.warning("alerts: rule %s (%s) failed on eids %d-%d: %s", rule.id, rule.path, lo + 1,
                                hi, rule.stats["last_error"])
            rows = []
        elapsed = (time.thread_time() - t0) * 1000
        rule.stats["time_ms"] += elapsed
        rule.stats["evaluations"] += 1
        rule.stats["rows_evaluated"] += hi - lo
        if profile and hi > lo:
            rule.stats["profiled_us_per_row"] = round(1000 * elapsed / (hi - lo), 3)
        if rows:
            rule.stats["matches"] += len(rows)
            found[rule.id] = [(r[0], r[1], rule_files.group_key(r[2:])) for r in rows]

    def _combined(self, table: str, items: list, found: dict) -> None:
        """Every rule of one table in one query: rows where any rule's where
        holds (the rest, nearly all rows, cost one pass), and for those, which
        rules match, exceptions and ranges applied, and the group_by values.
        Its time is shared among the rules; their own costs come from the
        profiling passes."""
        rules = [rule for rule, _, _ in items]
        key = tuple(rule.sql for rule in rules)        # a reload may change a rule, not its id
        sql, columns = self._combined_sql.get(table, (None, None))
        if sql is None or self._combined_key.get(table) != key:
            sql, columns = rule_files.combined_sql(self.all_tables[table], rules)
            self._combined_sql[table], self._combined_key[table] = (sql, columns), key
        lo_all = min(lo for _, lo, _ in items)
        hi_all = max(hi for _, _, hi in items)
        t0 = time.thread_time()
        self._budget["deadline"] = time.monotonic() + RULE_BUDGET_S * len(items)
        self._guard.refused = None
        rows = self._conn.execute(sql, (lo_all, hi_all)).fetchall()
        share = (time.thread_time() - t0) * 1000 / len(items)
        at = {c: i for i, c in enumerate(columns)}
        for n, (rule, lo, hi) in enumerate(items):
            rule.stats["time_ms"] += share
            rule.stats["evaluations"] += 1
            rule.stats["rows_evaluated"] += hi - lo
            flag = len(columns) + n
            hits = [(r[0], r[1], rule_files.group_key([r[at[c]] for c in rule.group_by]))
                    for r in rows if r[flag] and lo < r[0] <= hi]
            if hits:
                rule.stats["matches"] += len(hits)
                found[rule.id] = hits

    async def _commit(self, work, matches: dict[str, list]) -> None:
        moved = {rule.id: hi for rule, lo, hi in work}
        now = time.monotonic()
        if not matches and now - self._state_saved < STATE_EVERY_S:
            # Nothing to write: the watermarks move in memory only. Rows
            # evaluated again after a crash match nothing again.
            self.watermarks.update(moved)
            self.evaluations += 1
            return
        rules = {rule.id: rule for rule, _, _ in work}
        host = self.host_identifier()

        def apply(tx: StoreTransaction):
            opened = self._write_matches(tx, rules, matches, host)
            for rule_id, mark in moved.items():
                tx.set_state(UNIT, WATERMARK + rule_id, mark)
            return opened

        opened = await asyncio.wrap_future(self.store.transact(apply))
        self.watermarks.update(moved)
        self._state_saved = now
        self.evaluations += 1
        self.alerts_opened += sum(opened.values())
        for rule_id, count in opened.items():
            rules[rule_id].stats["alerts"] += count

    def _save_watermarks(self, tx: StoreTransaction) -> None:
        for rule_id, mark in self.watermarks.items():
            tx.set_state(UNIT, WATERMARK + rule_id, mark)

    # --- on the store's writer thread -------------------------------------------
    def _write_matches(self, tx: StoreTransaction, rules, matches, host) -> dict[str, int]:
        """Alerts for the matches: each (rule, group key) extends its latest
        alert that is not closed while a hit falls within suppress_for of that
        alert's first_seen, else opens a new one. Hits are linked to their
        alert, and marked is_open while it is open."""
        conn = tx.conn
        opened: dict[str, int] = defaultdict(int)
        links: list[tuple[int, str, int]] = []
        open_events: dict[str, list[int]] = defaultdict(list)
        now = int(time.time())

        def finish(rule, key, alert) -> None:
            if alert["eid"] is None:
                row = self.all_tables["alerts"].row(
                    rule_id=rule.id, rule_version=rule.version, rule_name=rule.name, severity=rule.severity,
                    mitre=rule_files.group_key(rule.mitre), event_table=rule.table, first_eid=alert["hits"][0],
                    last_eid=alert["last_eid"], first_seen=alert["first_seen"], last_seen=alert["last_seen"],
                    hit_count=alert["hit_count"], group_key=key, status="open", is_open=1,
                    time=alert["first_seen"])
                alert["eid"] = tx.insert("alerts", [row], host)[0]["eid"]
                opened[rule.id] += 1
            elif alert["hits"]:
                conn.execute("UPDATE alerts SET last_seen = ?, hit_count = ?, last_eid = ? WHERE eid = ?",
                             (alert["last_seen"], alert["hit_count"], alert["last_eid"], alert["eid"]))
            links.extend((alert["eid"], rule.table, e) for e in alert["hits"])
            if alert["status"] == "open":
                open_events[rule.table].extend(alert["hits"])

        for rule_id, hits in matches.items():
            rule = rules[rule_id]
            by_key: dict[str, list] = defaultdict(list)
            for hit in hits:
                by_key[hit[2]].append(hit)
            for key, key_hits in by_key.items():
                alert = None
                if rule.suppress_for > 0:
                    found = conn.execute(
                        "SELECT eid, first_seen, last_seen, hit_count, status, last_eid FROM alerts "
                        "WHERE rule_id = ? AND group_key = ? AND status != 'closed' ORDER BY eid DESC LIMIT 1",
                        (rule.id, key)).fetchone()
                    if found:
                        alert = dict(zip(("eid", "first_seen", "last_seen", "hit_count", "status", "last_eid"),
                                         found), hits=[])
                for eid, when, _ in key_hits:
                    when = now if when is None else when
                    if alert is not None and rule.suppress_for > 0 \
                            and when <= (alert["first_seen"] or 0) + rule.suppress_for:
                        alert["last_seen"] = max(alert["last_seen"] or when, when)
                        alert["hit_count"] += 1
                        alert["last_eid"] = eid
                        alert["hits"].append(eid)
                        continue
                    if alert is not None:
                        finish(rule, key, alert)
                    alert = {"eid": None, "first_seen": when, "last_seen": when, "hit_count": 1,
                             "status": "open", "last_eid": eid, "hits": [eid]}
                if alert is not None:
                    finish(rule, key, alert)
        conn.executemany(f"INSERT OR IGNORE INTO {LINKS} (alert_eid, event_table, event_eid) VALUES (?, ?, ?)",
                         links)
        for table, eids in open_events.items():
            conn.executemany(f"UPDATE {quote(table)} SET is_open = 1 WHERE eid = ?", [(e,) for e in eids])
        return dict(opened)

    # --- triage ---------------------------------------------------------------
    async def update_alert(self, eid: int, status: str, close_reason: str | None, comment: str | None,
                           uid: int | None) -> dict:
        """Moves alert `eid` to `status` if the transition is allowed: the alert,
        its events' is_open, and a history row, in one transaction on the
        writer thread, so concurrent changes see each other."""
        host = self.host_identifier()
        tables = self.all_tables

        def apply(tx: StoreTransaction) -> dict:
            conn = tx.conn
            row = conn.execute("SELECT status, rule_id, event_table FROM alerts WHERE eid = ?", (eid,)).fetchone()
            if row is None:
                raise RequestError(f"eid: there is no alert {eid}", "eid")
            before, rule_id, event_table = row
            if status == before:
                raise RequestError(f"status: alert {eid} is already {before}", "status")
            if status not in ALERT_TRANSITIONS.get(before, ()):
                allowed = ", ".join(ALERT_TRANSITIONS.get(before, ())) or "nothing"
                raise RequestError(f"status: alert {eid} is {before}, which may become {allowed}, not {status}",
                                   "status")
            now = int(time.time())
            is_open = 1 if status == "open" else 0
            conn.execute("UPDATE alerts SET status = ?, is_open = ?, status_by = ?, status_at = ?, close_reason = ?, "
                         "comment = IFNULL(?, comment) WHERE eid = ?",
                         (status, is_open, uid, now, close_reason if status == "closed" else None, comment, eid))
            if event_table in tables:
                # An event stays open while any alert counting it is open.
                t = quote(event_table)
                conn.execute(
                    f"UPDATE {t} SET is_open = EXISTS (SELECT 1 FROM {LINKS} l JOIN alerts a ON a.eid = l.alert_eid "
                    f"WHERE l.event_table = ? AND l.event_eid = {t}.eid AND a.status = 'open') "
                    f"WHERE eid IN (SELECT event_eid FROM {LINKS} WHERE alert_eid = ? AND event_table = ?)",
                    (event_table, eid, event_table))
            history = tables["alert_history"].row(
                alert_eid=eid, rule_id=rule_id, from_status=before, to_status=status, status_by=uid,
                close_reason=close_reason if status == "closed" else None, comment=comment, time=now)
            tx.insert("alert_history", [history], host)
            names = tables["alerts"].column_names
            alert = dict(zip(names, conn.execute(
                f"SELECT {', '.join(quote(n) for n in names)} FROM alerts WHERE eid = ?", (eid,)).fetchone()))
            alert["is_open"] = bool(alert["is_open"])
            alert["history_eid"] = history["eid"]
            return alert

        return await asyncio.wrap_future(self.store.transact(apply))

    # --- status ------------------------------------------------------------------
    def stats(self) -> dict:
        rules = {}
        for rule in self.rules.values():
            s = rule.stats
            rules[rule.id] = {"version": rule.version, "table": rule.table, "enabled": rule.enabled,
                              "watermark": self.watermarks.get(rule.id, 0), "profiled_us_per_row": None, **s,
                              "time_ms": round(s["time_ms"], 3),
                              "us_per_row": round(1000 * s["time_ms"] / s["rows_evaluated"], 3)
                              if s["rows_evaluated"] else None}
        return {**super().stats(), "rules_loaded": len(self.rules),
                "rules_enabled": sum(r.enabled for r in self.rules.values()),
                "rules_refused": list(self.rule_errors), "rule_dirs": self.rule_dirs,
                "evaluations": self.evaluations, "alerts_opened": self.alerts_opened,
                "failures": self.failures, "rules": rules}

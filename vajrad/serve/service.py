"""What vajrad answers, whatever the surface: the socket API and D-Bus both
call this, so filters, limits and cursors mean the same everywhere."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Any

from vajrad.errors import RequestError
from vajrad.protocol import ALERT_STATUSES, CLOSE_REASONS, MAX_COMMENT
from vajrad.schema import Table
from vajrad.serve.wire import ParseError, decode, has_lone_surrogate, shown, shown_key
from vajrad.store.event_store import EventStore, Filter

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
INT64_MAX = (1 << 63) - 1       # SQLite's INTEGER: a bigger number cannot even be compared in SQL
MAX_PID = (1 << 31) - 1
FILTER_KEYS = ("host_identifier", "is_open", "start_time", "end_time", "start_eid", "end_eid")


def parse_bool(value: Any, field: str) -> bool:
    """JSON booleans, plus "true"/"t"/"false"/"f" as Vajra's event-list API accepts."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "t", "false", "f"):
        return value.lower() in ("true", "t")
    raise RequestError(f"{field} must be a boolean (true/false, or \"true\"/\"t\"), got {shown(value)}", field)


def parse_int(value: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(f"{field} must be an integer, got {shown(value)}", field)
    try:
        n = int(value)
    except ValueError:        # not digits, or more digits than int() takes
        raise RequestError(f"{field} must be an integer, got {shown(value)}", field) from None
    if minimum is not None and n < minimum:
        raise RequestError(f"{field} must be >= {minimum}, got {shown(n)}", field)
    if maximum is not None and n > maximum:
        raise RequestError(f"{field} must be <= {maximum}, got {shown(n)}", field)
    return n


def parse_text(value: Any, field: str) -> str:
    """A string SQLite can bind: one with a lone surrogate (sent as a "\\ud800"
    escape) cannot be UTF-8, and could not match anything stored anyway."""
    if not isinstance(value, str):
        raise RequestError(f"{field} must be a string, got {shown(value)}", field)
    if has_lone_surrogate(value):
        raise RequestError(f"{field} must be valid Unicode text (it holds a lone surrogate)", field)
    return value


def parse_filter(obj: Any, field: str = "filter") -> Filter:
    if not isinstance(obj, dict):
        raise RequestError(f"{field} must be an object", field)
    unknown = [k for k in obj if k not in FILTER_KEYS]
    if unknown:
        key = shown_key(unknown[0])
        raise RequestError(f"{field}.{key} is not a filter field (known: {', '.join(FILTER_KEYS)})",
                           f"{field}.{key}")
    if not any(k in obj for k in FILTER_KEYS):
        raise RequestError(f"{field} must hold at least one of {', '.join(FILTER_KEYS)}", field)
    flt = Filter()
    if "host_identifier" in obj:
        flt.host_identifier = parse_text(obj["host_identifier"], f"{field}.host_identifier")
    if "is_open" in obj:
        flt.is_open = parse_bool(obj["is_open"], f"{field}.is_open")
    for key in ("start_time", "end_time", "start_eid", "end_eid"):
        if key in obj:
            setattr(flt, key, parse_int(obj[key], f"{field}.{key}", minimum=0, maximum=INT64_MAX))
    return flt


def encode_cursor(position: dict[str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position, sort_keys=True).encode()).decode()


def decode_cursor(cursor: Any, tables: dict[str, Table]) -> dict[str, int]:
    if cursor in (None, ""):
        return {}
    if not isinstance(cursor, str):
        raise RequestError("cursor must be a string returned by a previous call", "cursor")
    try:
        position = decode(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (binascii.Error, ValueError, ParseError):     # also a cursor that is not ASCII
        raise RequestError("cursor is not one this daemon returned", "cursor") from None
    if not isinstance(position, dict) or not all(
            k in tables and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT64_MAX
            for k, v in position.items()):
        raise RequestError("cursor is not one this daemon returned", "cursor")
    return position


class VajraService:
    def __init__(self, store: EventStore, tables: dict[str, Table], daemon_status,
                 snapshots: dict | None = None, describe_process=None, alert_triage=None):
        self.store = store
        # (eid, status, close_reason, comment, uid) -> the alert; None without the alerts unit
        self.alert_triage = alert_triage
        self.describe_process = describe_process     # pid -> {"process", "ancestry"} | None
        self.tables = tables
        self.snapshots = snapshots or {}     # live tables: {name: rows()}
        self.event_tables = {n: t for n, t in tables.items() if t.evented}
        self._daemon_status = daemon_status   # callable -> dict
        self.started = time.time()
        self.served = 0        # events returned by event/list and ListEvents

    def ping(self) -> str:
        return "pong"

    def status(self) -> dict:
        return self._daemon_status()

    def describe_tables(self) -> list[dict]:
        return [t.to_dict() for t in self.tables.values()]

    def check_table(self, table: Any, field: str = "table") -> str | None:
        if table in (None, ""):
            return None
        if not isinstance(table, str) or table not in self.event_tables:
            raise RequestError(f"{field}: unknown event table {shown(table)} "
                               f"(known: {', '.join(self.event_tables)})", field)
        return table

    def read_table(self, params: Any) -> dict:
        """A live (not evented) table, e.g. process_ancestry_cache_stats."""
        if not isinstance(params, dict) or not isinstance(params.get("table"), str):
            raise RequestError("params.table is required", "table")
        unknown = [k for k in params if k != "table"]
        if unknown:
            raise RequestError(f"unknown parameter {shown_key(unknown[0])}", shown_key(unknown[0]))
        name = params["table"]
        if name not in self.tables or self.tables[name].evented:
            live = [n for n, t in self.tables.items() if not t.evented]
            raise RequestError(f"table: {shown(name)} is not a live table (known: {', '.join(live)}; "
                               f"event tables are read with event/list)", "table")
        rows = self.snapshots.get(name)
        if rows is None:
            raise RequestError(f"table: {name} has no source: its collector is not running", "table")
        return {"rows": rows()}

    def process_tree(self, params: Any) -> dict:
        if not isinstance(params, dict) or "pid" not in params:
            raise RequestError("params.pid is required", "pid")
        pid = parse_int(params["pid"], "pid", minimum=1, maximum=MAX_PID)
        found = self.describe_process(pid) if self.describe_process else None
        if found is None:
            raise RequestError(f"pid: no running process {pid} is known"
                               + ("" if self.describe_process else " (process auditing is not running)"), "pid")
        return found

    def check_columns(self, value: Any, names: list[str]) -> list[str] | None:
        """event/list's `columns`: names every listed table has, in the order
        given, without repeats; None (all columns) when absent."""
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise RequestError(f"columns must be a non-empty list of column names, got {shown(value)}", "columns")
        columns: list[str] = []
        for i, name in enumerate(value):
            if not isinstance(name, str):
                raise RequestError(f"columns[{i}] must be a string, got {shown(name)}", f"columns[{i}]")
            for table in names:
                if name not in self.event_tables[table].column_names:
                    raise RequestError(f"columns[{i}]: {shown(name)} is not a column of {table}", f"columns[{i}]")
            if name not in columns:
                columns.append(name)
        return columns

    async def list_events(self, params: Any) -> dict:
        """Vajra's event/list: {"filter": {...}, "table"?, "limit"?, "cursor"?, "columns"?}."""
        if not isinstance(params, dict):
            raise RequestError("params must be an object", "params")
        unknown = [k for k in params if k not in ("filter", "table", "limit", "cursor", "columns")]
        if unknown:
            raise RequestError(f"unknown parameter {shown_key(unknown[0])}", shown_key(unknown[0]))
        if "filter" not in params:
            raise RequestError("filter is required", "filter")
        flt = parse_filter(params["filter"])
        table = self.check_table(params.get("table"))
        limit = parse_int(params.get("limit", DEFAULT_LIMIT), "limit", 1, MAX_LIMIT)
        position = decode_cursor(params.get("cursor"), self.event_tables)
        names = [table] if table else list(self.event_tables)
        columns = self.check_columns(params.get("columns"), names)
        return await asyncio.to_thread(self._list, names, flt, limit, position, columns)

    def _list(self, names: list[str], flt: Filter, limit: int, position: dict[str, int],
              columns: list[str] | None = None) -> dict:
        # eid always comes back (the cursor is made of it); time too while
        # several tables' rows are merged by it, and is dropped after if not asked.
        merged = len(names) > 1
        fetched = None if columns is None else \
            columns + [c for c in ("eid", "time") if c not in columns and (c == "eid" or merged)]
        candidates = []
        for name in names:
            for row in self.store.query(name, flt, limit, position.get(name, 0), fetched):
                row["table"] = name
                candidates.append(row)
        if merged:
            candidates.sort(key=lambda r: (r["time"] or 0, r["table"], r["eid"]))
        events = candidates[:limit]
        self.served += len(events)
        position = dict(position)
        drop_time = columns is not None and merged and "time" not in columns
        for row in events:
            if "is_open" in row:
                row["is_open"] = bool(row["is_open"])
            if drop_time:
                del row["time"]
            position[row["table"]] = max(position.get(row["table"], 0), row["eid"])
        return {"events": events, "cursor": encode_cursor(position)}

    async def update_alert(self, params: Any, uid: int | None) -> dict:
        """alert/update and UpdateAlert: {"eid", "status", "close_reason"?, "comment"?};
        uid is the caller's, from the transport (recorded as status_by)."""
        if not isinstance(params, dict):
            raise RequestError("params must be an object", "params")
        unknown = [k for k in params if k not in ("eid", "status", "close_reason", "comment")]
        if unknown:
            raise RequestError(f"unknown parameter {shown_key(unknown[0])}", shown_key(unknown[0]))
        if "eid" not in params:
            raise RequestError("eid (the alert's) is required", "eid")
        eid = parse_int(params["eid"], "eid", minimum=1, maximum=INT64_MAX)
        status = params.get("status")
        if status not in ALERT_STATUSES:
            raise RequestError(f"status must be one of {', '.join(ALERT_STATUSES)}, got {shown(status)}", "status")
        reason = params.get("close_reason")
        if reason in (None, ""):
            reason = None
            if status == "closed":
                raise RequestError(f"close_reason is required to close: one of {', '.join(CLOSE_REASONS)}",
                                   "close_reason")
        elif status != "closed":
            raise RequestError("close_reason is only given with status closed", "close_reason")
        elif reason not in CLOSE_REASONS:
            raise RequestError(f"close_reason must be one of {', '.join(CLOSE_REASONS)}, got {shown(reason)}",
                               "close_reason")
        comment = params.get("comment")
        if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
            raise RequestError(f"comment must be a string of at most {MAX_COMMENT} characters", "comment")
        if self.alert_triage is None:
            raise RequestError("alerts are not enabled on this vajrad (--enable_alerts)", "method")
        return await self.alert_triage(eid, status, reason, comment, uid)

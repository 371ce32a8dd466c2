"""vajra-osquery-extension (also installed as vajra.ext for autoloading).

Registers every Vajra table with osquery's extension manager, each under
`vajra_` + its name (see osquery_name), and answers
osquery's table calls from vajrad's socket, never from the database file.
osquery starts it as `vajra.ext --socket PATH --timeout N --interval N
[--verbose]`; it exits when osquery goes away, and reconnects to vajrad per
query, so a vajrad restart costs nothing but the queries made while it was down.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

from thrift.transport import TSocket, TTransport

from vajrad import __version__
from vajrad.client.connection import ClientError, RemoteError, VajraClient
from vajrad.schema import OSQUERY_PREFIX, Table
from vajrad.tables import TABLES
from vajrad.osquery import protocol as p

log = logging.getLogger("vajra-osquery-extension")

EXTENSION_NAME = "vajra"
SDK_VERSION = "5.23.1"            # the osquery release whose protocol we speak
MIN_SDK_VERSION = "0.0.0"
PAGE = 10000
OP_EQUALS, OP_GT, OP_LE, OP_LT, OP_GE = 2, 4, 8, 16, 32
# osquery core has (or had, or has in a build our users run) tables named
# file_events, bpf_process_events, bpf_socket_events and
# process_ancestry_cache_stats, and refuses an extension table of the same
# name. Under one prefix (schema.OSQUERY_PREFIX) no Vajra table can clash with
# any of them, nor with a table osquery adds later; the columns stay osquery's.


def osquery_name(table: str) -> str:
    """The name a Vajra table has in osquery."""
    return table if table.startswith(OSQUERY_PREFIX) else OSQUERY_PREFIX + table


def osquery_tables(tables: dict[str, Table]) -> dict[str, Table]:
    return {osquery_name(name): t for name, t in tables.items()}


EVENTS_HINT = ("events are disabled: start osquery with --disable_events=false --enable_bpf_events=true, "
               "or pass those flags to vajra-osquery-extension")


class ContextError(ValueError):
    """osquery sent a query context we cannot read; the message names the field."""


def _flag_bool(value: str) -> bool:
    low = value.lower()
    if low in ("true", "t", "1", "yes"):
        return True
    if low in ("false", "f", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vajra-osquery-extension", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", default="/var/osquery/osquery.em", help="osquery's extension manager socket")
    ap.add_argument("--timeout", type=float, default=3, help="seconds to wait for osquery's socket")
    ap.add_argument("--interval", type=float, default=3, help="seconds between checks that osquery is alive")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--vajra_socket", default=None, help="vajrad's API socket (default /run/vajra/vajra.sock)")
    for name in ("disable_events", "enable_bpf_events"):
        ap.add_argument(f"--{name}", type=_flag_bool, nargs="?", const=True, default=None,
                        help="overrides osquery's flag of the same name")
    return ap.parse_args(argv)


def events_enabled(core_options: dict, args: argparse.Namespace) -> tuple[bool, str]:
    """The original Vajra's meaning: events flow only with --disable_events=false
    and --enable_bpf_events=true, taken from the shim's own flags first, then
    from osquery's options (osquery's default for disable_events is true)."""
    def value(name: str, default: bool | None) -> bool | None:
        mine = getattr(args, name)
        if mine is not None:
            return mine
        opt = core_options.get(name)
        if opt is None or opt.value in (None, ""):
            return default
        return opt.value.lower() in ("true", "1")

    disabled = value("disable_events", True)
    bpf = value("enable_bpf_events", None)
    if disabled:
        return False, EVENTS_HINT
    if bpf is None:
        return False, ("osquery does not define enable_bpf_events: pass --enable_bpf_events=true "
                       "to vajra-osquery-extension")
    if not bpf:
        return False, EVENTS_HINT
    return True, ""


def column_routes(table: Table) -> list[dict]:
    return [{"id": "column", "name": c.name, "type": c.type, "op": str(c.options)} for c in table.columns]


def read_context(context: str | None) -> dict:
    """osquery's query context (a JSON string) as an object; {} when absent."""
    if not context:
        return {}
    try:
        ctx = json.loads(context)
    except ValueError as e:
        raise ContextError(f"context is not JSON: {e}") from None
    if not isinstance(ctx, dict):
        raise ContextError("context must be a JSON object")
    return ctx


def used_columns(ctx: dict, table: Table) -> list[str] | None:
    """The columns the query reads, from the context's colsUsed (names) or,
    failing that, colsUsedBitset (SQLite's colUsed: bit i for column i of the
    registered routes, bit 63 for every column from the 64th on); None when
    osquery sent neither (cores older than 4.x), which means all of them.
    Columns named only in WHERE are included, as SQLite counts them as used.
    An empty set (`SELECT count(*)`) still needs one row per event: eid, the
    cheapest column, stands in."""
    names = table.column_names
    if "colsUsed" in ctx:
        used = ctx["colsUsed"]
        if not isinstance(used, list):
            raise ContextError("context.colsUsed must be a list of column names")
        for i, name in enumerate(used):
            if not isinstance(name, str) or name not in names:
                raise ContextError(f"context.colsUsed[{i}]: {name!r} is not a column of {table.name}")
        wanted = set(used)
    elif "colsUsedBitset" in ctx:
        bits = ctx["colsUsedBitset"]
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits < 1 << 64:
            raise ContextError(f"context.colsUsedBitset must be an unsigned 64-bit integer, got {bits!r}")
        wanted = {n for i, n in enumerate(names) if bits >> min(i, 63) & 1}
    else:
        return None
    return [n for n in names if n in wanted] or ["eid"]


def pushdown(ctx: dict) -> dict | None:
    """event/list filter from osquery's constraints on time and eid; None when
    they cannot match anything."""
    constraints = ctx.get("constraints", [])
    if not isinstance(constraints, list):
        raise ContextError("context.constraints must be a list")
    lo = {"time": 0, "eid": None}
    hi: dict[str, int | None] = {"time": None, "eid": None}
    for i, c in enumerate(constraints):
        if not isinstance(c, dict) or not isinstance(c.get("list", []), list):
            raise ContextError(f"context.constraints[{i}] must be an object with a list")
        name = c.get("name")
        for j, item in enumerate(c.get("list", [])):
            where = f"context.constraints[{i}].list[{j}]"
            if not isinstance(item, dict):
                raise ContextError(f"{where} must be an object")
            try:
                op = int(item.get("op"))
            except (TypeError, ValueError):
                raise ContextError(f"{where}.op must be an integer, got {item.get('op')!r}") from None
            if name not in lo:
                continue
            try:
                v = int(str(item.get("expr")))
            except ValueError:
                continue           # not pushable; osquery's SQLite still filters it
            low, high = {OP_EQUALS: (v, v), OP_GT: (v + 1, None), OP_GE: (v, None),
                         OP_LT: (None, v - 1), OP_LE: (None, v)}.get(op, (None, None))
            if low is not None:
                lo[name] = low if lo[name] is None else max(lo[name], low)
            if high is not None:
                hi[name] = high if hi[name] is None else min(hi[name], high)
    flt = {"start_time": lo["time"]}
    for key, value in (("end_time", hi["time"]), ("start_eid", lo["eid"]), ("end_eid", hi["eid"])):
        if value is not None:
            flt[key] = value
    if any(lo[n] is not None and hi[n] is not None and lo[n] > hi[n] for n in lo):
        return None
    if flt.get("end_time", 0) < 0 or flt.get("end_eid", 0) < 0:
        return None
    return flt


def to_osquery_row(event: dict, names) -> dict[str, str]:
    """osquery's row: strings, NULL as "". Only `names` are shipped; osquery
    reads a column a row lacks as NULL, and the query did not ask for it."""
    row = {}
    for name in names:
        v = event.get(name)
        row[name] = "" if v is None else str(int(v)) if isinstance(v, bool) else str(v)
    return row


class VajraTables:
    """Answers osquery's `table` registry calls."""

    def __init__(self, vajra_socket: str | None, tables: dict[str, Table]):
        """tables: by their names in osquery."""
        self.vajra_socket = vajra_socket
        self.tables = tables
        self.events_on, self.events_why = False, EVENTS_HINT
        self._warned = False

    def call(self, registry: str, item: str, request: dict) -> p.ExtensionResponse:
        if registry != "table" or item not in self.tables:
            return _status(p.EXT_FAILED, f"unknown {registry} plugin {item!r}")
        action = (request or {}).get("action")
        table = self.tables[item]
        if action == "columns":
            return p.ExtensionResponse(status=p.ExtensionStatus(code=0, message="OK"),
                                       response=column_routes(table))
        if action != "generate":
            return _status(p.EXT_FAILED, f"table {item} is read-only: action {action!r} is not supported")
        if table.evented and not self.events_on:
            if not self._warned:
                log.warning("%s; %s returns no rows", self.events_why, item)
                self._warned = True
            return p.ExtensionResponse(status=p.ExtensionStatus(code=0, message=self.events_why), response=[])
        try:
            ctx = read_context(request.get("context"))
            columns = used_columns(ctx, table)
            if not table.evented:
                rows = self.read_live(table, columns)
            else:
                flt = pushdown(ctx)
                rows = [] if flt is None else self.fetch(table, flt, columns)
        except ContextError as e:
            return _status(p.EXT_FAILED, f"{item}: {e}")
        except (ClientError, RemoteError) as e:
            log.warning("%s: %s", item, e)
            return _status(p.EXT_FAILED, f"{item}: {e}")
        return p.ExtensionResponse(status=p.ExtensionStatus(code=0, message="OK"), response=rows)

    def read_live(self, table: Table, columns: list[str] | None) -> list[dict[str, str]]:
        names = columns or table.column_names
        with VajraClient(self.vajra_socket) as client:
            return [to_osquery_row(r, names) for r in client.call("table/read", {"table": table.name})["rows"]]

    def fetch(self, table: Table, flt: dict, columns: list[str] | None) -> list[dict[str, str]]:
        # Only the columns the query reads cross vajrad's socket: ancestry,
        # most of a row's bytes, stays home unless selected.
        names = columns or table.column_names
        # A fresh connection per query: after a vajrad restart the next query just works.
        with VajraClient(self.vajra_socket) as client:
            return [to_osquery_row(e, names) for e in client.iter_events(flt, table.name, PAGE, columns)]


def _status(code: int, message: str) -> p.ExtensionResponse:
    return p.ExtensionResponse(status=p.ExtensionStatus(code=code, message=message), response=[])


class ExtensionHandler:
    """The `Extension` service osquery calls on <socket>.<uuid>."""

    def __init__(self, tables: VajraTables, stop: threading.Event):
        self.tables, self.stop = tables, stop

    def ping(self):
        return p.ExtensionStatus(code=0, message="OK")

    def call(self, registry, item, request):
        return self.tables.call(registry, item, request or {})

    def shutdown(self):
        log.info("osquery asked the extension to shut down")
        self.stop.set()


def _connect(path: str, timeout: float):
    """A protocol on osquery's socket, waiting up to `timeout` for it to appear."""
    deadline = time.monotonic() + timeout
    while True:
        sock = TSocket.TSocket(unix_socket=path)
        transport = TTransport.TBufferedTransport(sock)
        try:
            transport.open()
            return p.binary_protocol(transport)
        except TTransport.TTransportException:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def core_tables(manager: p.Client) -> set[str]:
    """Tables osquery already has, so that a clash drops one table, not all."""
    try:
        resp = manager.call("query", sql="SELECT name FROM osquery_registry WHERE registry = 'table'")
    except Exception as e:  # an old core without osquery_registry: rely on the retry below
        log.debug("could not list osquery's tables: %s", e)
        return set()
    if resp.status is None or resp.status.code != 0:
        return set()
    return {row.get("name", "") for row in resp.response or []}


def register(manager: p.Client, tables: dict[str, Table]) -> tuple[p.ExtensionStatus, list[str]]:
    """Registers what does not clash (tables by their names in osquery);
    returns the status and the tables left out. With the vajra_ prefix
    nothing should clash: this is for an extension of another vendor that
    took one of our names."""
    clashing = sorted(set(tables) & core_tables(manager))
    while True:
        offered = {n: column_routes(t) for n, t in tables.items() if n not in clashing}
        for name in clashing:
            log.warning("table %s clashes with a table osquery already has: not registering it "
                        "(the other Vajra tables are registered)", name)
        info = p.InternalExtensionInfo(name=EXTENSION_NAME, version=__version__, sdk_version=SDK_VERSION,
                                       min_sdk_version=MIN_SDK_VERSION)
        status = manager.call("registerExtension", info=info, registry={"table": offered})
        if status.code == p.EXT_SUCCESS:
            return status, clashing
        named = [n for n in offered if f"exists: {n}" in (status.message or "")]
        if not named:
            return status, clashing
        clashing += named


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        manager = p.Client(_connect(args.socket, args.timeout), p.MANAGER_METHODS)
        options = manager.call("options")
    except Exception as e:
        log.error("cannot reach osquery at %s: %s", args.socket, e)
        return 1
    offered = osquery_tables(TABLES)
    tables = VajraTables(args.vajra_socket, offered)
    tables.events_on, tables.events_why = events_enabled(options, args)
    if not tables.events_on:
        log.warning("%s", tables.events_why)
    status, clashing = register(manager, offered)
    if status.code != p.EXT_SUCCESS:
        log.error("osquery refused the extension: %s", status.message)
        return 1
    tables.tables = {n: t for n, t in offered.items() if n not in clashing}
    stop = threading.Event()
    ext_path = f"{args.socket}.{status.uuid}"
    if os.path.exists(ext_path):
        os.unlink(ext_path)
    server = p.UnixServer(ext_path, p.Processor(ExtensionHandler(tables, stop), p.EXTENSION_METHODS)).start()
    log.info("registered as %s %s (uuid %s) with %d tables%s", EXTENSION_NAME, __version__, status.uuid,
             len(tables.tables), f"; left out: {', '.join(clashing)}" if clashing else "")
    try:
        while not stop.wait(args.interval):
            try:
                manager.call("ping")
                options = manager.call("options")
            except Exception as e:
                log.info("osquery went away (%s): exiting", e)
                break
            tables.events_on, tables.events_why = events_enabled(options, args)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

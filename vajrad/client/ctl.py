"""vajractl: the operator's view of a running vajrad, through its socket."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time

from vajrad.client.connection import ClientError, RemoteError, VajraClient
from vajrad.protocol import CLOSE_REASONS, alert_update_params
from vajrad.tables import TABLES
from vajrad.client.sql import QueryError


def parse_since(value: str) -> int:
    """SECONDS ago, or an absolute time (ISO 8601, or unix seconds prefixed with @)."""
    value = value.strip()
    if value.isdigit():
        return max(0, int(time.time()) - int(value))
    if value.startswith("@") and value[1:].isdigit():
        return int(value[1:])
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since: {value!r} is neither a number of seconds nor a time like 2026-11-21T10:00:00") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return int(when.timestamp())


# A command line may hold newlines and escape sequences (bash -c scripts do);
# one process must stay one line, and a terminal must not obey what it prints.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f]}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def printable(value) -> str:
    return str(value).translate(_CONTROL)


def _fmt_time(t) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t is not None else "-"


class EventPrinter:
    def __init__(self, as_json: bool, out=sys.stdout):
        self.as_json, self.out = as_json, out
        # Cut lines to the terminal only; a pipe or a file gets them whole.
        self.width = shutil.get_terminal_size().columns if out.isatty() else None
        self.header_done = False

    def __call__(self, event: dict) -> None:
        if self.as_json:
            self.out.write(json.dumps(event, ensure_ascii=False) + "\n")
        else:
            if not self.header_done:
                self.out.write(f"{'TIME':<19} {'TABLE':<20} {'EID':>8}  DETAILS\n")
                self.header_done = True
            cols = TABLES[event["table"]].summary or [c.name for c in TABLES[event["table"]].columns
                                                   if not c.hidden][:6]
            details = " ".join(f"{c}={printable(event.get(c))}" for c in cols if event.get(c) not in (None, ""))
            line = f"{_fmt_time(event.get('time'))} {event['table']:<20} {event['eid']:>8}  {details}"
            self.out.write((line[:max(self.width, 80)] if self.width else line) + "\n")
        self.out.flush()


def cmd_status(client: VajraClient, args) -> int:
    status = client.call("status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    ev = status["events"]
    print(f"vajrad {status['version']} (pid {status['pid']}), up {status['uptime']} s, "
          f"host {status['host_identifier']}")
    print(f"events: captured {ev['captured']}, stored {ev['stored']}, lost {ev['lost']} "
          f"(kernel {ev['lost_kernel']}, collector {ev['lost_collector']}, store {ev['lost_store']})")
    for name, c in status["collectors"].items():
        extra = f" error: {c['error']}" if c.get("error") else ""
        print(f"collector {name}: {c['state']}, captured {c['captured']}{extra}")
    print(f"store: {status['store'].get('path')}, pending {status['store'].get('pending')}")
    print(f"D-Bus: {status['dbus']}; socket: {status['api']['socket']}, "
          f"{status['api']['subscribers']} subscriber(s)")
    return 0


def cmd_tables(client: VajraClient, args) -> int:
    tables = client.call("tables")
    if args.json:
        print(json.dumps(tables, indent=2))
        return 0
    for t in tables:
        print(f"{t['name']}: {t['description']}")
        for c in t["columns"]:
            flags = ",".join(f for f in ("hidden", "additional", "index") if c[f])
            print(f"  {c['name']:<16} {c['type']:<8} {flags:<10} {c['description']}")
    return 0


def cmd_events(client: VajraClient, args) -> int:
    printer = EventPrinter(args.json)
    flt = {"start_time": args.since if args.since is not None else 0}
    if not args.follow:
        for event in client.iter_events(flt, args.table):
            printer(event)
        return 0
    # Subscribe first, then list, so nothing falls between the two.
    follower = VajraClient(client.path).connect()
    stream = follower.subscribe(args.table)
    seen: dict[str, int] = {}
    for event in client.iter_events(flt, args.table):
        printer(event)
        seen[event["table"]] = max(seen.get(event["table"], 0), event["eid"])
    try:
        for msg in stream:
            if msg["method"] == "missed":
                print(f"-- {msg['params']['count']} events missed: this terminal was too slow --",
                      file=sys.stderr)
                continue
            event = msg["params"]["event"]
            if event["eid"] > seen.get(event["table"], 0):
                printer(event)
    except KeyboardInterrupt:
        return 0
    finally:
        follower.close()
    return 0


def print_tree(ancestry: list[dict], leaf: str, out=sys.stdout) -> None:
    """Oldest ancestor first, each generation indented under its parent."""
    depth = 0
    for a in reversed(ancestry):
        prefix = "   " * (depth - 1) + "└─ " if depth else ""
        out.write(f"{prefix}{printable(a['exe_name'] or '?')} [{a['pid']}]  started {_fmt_time(a['proc_time'])}"
                  f"  {printable(a['cmdline'])}\n")
        depth += 1
    out.write(("   " * (depth - 1) + "└─ " if depth else "") + leaf + "\n")


def cmd_tree(client: VajraClient, args) -> int:
    if args.eid is not None:
        page = client.list_events({"start_eid": args.eid, "end_eid": args.eid}, "bpf_process_events", 1)
        if not page["events"]:
            print(f"vajractl tree: no bpf_process_events row with eid {args.eid}", file=sys.stderr)
            return 1
        e = page["events"][0]
        ancestry = json.loads(e["ancestry"] or "[]")
        name = printable(os.path.basename(e["path"])) if e["path"] else "?"
        leaf = (f"{name} [{e['pid']}]  {e['syscall']} at {_fmt_time(e['time'])} (eid {e['eid']})"
                f"  {printable(e['cmdline'])}")
    else:
        found = client.call("process/tree", {"pid": args.pid})
        p = found["process"]
        ancestry = found["ancestry"]
        leaf = f"{printable(p['exe_name'] or '?')} [{p['pid']}]  started {_fmt_time(p['proc_time'])}  {printable(p['cmdline'])}"
    if args.json:
        print(json.dumps(ancestry, indent=2))
    else:
        print_tree(ancestry, leaf)
    return 0


def cmd_query(client: VajraClient, args) -> int:
    from vajrad.client.sql import ReadOnlySql
    database, live = args.database, {}
    try:
        database = database or client.call("status")["store"]["path"]
        for name, table in TABLES.items():       # live tables exist only in the daemon
            if not table.evented:
                try:
                    live[name] = client.call("table/read", {"table": name})["rows"]
                except RemoteError:
                    pass                          # its collector is not running
    except ClientError:
        database = database or "/var/lib/vajra/events.db"     # no daemon: the default store
    db = ReadOnlySql(database, live)
    try:
        columns, rows = db.run(args.sql)
    finally:
        db.close()
    if args.json:
        for row in rows:
            print(json.dumps(dict(zip(columns, row)), ensure_ascii=False))
        return 0
    text = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in text:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


PRODUCT_COLUMNS = ("name", "type", "installed", "version", "running", "pid", "state", "state_reason")


def cmd_products(client: VajraClient, args) -> int:
    """security_products, readable: one line per product, not-installed ones
    only with --all; kernel facts last."""
    rows = client.call("table/read", {"table": "security_products"})["rows"]
    if not args.all:
        rows = [r for r in rows if r["state"] != "not_installed" or r["name"].startswith("kernel-")]
    rows.sort(key=lambda r: (r["name"].startswith("kernel-"), r["name"]))
    if args.json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return 0
    shown = [[printable("" if r.get(c) is None else r.get(c)) for c in PRODUCT_COLUMNS] for r in rows]
    headers = [c.upper() for c in PRODUCT_COLUMNS]
    widths = [max([len(h)] + [len(v) for v in col]) for h, col in zip(headers, zip(*shown))] if shown \
        else [len(h) for h in headers]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for values in shown:
        print("  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip())
    if not args.all:
        print("(products not installed are left out: --all shows them)")


def print_alert(alert: dict, as_json: bool, out=sys.stdout) -> None:
    if as_json:
        out.write(json.dumps(alert, ensure_ascii=False) + "\n")
    else:
        seen = _fmt_time(alert.get("last_seen"))
        out.write(f"{alert['eid']:>6}  {alert['severity']:<8} {alert['status']:<12} {alert['hit_count']:>6}  "
                  f"{seen:<19}  {printable(alert['rule_id'])}  {alert['event_table']}:{alert['first_eid']}"
                  f"  {printable(alert.get('group_key') or '')}\n")
    out.flush()


def cmd_alerts(client: VajraClient, args) -> int:
    flt = {"is_open": True} if args.open else {"start_time": 0}
    if not args.json:
        print(f"{'EID':>6}  {'SEVERITY':<8} {'STATUS':<12} {'HITS':>6}  {'LAST SEEN':<19}  RULE  FIRST EVENT  GROUP")
    follower = stream = None
    if args.follow:       # subscribe first, then list, so nothing falls between the two
        follower = VajraClient(client.path).connect()
        stream = follower.subscribe("alerts")
    last = 0
    for alert in client.iter_events(flt, "alerts"):
        print_alert(alert, args.json)
        last = max(last, alert["eid"])
    if stream is None:
        return 0
    try:
        for msg in stream:
            if msg["method"] == "missed":
                print(f"-- {msg['params']['count']} alerts missed: this terminal was too slow --", file=sys.stderr)
                continue
            alert = msg["params"]["event"]
            if alert["eid"] > last:
                print_alert(alert, args.json)
    except KeyboardInterrupt:
        return 0
    finally:
        follower.close()
    return 0


ALERT_ACTIONS = {"ack": "acknowledged", "close": "closed", "reopen": "open"}


def cmd_alert(client: VajraClient, args) -> int:
    status = ALERT_ACTIONS[args.action]
    if args.reason and status != "closed":
        print("vajractl alert: --reason goes with close only", file=sys.stderr)
        return 2
    if status == "closed" and not args.reason:
        print(f"vajractl alert close: --reason is required ({', '.join(CLOSE_REASONS)})", file=sys.stderr)
        return 2
    alert = client.call("alert/update", alert_update_params(args.eid, status, args.reason, args.comment))
    if args.json:
        print(json.dumps(alert, indent=2))
    else:
        print(f"alert {alert['eid']} ({printable(alert['rule_id'])}) is {alert['status']}"
              + (f" ({alert['close_reason']})" if alert.get("close_reason") else ""))
    return 0


def cmd_import_sigma(client, args) -> int:
    from vajrad.client.sigma import SigmaError, convert_file
    try:
        text = convert_file(args.file)
    except SigmaError as e:
        print(f"vajractl rules import-sigma: {e}", file=sys.stderr)
        return 1
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vajractl", description="Query a running vajrad.")
    p.add_argument("--socket", help="vajrad's API socket (default: $VAJRA_SOCKET or /run/vajra/vajra.sock)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="daemon, collector and store state with event counters")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    t = sub.add_parser("tables", help="the tables and their columns")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tables)
    e = sub.add_parser("events", help="list stored events, optionally following new ones")
    e.add_argument("--table", choices=sorted(n for n, t in TABLES.items() if t.evented))
    e.add_argument("--since", type=parse_since, metavar="SECONDS|TIME",
                   help="events of the last SECONDS, or since TIME (ISO 8601 or @unix)")
    e.add_argument("--json", action="store_true", help="one JSON object per line")
    e.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    e.set_defaults(func=cmd_events)
    t = sub.add_parser("tree", help="a process's ancestry as a tree, oldest ancestor first")
    t.add_argument("pid", type=int, nargs="?", help="a running process")
    t.add_argument("--eid", type=int, help="a bpf_process_events row instead of a running process")
    t.add_argument("--json", action="store_true", help="the ancestry array itself")
    t.set_defaults(func=cmd_tree)
    pr = sub.add_parser("products", help="security products and kernel protections, and their state")
    pr.add_argument("--json", action="store_true", help="one JSON object per row (security_products)")
    pr.add_argument("--all", action="store_true", help="also the catalogue's products that are not installed")
    pr.set_defaults(func=cmd_products)
    q = sub.add_parser("query", help="read-only SQL over the local event store (no osquery needed)")
    q.add_argument("sql")
    q.add_argument("--database", help="the store (default: the running vajrad's, else /var/lib/vajra/events.db)")
    q.add_argument("--json", action="store_true", help="one JSON object per row")
    q.set_defaults(func=cmd_query, offline=True)
    a = sub.add_parser("alerts", help="alerts: all stored, or --open (awaiting triage)")
    a.add_argument("--open", action="store_true", help="only alerts awaiting triage (is_open)")
    a.add_argument("--follow", "-f", action="store_true", help="keep printing new alerts")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a.set_defaults(func=cmd_alerts)
    t = sub.add_parser("alert", help="triage one alert: ack, close (with --reason) or reopen")
    t.add_argument("action", choices=sorted(ALERT_ACTIONS))
    t.add_argument("eid", type=int, metavar="ID", help="the alert's eid (vajractl alerts)")
    t.add_argument("--reason", choices=CLOSE_REASONS, help="close: why")
    t.add_argument("--comment", help="a note kept with the alert")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_alert)
    r = sub.add_parser("rules", help="detection rules (offline tools)")
    rsub = r.add_subparsers(dest="rules_command", required=True)
    i = rsub.add_parser("import-sigma", help="convert a Sigma rule (Linux process_creation, file_event, "
                                             "network_connection) into Vajra's rule YAML")
    i.add_argument("file")
    i.add_argument("--output", "-o", help="write the YAML here (e.g. /etc/vajra/rules.d/NAME.yml) instead of stdout")
    i.set_defaults(func=cmd_import_sigma, offline=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tree" and (args.pid is None) == (args.eid is None):
        parser.error("tree takes a PID or --eid EID")
    client = VajraClient(args.socket)
    try:
        if getattr(args, "offline", False):     # works with vajrad down, too
            return args.func(client, args)
        with client:
            return args.func(client, args)
    except QueryError as e:
        print(f"vajractl query: {e}", file=sys.stderr)
        return 1
    except ClientError as e:
        print(f"vajractl: {e}", file=sys.stderr)
        return 1
    except RemoteError as e:
        print(f"vajractl: vajrad refused the request: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

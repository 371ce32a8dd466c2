"""The JSON-lines socket: methods, filter semantics, malformed input,
permissions and slow subscribers."""
import base64
import grp
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from conftest import needs_bpf, needs_root
from harness import SYSTEM_PYTHON, jsonrpc_lines, run_as
from vajrad.tables import TABLES
from vajrad.serve.service import encode_cursor
from vajrad.serve.wire import RateLimitedLog
from vajrad.store.event_store import EventStore

NOW = int(time.time())
ANCESTRY_MARK = "/ancestry-of-the-seed"      # found in a stream only if ancestry was sent


def seed(path):
    """Rows with known times, hosts and triage state, written through the store."""
    store = EventStore(path, TABLES, expiry=0, max_rows=0)
    store.open()
    store.start()
    rows = []
    for i in range(30):
        rows.append(TABLES["bpf_process_events"].row(
            pid=1000 + i, tid=1000 + i, parent=1, syscall="exec", path=f"/usr/bin/p{i}", cmdline=f"p{i} --x",
            time=NOW - 300 + 10 * i, host_identifier="host-a" if i % 2 else "host-b",
            is_open=1 if i % 5 == 0 else 0, exit_code="0", probe_error=0, ntime=str(i),
            ancestry=json.dumps([{"pid": 1, "path": f"{ANCESTRY_MARK}/init-{i % 3}"}])))
    store.submit("bpf_process_events", rows)
    store.stop()


@pytest.fixture
def api(daemon_factory, workdir):
    db = os.path.join(workdir, "seeded.db")
    seed(db)
    return daemon_factory("--enable_bpf_events=false", "--events_expiry=0", database=db)


def rpc(d, method, params=None):
    with d.client() as c:
        return c.call(method, params)


def test_ping_status_tables(api):
    assert rpc(api, "ping") == "pong"
    status = rpc(api, "status")
    for key in ("version", "uptime", "collectors", "events", "store"):
        assert key in status
    assert set(status["events"]) >= {"captured", "stored", "lost"}
    tables = {t["name"]: t for t in rpc(api, "tables")}
    cols = [c["name"] for c in tables["bpf_process_events"]["columns"]]
    assert cols == list(TABLES["bpf_process_events"].column_names)
    eid = next(c for c in tables["bpf_process_events"]["columns"] if c["name"] == "eid")
    assert eid["hidden"] is True


def test_event_list_filters(api):
    ev = rpc(api, "event/list", {"filter": {"host_identifier": "host-a"}})["events"]
    assert len(ev) == 15 and {e["host_identifier"] for e in ev} == {"host-a"}
    ev = rpc(api, "event/list", {"filter": {"is_open": True}})["events"]
    assert [e["pid"] for e in ev] == [1000, 1005, 1010, 1015, 1020, 1025]
    assert all(e["is_open"] is True for e in ev)
    for spelled in ("true", "t", "T"):
        assert len(rpc(api, "event/list", {"filter": {"is_open": spelled}})["events"]) == 6
    assert len(rpc(api, "event/list", {"filter": {"is_open": "f"}})["events"]) == 24
    ev = rpc(api, "event/list", {"filter": {"start_time": NOW - 200, "end_time": NOW - 100}})["events"]
    assert [e["time"] for e in ev] == list(range(NOW - 200, NOW - 99, 10))      # both ends inclusive
    ev = rpc(api, "event/list", {"filter": {"host_identifier": "host-b", "is_open": "t",
                                            "start_time": NOW - 250}})["events"]
    assert [e["pid"] for e in ev] == [1010, 1020]
    e = ev[0]
    assert e["table"] == "bpf_process_events" and e["eid"] == 11 and e["cmdline"] == "p10 --x"


def test_event_list_pages_with_cursor(api):
    seen, cursor = [], None
    while True:
        params = {"filter": {"start_time": 0}, "limit": 7, "table": "bpf_process_events"}
        if cursor:
            params["cursor"] = cursor
        page = rpc(api, "event/list", params)
        seen += [e["eid"] for e in page["events"]]
        cursor = page["cursor"]
        if len(page["events"]) < 7:
            break
    assert seen == list(range(1, 31))


def test_injection_is_just_a_value(api):
    ev = rpc(api, "event/list", {"filter": {"host_identifier": "x' OR '1'='1"}})["events"]
    assert ev == []


@pytest.mark.parametrize("params,field", [
    ({}, "filter"),
    ({"filter": {}}, "filter"),
    ({"filter": {"pid": 3}}, "filter.pid"),
    ({"filter": {"start_time": "noon"}}, "filter.start_time"),
    ({"filter": {"start_time": -4}}, "filter.start_time"),
    ({"filter": {"is_open": "maybe"}}, "filter.is_open"),
    ({"filter": {"host_identifier": 5}}, "filter.host_identifier"),
    ({"filter": {"start_time": 0}, "limit": 0}, "limit"),
    ({"filter": {"start_time": 0}, "limit": 10**6}, "limit"),
    ({"filter": {"start_time": 0}, "table": "nope"}, "table"),
    ({"filter": {"start_time": 0}, "cursor": "!!!"}, "cursor"),
    ({"filter": {"start_time": 0}, "cursor": "eyJub3BlIjogMX0="}, "cursor"),
    ({"filter": {"start_time": 0}, "colour": "red"}, "colour"),
    ([1, 2], "params"),
])
def test_bad_params_name_the_field(api, params, field):
    [reply] = jsonrpc_lines(api.socket, json.dumps(
        {"jsonrpc": "2.0", "id": 9, "method": "event/list", "params": params}).encode() + b"\n", 1)
    assert reply["id"] == 9 and reply["error"]["code"] == -32602
    assert reply["error"]["data"]["field"] == field
    assert field.split(".")[-1] in reply["error"]["message"]


def test_malformed_lines_keep_the_connection_usable(api):
    ping = b'{"jsonrpc":"2.0","id":"p","method":"ping"}\n'
    payload = (b"this is not json\n" + ping
               + b"[1,2]\n" + ping
               + b'{"jsonrpc":"1.0","id":1,"method":"ping"}\n' + ping
               + b'{"jsonrpc":"2.0","id":2,"method":"no/such"}\n' + ping
               + b'{"jsonrpc":"2.0","id":3,"method":7}\n' + ping
               + b'{"jsonrpc":"2.0","id":4,"method":"ping","params":{"x":1}}\n' + ping
               + b"\xff\xfe\n" + ping
               + b"x" * (1 << 20) + b"y" * 5000 + b"\n" + ping)
    replies = jsonrpc_lines(api.socket, payload, 16, timeout=20)
    codes = [r.get("error", {}).get("code") for r in replies[0::2]]
    assert codes == [-32700, -32600, -32600, -32601, -32600, -32602, -32700, -32600]
    assert all(r == {"jsonrpc": "2.0", "result": "pong", "id": "p"} for r in replies[1::2])
    assert "unknown method 'no/such'" in replies[6]["error"]["message"]
    assert "exceeds 1048576 bytes" in replies[14]["error"]["message"]
    assert rpc(api, "ping") == "pong"


def test_subscribe_is_in_force_when_it_returns(api):
    """vajractl events --follow subscribes, then lists what is stored: the
    subscription must exist before the listing starts, or events in between
    are neither listed nor followed."""
    with api.client() as follower, api.client() as other:
        stream = follower.subscribe()
        assert other.call("status")["api"]["subscribers"] == 1   # before anything is read from it
        assert iter(stream) is stream


def test_notifications_get_no_reply(api):
    replies = jsonrpc_lines(api.socket, b'{"jsonrpc":"2.0","method":"ping"}\n'
                            b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n', 1)
    assert replies == [{"jsonrpc": "2.0", "result": "pong", "id": 1}]


def as_user(*groups: int) -> list[str]:
    """A prefix running a command as nobody, with only the given groups."""
    return ["setpriv", "--reuid=nobody", "--regid=nogroup",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]


PING = [sys.executable, "-c", "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(20)\n"
        "s.connect(sys.argv[1])\ns.sendall(b'{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\\n')\n"
        "print(s.makefile().readline())"]


@needs_root
def test_socket_mode_and_group(vajra_group, api):
    st = os.stat(api.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0 and st.st_gid == vajra_group
    # a member of vajra who is not root gets answers; anybody else is refused
    member = subprocess.run(as_user(vajra_group) + PING + [api.socket], capture_output=True, text=True,
                            cwd="/", timeout=30)
    assert member.returncode == 0 and json.loads(member.stdout)["result"] == "pong", member.stderr
    other = subprocess.run(as_user() + PING + [api.socket], capture_output=True, text=True, cwd="/", timeout=30)
    assert other.returncode != 0 and "PermissionError" in other.stderr


@needs_root
def test_vajractl_reports_refusal_and_absence(api, workdir):
    out = run_as("nobody", [SYSTEM_PYTHON, "-m", "vajrad.client.ctl", "--socket", api.socket, "status"])
    assert out.returncode == 1 and "permission denied" in out.stderr and "group vajra" in out.stderr
    out = subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "--socket", f"{workdir}/none.sock", "status"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "vajrad is not running" in out.stderr
    out = subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "--socket", api.socket, "status"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "events: captured" in out.stdout


def test_vajractl_since_and_tables(api):
    base = [sys.executable, "-m", "vajrad.client.ctl", "--socket", api.socket]
    # The seed is dated from NOW (the module's import): "95 seconds ago" as
    # of NOW, however long the earlier tests of the run took.
    since = 95 + int(time.time()) - NOW
    out = subprocess.run(base + ["events", "--json", "--since", str(since)], capture_output=True, text=True,
                         check=True).stdout
    times = [json.loads(line)["time"] for line in out.splitlines()]
    assert times == list(range(NOW - 90, NOW - 1, 10))
    out = subprocess.run(base + ["events", "--json", "--since", f"@{NOW - 20}"], capture_output=True,
                         text=True, check=True).stdout
    assert [json.loads(line)["pid"] for line in out.splitlines()] == [1028, 1029]
    bad = subprocess.run(base + ["events", "--since", "last tuesday"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--since" in bad.stderr
    out = subprocess.run(base + ["tables"], capture_output=True, text=True, check=True).stdout
    assert "bpf_process_events" in out and "json_cmdline" in out


@needs_bpf
def test_slow_subscriber_misses_are_counted_and_told(daemon_factory):
    d = daemon_factory("--subscriber_queue_events=50")
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(d.socket)
    slow.sendall(b'{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"table":"bpf_process_events"}}\n')
    marker = f"vajra-slow-{os.getpid()}"
    subprocess.run(["sh", "-c", f"for i in $(seq 3000); do /bin/true {marker}; done"], check=True)
    # the daemon kept serving everyone else meanwhile
    assert rpc(d, "ping") == "pong"
    deadline = time.monotonic() + 15
    while True:         # the kernel side hands events over in batches
        with d.client() as c:
            stored = sum(1 for e in c.iter_events({"start_time": 0}, "bpf_process_events")
                         if e["cmdline"] == f"/bin/true {marker}" and e["syscall"] == "exec")
        if stored == 3000 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stored == 3000
    assert rpc(d, "status")["api"]["subscriber_missed"] > 0
    # now read everything the slow subscriber was sent
    subprocess.run(["/bin/true", "last-one", marker])
    slow.settimeout(5)
    buf, got, missed = b"", 0, 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            chunk = slow.recv(1 << 16)
        except socket.timeout:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if msg.get("method") == "missed":
                missed += msg["params"]["count"]
            elif msg.get("method") == "event" and msg["params"]["event"]["cmdline"] == f"/bin/true {marker}" \
                    and msg["params"]["event"]["syscall"] == "exec":
                got += 1
        if b"last-one" in chunk:
            break
    slow.close()
    assert missed > 0 and got + missed >= 3000 and got < 3000
    # the total stays when the subscriber that missed them is gone
    deadline = time.monotonic() + 30
    while (status := rpc(d, "status"))["api"]["subscribers"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status["api"]["subscriber_missed"] >= missed


COLLECTOR_KEYS = {"state", "captured", "dropped", "kernel_lost", "error", "output", "records", "wakeups"}


def test_every_collector_has_the_documented_keys_and_inotify_is_not_a_kernel_capture(daemon_factory, workdir):
    watched = os.path.join(workdir, "w")
    os.mkdir(watched)
    cfg = os.path.join(workdir, "fim.conf")
    with open(cfg, "w") as f:
        json.dump({"options": {}, "file_paths": {"w": [watched + "/%%"]}}, f)
    d = daemon_factory("--enable_bpf_events=false", f"--config_path={cfg}")
    with open(os.path.join(watched, "f"), "w") as f:
        f.write("x")
    d.wait_events(lambda e: e["target_path"] == os.path.join(watched, "f"), "file_events")
    status = rpc(d, "status")
    fim = status["collectors"]["fim"]
    assert COLLECTOR_KEYS <= set(fim), COLLECTOR_KEYS - set(fim)
    assert fim["output"] == "inotify" and fim["records"] >= fim["captured"] >= 1 and fim["kernel_lost"] == 0
    events = status["events"]
    assert events["captured_kernel"] == 0 and events["captured_inotify"] == fim["captured"]
    assert events["captured"] == events["captured_kernel"] + events["captured_inotify"]


@needs_bpf
def test_bpf_collectors_have_the_documented_keys(bpf_daemon):
    status = rpc(bpf_daemon, "status")
    for name, c in status["collectors"].items():
        assert COLLECTOR_KEYS <= set(c), (name, COLLECTOR_KEYS - set(c))
    kernel = sum(c["captured"] for c in status["collectors"].values() if c["source"] == "kernel")
    assert status["events"]["captured_kernel"] == kernel > 0


def test_event_list_columns_returns_only_those(api):
    page = rpc(api, "event/list", {"filter": {"start_time": 0}, "table": "bpf_process_events",
                                   "columns": ["pid", "cmdline", "pid"], "limit": 5})
    assert [sorted(e) for e in page["events"]] == [["cmdline", "eid", "pid", "table"]] * 5
    assert [e["pid"] for e in page["events"]] == [1000, 1001, 1002, 1003, 1004]
    more = rpc(api, "event/list", {"filter": {"start_time": 0}, "table": "bpf_process_events",
                                   "columns": ["is_open", "ancestry"], "cursor": page["cursor"], "limit": 1})
    [e] = more["events"]
    assert (e["eid"], e["is_open"], json.loads(e["ancestry"])[0]["pid"]) == (6, True, 1)
    # Every table at once: merged by time, which is fetched for that and not returned.
    merged = rpc(api, "event/list", {"filter": {"start_time": 0}, "columns": ["eid", "host_identifier"]})
    assert len(merged["events"]) == 30
    assert all(sorted(e) == ["eid", "host_identifier", "table"] for e in merged["events"])
    full = rpc(api, "event/list", {"filter": {"start_time": 0}, "limit": 1})["events"][0]
    assert set(full) == set(TABLES["bpf_process_events"].column_names) | {"table"}


@pytest.mark.parametrize("columns,field,needle", [
    (["pid", "nope"], "columns[1]", "'nope' is not a column of bpf_process_events"),
    ([], "columns", "non-empty list"),
    ("pid", "columns", "non-empty list"),
    ([7], "columns[0]", "must be a string"),
])
def test_event_list_bad_columns_are_named(api, columns, field, needle):
    [reply] = jsonrpc_lines(api.socket, json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "event/list",
         "params": {"filter": {"start_time": 0}, "table": "bpf_process_events", "columns": columns}}).encode()
        + b"\n", 1)
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == field
    assert needle in reply["error"]["message"]
    assert rpc(api, "ping") == "pong"


def test_event_list_columns_of_every_table_when_no_table_is_named(api):
    """Without `table`, each column must be one every event table has."""
    [reply] = jsonrpc_lines(api.socket, json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "event/list",
         "params": {"filter": {"start_time": 0}, "columns": ["host_identifier", "cmdline"]}}).encode() + b"\n", 1)
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == "columns[1]"
    assert "is not a column of" in reply["error"]["message"]


@pytest.mark.parametrize("method,params,field", [
    ("table/read", {}, "table"),
    ("table/read", {"table": "bpf_process_events"}, "table"),
    ("table/read", {"table": "nope"}, "table"),
    ("table/read", {"table": "process_ancestry_cache_stats", "x": 1}, "x"),
    ("process/tree", {}, "pid"),
    ("process/tree", {"pid": "one"}, "pid"),
    ("process/tree", {"pid": 0}, "pid"),
    ("unsubscribe", {"subscription": 99}, "subscription"),
    ("subscribe", {"table": "nope"}, "table"),
])
def test_other_methods_name_the_bad_field(api, method, params, field):
    [reply] = jsonrpc_lines(api.socket, json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode() + b"\n", 1)
    assert reply["error"]["code"] == -32602 and reply["error"]["data"]["field"] == field
    assert rpc(api, "ping") == "pong"


def strict_json(line: bytes):
    """What a strict JSON reader accepts: UTF-8, no NaN or Infinity."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line.decode("utf-8"), parse_constant=refuse)


def raw_replies(sock_path, payload: bytes, replies: int, timeout: float = 20) -> list[bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    s.sendall(payload)
    buf, out = b"", []
    while len(out) < replies:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and len(out) < replies:
            line, buf = buf.split(b"\n", 1)
            out.append(line)
    s.close()
    return out


HOSTILE_LINES = [
    # (line, expected error code or None for a result, expected id)
    (b"[" * 1000 + b"]" * 1000, -32700, None),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + b"7" * 5000 + b"}}", -32700, None),
    (b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}', None, "\ufffd"),
    (b'{"jsonrpc":"2.0","id":"\xed\xa0\x80","method":"ping"}', -32700, None),
    (b'{"jsonrpc":"2.0","id":2,"method":"event/list","params":{"filter":{"\\udfff":1}}}', -32602, 2),
    (b'{"jsonrpc":"2.0","id":3,"method":"event/list","params":{"filter":{"start_time":0},"table":"\\ud800"}}',
     -32602, 3),
    (b'{"jsonrpc":"2.0","id":1e999,"method":"ping"}', -32700, None),
    (b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}', -32700, None),
    (b'{"jsonrpc":"2.0","id":4,"method":"ping","params":-Infinity}', -32700, None),
    (b'{"jsonrpc":"2.0","id":[5],"method":"ping"}', -32600, None),
    (b'{"jsonrpc":"2.0","id":6,"method":"unsubscribe","params":{"subscription":{"a":1}}}', -32602, 6),
    (b'{"jsonrpc":"2.0","id":7,"method":"' + b"m" * 100_000 + b'"}', -32601, 7),
]


def test_hostile_lines_get_one_valid_reply_each_and_keep_the_connection(api):
    """Issue 17 items 1 and 2: each of these closed the connection without a
    reply, or answered with NaN/Infinity, before."""
    ping = b'{"jsonrpc":"2.0","id":"p","method":"ping"}'
    payload = b"".join(line + b"\n" + ping + b"\n" for line, _, _ in HOSTILE_LINES)
    lines = raw_replies(api.socket, payload, 2 * len(HOSTILE_LINES))
    assert len(lines) == 2 * len(HOSTILE_LINES)
    replies = [strict_json(line) for line in lines]
    for (sent, code, id_), reply in zip(HOSTILE_LINES, replies[0::2]):
        assert reply["jsonrpc"] == "2.0" and reply["id"] == id_, (sent[:80], reply)
        if code is None:
            assert reply["result"] == "pong"
        else:
            assert reply["error"]["code"] == code, (sent[:80], reply)
            assert len(reply["error"]["message"]) < 400      # an echoed value is cut short
    assert all(r == {"jsonrpc": "2.0", "result": "pong", "id": "p"} for r in replies[1::2])
    assert "Traceback" not in api.log


@pytest.mark.parametrize("params,field", [
    ({"filter": {"start_time": 1 << 63}}, "filter.start_time"),
    ({"filter": {"end_time": 10 ** 30}}, "filter.end_time"),
    ({"filter": {"start_eid": str(1 << 64)}}, "filter.start_eid"),
    ({"filter": {"end_eid": 1 << 63}}, "filter.end_eid"),
    ({"filter": {"start_time": "9" * 5000}}, "filter.start_time"),
    ({"filter": {"start_time": 0}, "cursor": encode_cursor({"bpf_process_events": 1 << 63})}, "cursor"),
    ({"filter": {"start_time": 0}, "cursor": base64.urlsafe_b64encode(b"[" * 5000).decode()}, "cursor"),
    ({"filter": {"start_time": 0}, "cursor": "\u00e9t\u00e9"}, "cursor"),
])
def test_numbers_beyond_sqlite_integers_are_bad_params(api, params, field):
    """Issue 17 item 3: these were -32603 with a traceback each."""
    [reply] = jsonrpc_lines(api.socket, json.dumps(
        {"jsonrpc": "2.0", "id": 9, "method": "event/list", "params": params}).encode() + b"\n", 1)
    assert reply["id"] == 9 and reply["error"]["code"] == -32602, reply
    assert reply["error"]["data"]["field"] == field
    assert "Traceback" not in api.log and "internal error" not in api.log


def test_internal_errors_are_logged_at_a_bounded_rate(caplog):
    limited = RateLimitedLog(logging.getLogger("vajra-test-ratelimit"), burst=3, period=3600)
    with caplog.at_level(logging.ERROR, logger="vajra-test-ratelimit"):
        for i in range(1000):
            try:
                raise OverflowError(f"number {i}")
            except OverflowError:
                limited.exception("api: %s failed", "event/list")
    assert len(caplog.records) == 3 and limited.total == 1000 and limited.suppressed == 997
    limited.window_start -= 3600          # the next period
    with caplog.at_level(logging.ERROR, logger="vajra-test-ratelimit"):
        try:
            raise OverflowError("again")
        except OverflowError:
            limited.exception("api: %s failed", "event/list")
    assert "997 similar errors not logged" in caplog.records[-1].getMessage()


@needs_root
def test_nothing_the_daemon_writes_is_for_other_users(daemon_factory, workdir):
    """Issue 17 item 4, end to end: a daemon started under umask 000 (worse
    than quickstart's 022) makes its directories 0750 and its files 0640."""
    store_dir = os.path.join(workdir, "lib", "vajra")
    run_dir = os.path.join(workdir, "run", "vajra")
    d = daemon_factory("--enable_bpf_events=false", f"--api_socket={run_dir}/vajra.sock",
                       database=os.path.join(store_dir, "events.db"),
                       prefix=["sh", "-c", 'umask 000; exec "$@"', "sh"])
    d.socket = f"{run_dir}/vajra.sock"
    assert rpc(d, "ping") == "pong"
    db = os.path.join(store_dir, "events.db")
    for path in (db, db + "-wal", db + "-shm"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, path
    for path in (store_dir, os.path.dirname(store_dir), run_dir, os.path.dirname(run_dir)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o750, path
    try:
        gid = grp.getgrnam("vajra").gr_gid
    except KeyError:
        gid = 0
    assert os.stat(db).st_gid == gid and os.stat(run_dir).st_gid == gid
    assert rpc(d, "status")["store"]["warnings"] == []

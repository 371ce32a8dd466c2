"""The osquery shim against osquery core played by osquery's own Thrift stubs
(PyPI's osquery package): ExtensionManager served on a Unix socket, and the
Extension client calling the shim."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from osquery.extensions import Extension, ExtensionManager, ttypes

from conftest import needs_bpf
from harness import OSQUERY_ANCESTRY_BUILD_TABLES, OSQUERY_LINUX_TABLES, osquery_context
from harness import OsqueryCore as Core
from test_api import ANCESTRY_MARK, NOW, seed
from vajrad.osquery import protocol as p
from vajrad.osquery.extension import osquery_name
from vajrad.tables import TABLES


@pytest.fixture
def vajrad(daemon_factory, workdir):
    db = os.path.join(workdir, "seeded.db")
    seed(db)
    return daemon_factory("--enable_bpf_events=false", "--events_expiry=0", database=db)


@pytest.fixture
def core(workdir):
    cores = []

    def make(**kw):
        c = Core(workdir, **kw)
        cores.append(c)
        return c

    yield make
    for c in cores:
        c.stop()


EVERY_COLUMN = object()


def generate(client, table, constraints=None, context=None, select=EVERY_COLUMN):
    """`SELECT <select> FROM table WHERE <constraints>` as osquery sends it;
    by default every column, hidden ones too (None: `SELECT *`). table: by
    vajrad's name or osquery's (vajra_...)."""
    name = table.removeprefix("vajra_") if table.removeprefix("vajra_") in TABLES else table
    if select is EVERY_COLUMN:
        select = list(TABLES[name].column_names)
    ctx = context if context is not None else osquery_context(name, constraints or [], select)
    return client.call("table", osquery_name(name), {"action": "generate", "context": ctx})


def test_wire_declarations_match_osquery_stubs():
    ours = {cls.__name__: cls.thrift_spec for cls in (p.InternalOptionInfo, p.InternalExtensionInfo,
                                                      p.ExtensionStatus)}
    for name, spec in ours.items():
        theirs = getattr(ttypes, name).thrift_spec
        assert [f[:4] if f else None for f in spec] == [f[:4] if f else None for f in theirs], name
    for method, (args, result) in p.MANAGER_METHODS.items():
        module = Extension if method in p.EXTENSION_METHODS else ExtensionManager
        theirs_args = getattr(module, f"{method}_args").thrift_spec
        assert [f[:3] if f else None for f in args.thrift_spec] == \
            [f[:3] if f else None for f in (theirs_args or ())], method


def test_registration_columns_and_generate(core, vajrad):
    c = core()
    c.start_shim(vajrad.socket)
    info, registry = next(iter(c.handler.registered.values()))
    assert info.name == "vajra" and info.version == "0.1.0"
    assert set(registry["table"]) == {"vajra_bpf_process_events", "vajra_bpf_socket_events",
                                      "vajra_bpf_file_events", "vajra_file_events",
                                      "vajra_process_ancestry_cache_stats", "vajra_open_sockets",
                                      "vajra_containers", "vajra_container_events",
                                      "vajra_log_events", "vajra_log_files",
                                      "vajra_security_products", "vajra_security_product_events",
                                      "vajra_alerts", "vajra_alert_history"}
    assert set(registry["table"]) == {osquery_name(n) for n in TABLES}
    routes = registry["table"]["vajra_bpf_process_events"]
    by_name = {r["name"]: r for r in routes}
    assert [r["name"] for r in routes] == list(TABLES["bpf_process_events"].column_names)
    assert by_name["time"]["op"] == "4" and by_name["eid"]["op"] == "16"        # ADDITIONAL, HIDDEN
    assert by_name["pid"]["type"] == "BIGINT" and all(r["id"] == "column" for r in routes)

    client = c.client()
    assert client.ping().code == 0
    cols = client.call("table", "vajra_bpf_process_events", {"action": "columns"})
    assert cols.status.code == 0 and [r["name"] for r in cols.response] == [r["name"] for r in routes]
    resp = generate(client, "vajra_bpf_process_events")
    assert resp.status.code == 0 and len(resp.response) == 30
    row = resp.response[10]
    assert row["pid"] == "1010" and row["cmdline"] == "p10 --x" and row["is_open"] == "1"
    assert row["eid"] == "11" and row["cwd"] == ""                   # NULL is ""
    assert set(row) == set(TABLES["bpf_process_events"].column_names)


def test_time_and_eid_constraints_reduce_what_is_fetched(core, vajrad):
    c = core()
    c.start_shim(vajrad.socket)
    client = c.client()

    def served():
        return vajrad.call("status")["api"]["events_served"]

    before = served()
    assert len(generate(client, "vajra_bpf_process_events").response) == 30
    assert served() - before == 30
    before = served()
    resp = generate(client, "vajra_bpf_process_events",
                    [{"name": "time", "list": [{"op": 4, "expr": str(NOW - 30)}], "affinity": "BIGINT"}])
    assert sorted(int(r["time"]) for r in resp.response) == [NOW - 20, NOW - 10]
    assert served() - before == 2            # only the window crossed the socket
    before = served()
    resp = generate(client, "vajra_bpf_process_events", [
        {"name": "time", "list": [{"op": 32, "expr": str(NOW - 300)}, {"op": 8, "expr": str(NOW - 250)}]},
        {"name": "eid", "list": [{"op": 16, "expr": "5"}]}])
    assert [r["eid"] for r in resp.response] == ["1", "2", "3", "4"]
    assert served() - before == 4
    resp = generate(client, "vajra_bpf_process_events", [{"name": "time", "list": [{"op": 2, "expr": str(NOW - 100)}]}])
    assert [r["time"] for r in resp.response] == [str(NOW - 100)]
    resp = generate(client, "vajra_bpf_process_events",
                    [{"name": "eid", "list": [{"op": 4, "expr": "20"}, {"op": 16, "expr": "5"}]}])
    assert resp.status.code == 0 and resp.response == []


class RecordingProxy:
    """A Unix socket between the shim and vajrad that keeps what vajrad
    answers, so a test sees what crossed the socket, not what the shim kept."""

    def __init__(self, directory, upstream):
        self.path, self.upstream = os.path.join(directory, "proxy.sock"), upstream
        self.received = bytearray()
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX)
            up.connect(self.upstream)
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()

    def _pump(self, src, dst, record):
        try:
            while data := src.recv(65536):
                if record:
                    self.received += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_cols_used_keeps_ancestry_at_home(core, vajrad, workdir):
    """A query that does not select ancestry gets rows without it, and vajrad
    never sends it: osquery's colsUsed reaches event/list as `columns`."""
    proxy = RecordingProxy(workdir, vajrad.socket)
    c = core()
    c.start_shim(proxy.path)
    client = c.client()
    try:
        where = [{"name": "time", "list": [{"op": 32, "expr": str(NOW - 300)}], "affinity": "BIGINT"}]
        resp = generate(client, "bpf_process_events", where, select=["pid", "cmdline"])
        assert resp.status.code == 0 and len(resp.response) == 30
        assert all(set(r) == {"pid", "cmdline", "time"} for r in resp.response)     # time: the WHERE column
        assert resp.response[3] == {"pid": "1003", "cmdline": "p3 --x", "time": str(NOW - 270)}
        assert len(proxy.received) > 0 and ANCESTRY_MARK.encode() not in proxy.received
        # SELECT *: ancestry is a visible column, so it is shipped; eid is hidden, so it is not.
        resp = generate(client, "bpf_process_events", select=None)
        assert all(set(r) == {c.name for c in TABLES["bpf_process_events"].columns if not c.hidden}
                   for r in resp.response)
        assert json.loads(resp.response[0]["ancestry"])[0]["path"] == f"{ANCESTRY_MARK}/init-0"
        assert ANCESTRY_MARK.encode() in proxy.received
        # SELECT count(*): no column, still one row per event.
        resp = generate(client, "bpf_process_events", select=[])
        assert len(resp.response) == 30 and set(resp.response[0]) == {"eid"}
        # Only the bitset (as osquery's own getContextFromRequest accepts): bit i is column i.
        names = list(TABLES["bpf_process_events"].column_names)
        bits = (1 << names.index("path")) | (1 << names.index("eid"))
        resp = generate(client, "bpf_process_events", context=json.dumps({"constraints": [], "colsUsedBitset": bits}))
        assert resp.response[0] == {"path": "/usr/bin/p0", "eid": "1"}
        # A core that sends neither (before osquery 4) gets every column.
        resp = generate(client, "bpf_process_events", context=json.dumps({"constraints": []}))
        assert set(resp.response[0]) == set(names)
    finally:
        proxy.close()


@pytest.mark.parametrize("context,needle", [
    ('{"colsUsed": "pid"}', "colsUsed must be a list"),
    ('{"colsUsed": ["pid", "nope"]}', "colsUsed[1]: 'nope' is not a column of bpf_process_events"),
    ('{"colsUsedBitset": -1}', "colsUsedBitset must be an unsigned 64-bit integer"),
    ('{"colsUsedBitset": "7"}', "colsUsedBitset must be an unsigned 64-bit integer"),
])
def test_malformed_cols_used_get_a_clear_error(core, vajrad, context, needle):
    c = core()
    c.start_shim(vajrad.socket)
    client = c.client()
    resp = generate(client, "bpf_process_events", context=context)
    assert resp.status.code == 1 and needle in resp.status.message, resp.status.message
    assert generate(client, "bpf_process_events").status.code == 0      # still serving


@pytest.mark.parametrize("context,needle", [
    ("{not json", "not JSON"),
    ("[1]", "JSON object"),
    ('{"constraints": 5}', "constraints must be a list"),
    ('{"constraints": [7]}', "constraints[0]"),
    ('{"constraints": [{"name": "time", "list": [{"op": "gt", "expr": "1"}]}]}', "constraints[0].list[0].op"),
])
def test_malformed_contexts_get_a_clear_error(core, vajrad, context, needle):
    c = core()
    c.start_shim(vajrad.socket)
    client = c.client()
    resp = generate(client, "vajra_bpf_process_events", context=context)
    assert resp.status.code == 1 and needle in resp.status.message
    assert generate(client, "vajra_bpf_process_events").status.code == 0      # still serving


def test_events_disabled_means_no_rows_and_a_warning(core, vajrad):
    c = core(options={"disable_events": "true"})
    shim = c.start_shim(vajrad.socket)
    resp = generate(c.client(), "vajra_bpf_process_events")
    assert resp.response == [] and "--disable_events=false" in resp.status.message
    shim.kill()
    assert "--disable_events=false --enable_bpf_events=true" in shim.stderr.read()


def test_shim_flags_stand_in_for_a_core_without_enable_bpf_events(core, vajrad):
    c = core(options={"disable_events": "false", "enable_bpf_events": ""})
    c.handler.opts.pop("enable_bpf_events")
    c.start_shim(vajrad.socket)
    resp = generate(c.client(), "vajra_bpf_process_events")
    assert resp.response == [] and "enable_bpf_events" in resp.status.message
    c.stop()
    c2 = core(options={"disable_events": "false"})
    c2.handler.opts.pop("enable_bpf_events")
    c2.start_shim(vajrad.socket, "--enable_bpf_events=true")
    assert len(generate(c2.client(), "vajra_bpf_process_events").response) == 30


def test_vajrad_down_then_restarted(core, vajrad):
    c = core()
    c.start_shim(vajrad.socket)
    client = c.client()
    vajrad.stop()
    resp = generate(client, "vajra_bpf_process_events")
    assert resp.status.code == 1 and "vajrad is not running" in resp.status.message
    vajrad.start()
    assert len(generate(client, "vajra_bpf_process_events").response) == 30


def test_shim_exits_when_osquery_goes_away(core, vajrad):
    c = core()
    shim = c.start_shim(vajrad.socket)
    c.server.stop()
    assert shim.wait(10) == 0
    assert "osquery went away" in shim.stderr.read()


def test_shutdown_call_stops_the_shim(core, vajrad):
    c = core()
    shim = c.start_shim(vajrad.socket)
    c.client().shutdown()
    assert shim.wait(10) == 0


@pytest.mark.parametrize("core_tables", [OSQUERY_LINUX_TABLES, OSQUERY_ANCESTRY_BUILD_TABLES])
def test_no_table_clashes_with_osquerys_own(core, vajrad, core_tables):
    """A core with osquery's own Linux tables (file_events, process_events,
    bpf_process_events, ...) takes every Vajra table, under its vajra_ name."""
    c = core(core_tables=core_tables)
    shim = c.start_shim(vajrad.socket)
    _, registry = next(iter(c.handler.registered.values()))
    assert set(registry["table"]) == {osquery_name(n) for n in TABLES}
    assert not set(registry["table"]) & core_tables
    fim = c.client().call("table", "vajra_file_events", {"action": "columns"})
    assert [r["name"] for r in fim.response] == list(TABLES["file_events"].column_names)
    shim.send_signal(signal.SIGTERM)
    shim.wait(10)
    assert "clashes" not in shim.stderr.read()


@pytest.mark.parametrize("list_tables", [True, False])
def test_clashing_table_name_leaves_the_others_registered(core, vajrad, list_tables):
    """Another extension already took one of our names: that table alone is left out."""
    c = core(core_tables=OSQUERY_LINUX_TABLES | {"vajra_bpf_process_events"}, list_tables=list_tables)
    shim = c.start_shim(vajrad.socket)
    _, registry = next(iter(c.handler.registered.values()))
    assert "vajra_bpf_process_events" not in registry["table"]
    assert set(registry["table"]) == {osquery_name(n) for n in TABLES} - {"vajra_bpf_process_events"}
    resp = c.client().call("table", "vajra_bpf_process_events", {"action": "generate", "context": "{}"})
    assert resp.status.code == 1
    shim.send_signal(signal.SIGTERM)
    shim.wait(10)
    assert "vajra_bpf_process_events clashes with a table osquery already has" in shim.stderr.read()


def test_refused_registration_exits_non_zero(core, vajrad):
    c = core()
    c.handler.registered[1] = (ttypes.InternalExtensionInfo(name="vajra"), {})
    shim = c.start_shim(vajrad.socket, wait=False)
    assert shim.wait(20) == 1
    assert "Duplicate extension registered" in shim.stderr.read()


def test_no_osquery_exits_non_zero(workdir):
    r = subprocess.run([sys.executable, "-m", "vajrad.osquery", "--socket", f"{workdir}/none.em",
                        "--timeout", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot reach osquery" in r.stderr


def test_wire_compatible_with_osquery_python_client(core, vajrad):
    from osquery.extension_client import ExtensionClient
    c = core()
    c.start_shim(vajrad.socket)
    uuid = next(iter(c.handler.registered))
    ec = ExtensionClient(path=c.path, uuid=uuid)
    ec.open(timeout=5)
    try:
        client = ec.extension_client()
        assert client.ping().code == 0
        resp = client.call("table", "vajra_bpf_process_events", {
            "action": "generate", "context": json.dumps({"constraints": [
                {"name": "time", "list": [{"op": 32, "expr": str(NOW - 20)}], "affinity": "BIGINT"}]})})
        assert [r["pid"] for r in resp.response] == ["1028", "1029"]
    finally:
        ec.close()


def test_c_codec_and_plain_stubs_agree(core, vajrad):
    c = core()
    c.start_shim(vajrad.socket)
    ctx = json.dumps({"constraints": [{"name": "time", "list": [{"op": 4, "expr": str(NOW - 100)}]}]})
    plain = c.client().call("table", "vajra_bpf_process_events", {"action": "generate", "context": ctx})
    fast = c.fast_client().call("call", registry="table", item="vajra_bpf_process_events",
                                request={"action": "generate", "context": ctx})
    assert fast.status.code == plain.status.code == 0
    assert fast.response == plain.response and len(fast.response) == 9


@pytest.mark.skipif(not __import__("conftest").BPF_OK, reason="the cache stats come from the BPF collector")
def test_live_table_through_the_shim(core, daemon_factory):
    d = daemon_factory()
    c = core(options={"disable_events": "true"})       # live tables do not depend on events flags
    c.start_shim(d.socket)
    resp = c.client().call("table", "vajra_process_ancestry_cache_stats", {"action": "generate", "context": "{}"})
    assert resp.status.code == 0 and len(resp.response) == 1
    row = resp.response[0]
    assert row["max_size"] == "1000" and int(row["cache_size"]) > 0


@needs_bpf
def test_socket_tables_through_the_shim(core, daemon_factory):
    d = daemon_factory()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        assert d.wait_events(lambda e: e["pid"] == os.getpid() and e["syscall"] == "listen"
                             and e["local_port"] == port, table="bpf_socket_events")
        c = core()
        c.start_shim(d.socket)
        client = c.client()
        live = client.call("table", "vajra_open_sockets", {"action": "generate", "context": "{}"})
        assert live.status.code == 0
        [row] = [r for r in live.response if r["pid"] == str(os.getpid()) and r["local_port"] == str(port)]
        assert (row["fd"], row["family"], row["protocol"], row["local_address"], row["state"]) == \
            (str(listener.fileno()), "2", "6", "127.0.0.1", "LISTEN")
        assert json.loads(row["ancestry"])[0]["pid"] == os.getppid()
        events = generate(client, "vajra_bpf_socket_events")
        assert events.status.code == 0
        mine = [r for r in events.response if r["pid"] == str(os.getpid()) and r["local_port"] == str(port)]
        assert [r["syscall"] for r in mine] == ["bind", "listen"]
        assert set(mine[0]) == set(TABLES["bpf_socket_events"].column_names)
    finally:
        listener.close()

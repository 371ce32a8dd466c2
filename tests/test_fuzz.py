"""Hostile input against a running vajrad, as an attacker or a buggy client
would send it (issue 17). Seeded, so a failure replays: VAJRA_FUZZ_SEED=N.

Socket API: 20 connections send >= 20,000 requests between them (every
method, every param, with wrong types, extremes, invalid UTF-8, lone
surrogates, deep nesting, huge numbers and oversized lines). Every line gets
exactly one reply, in order, that is strict JSON-RPC 2.0 with the id it
should carry; nothing is an internal error; a fresh connection's ping
answers throughout; the daemon stays up and its RSS stays within a bound.

D-Bus: the same for org.vajra.Vajra1's methods and properties called with
wrong signatures and extreme values on a private dbus-daemon: every call
gets a method return or an error, none an internal one.

The daemons run without BPF: what is fuzzed is the parsing and the
service, and the tests stay cheap.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import threading
import time

import pytest

from conftest import needs_root
from test_api import seed

SEED = int(os.environ.get("VAJRA_FUZZ_SEED", "1717"))
CONNECTIONS = 20
REQUESTS_PER_CONNECTION = 2500
WINDOW = 40                       # requests in flight per connection
RSS_GROWTH_KIB = 32 * 1024        # after vs before, once warmed up
REPLY_TIMEOUT = 60
MAX_LINE = 1 << 20

METHODS = ["ping", "status", "tables", "event/list", "subscribe", "unsubscribe", "process/tree",
           "table/read"]
PARAM_NAMES = ["filter", "table", "limit", "cursor", "pid", "subscription"]
FILTER_KEYS = ["host_identifier", "is_open", "start_time", "end_time", "start_eid", "end_eid"]
TABLES = ["bpf_process_events", "bpf_socket_events", "bpf_file_events", "file_events",
          "process_ancestry_cache_stats", "vajra_open_sockets"]


def nested(depth: int, leaf=0):
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def extreme_values(rng: random.Random) -> list:
    """Values as Python objects (so that they are valid JSON when dumped)."""
    return [None, True, False, 0, -1, 1, 7, 1 << 31, 1 << 63, (1 << 63) - 1, 1 << 64, -(1 << 63) - 1,
            10 ** 300, -10 ** 300, 0.5, -0.0, 1e308, -1e308, 5e-324, "", "0", "-5", " 12 ", "1e3", "true",
            "t", "F", "maybe", "x" * rng.choice((1, 100, 5000, 70000)), "\ud800", "a\udfffb",
            "\u0000", "\U0001f600", "\u202e", "'; DROP TABLE bpf_process_events; --", "%s%n", [], {},
            [1, 2], {"a": None}, nested(rng.choice((10, 60, 200))), rng.choice(TABLES),
            base64.urlsafe_b64encode(json.dumps({rng.choice(TABLES): rng.choice((0, 5, 1 << 63, -1))}).encode()
                                     ).decode(),
            base64.urlsafe_b64encode(os.urandom(rng.randrange(1, 64))).decode()]


def random_filter(rng: random.Random):
    if rng.random() < 0.15:
        return rng.choice(extreme_values(rng))
    keys = rng.sample(FILTER_KEYS, rng.randrange(0, 4))
    if rng.random() < 0.15:
        keys.append(rng.choice(["pid", "\ud800", "x" * 3000, "start_time ", ""]))
    values = extreme_values(rng)
    return {k: rng.choice(values) for k in keys}


def random_params(rng: random.Random, method: str):
    roll = rng.random()
    if roll < 0.1:
        return rng.choice(extreme_values(rng))        # params of a wrong type
    if roll < 0.15:
        return None                                   # "params" left out or null
    params = {}
    wanted = {"event/list": ["filter", "table", "limit", "cursor", "columns"], "subscribe": ["table"],
              "unsubscribe": ["subscription"], "process/tree": ["pid"], "table/read": ["table"]}.get(method, [])
    names = [n for n in wanted if rng.random() < 0.8]
    if rng.random() < 0.2:
        names.append(rng.choice(PARAM_NAMES + ["colour", "\udc80", "y" * 500]))
    values = extreme_values(rng)
    for name in names:
        if name == "filter":
            params[name] = random_filter(rng)
        elif name == "table" and rng.random() < 0.6:
            params[name] = rng.choice(TABLES)
        elif name == "limit" and rng.random() < 0.5:
            params[name] = rng.choice((1, 5, 10000, 10001, 0))
        elif name == "pid" and rng.random() < 0.5:
            params[name] = rng.choice((1, os.getpid(), 4194304, 1 << 40))
        else:
            params[name] = rng.choice(values)
    return params


def dumps(obj) -> bytes:
    """JSON text as a careless client might send it: lone surrogates as
    escapes (valid JSON syntax), everything else UTF-8."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")


def surrogate_free(value):
    if isinstance(value, str):
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return value


def raw_line(rng: random.Random, id_) -> tuple[bytes, object]:
    """A line that is not a well-formed request, and the id its reply carries."""
    choice = rng.randrange(14)
    head = b'{"jsonrpc":"2.0","id":%d,"method":"ping"' % id_
    if choice == 0:
        return b"[" * rng.choice((900, 1100, 100_000)) + b"]" * 10, None
    if choice == 1:
        return b'{"jsonrpc":"2.0","id":%d,"method":"event/list","params":{"filter":{"start_time":%s}}}' % (
            id_, b"9" * rng.choice((4301, 5000, 20000))), None
    if choice == 2:
        return head + b',"params":{"x":NaN}}', None
    if choice == 3:
        return b'{"jsonrpc":"2.0","id":1e999,"method":"ping"}', None
    if choice == 4:
        return b'{"jsonrpc":"2.0","id":-Infinity,"method":"ping"}', None
    if choice == 5:
        return head + b',"params":{"s":"\xed\xa0\x80"}}', None       # a surrogate as raw bytes
    if choice == 6:
        return rng.choice((b"\xff\xfe", b"\xc0\x80", b'"\x80"', os.urandom(rng.randrange(1, 200)).replace(b"\n", b""))), None
    if choice == 7:
        return head[: rng.randrange(1, len(head))], None                   # cut short
    if choice == 8:
        return b"[" + head + b"}]", None                                 # a batch
    if choice == 9:
        return b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', None
    if choice == 10:
        return b'{"jsonrpc":"2.0","id":%d,"method":"ping","params":%s}' % (
            id_, json.dumps(nested(rng.choice((500, 900)))).encode()), id_
    if choice == 11:
        return b'{"jsonrpc":"2.0","id":%d,"method":"ping","params":[%s]}' % (
            id_, b"1" * 4000), id_                                         # long, but an int Python takes
    if choice == 12:
        return b'{"jsonrpc":"1.0","id":%d,"method":"ping"}' % id_, id_
    return b"null", None


def make_requests(rng: random.Random, conn_no: int, count: int) -> list[tuple[bytes, object]]:
    out = []
    for n in range(count):
        id_ = conn_no * 1_000_000 + n
        roll = rng.random()
        if roll < 0.25:
            out.append(raw_line(rng, id_))
            continue
        if roll < 0.27 and conn_no % 5 == 0:
            out.append((b"z" * (MAX_LINE + rng.randrange(1, 5000)), None))    # oversized
            continue
        method = rng.choice(METHODS) if rng.random() < 0.95 else rng.choice(
            ["no/such", "", "m_ping", "__class__", "event/list\u0000", "\ud800", "x" * 10000])
        msg = {"jsonrpc": "2.0", "id": id_, "method": method}
        expect = id_
        if rng.random() < 0.05:
            msg["id"] = expect = f"s-{id_}-\ud800"          # a lone surrogate in the id
            expect = surrogate_free(expect)
        if rng.random() < 0.03:
            msg["id"] = expect = float(id_) + 0.5
        params = random_params(rng, method)
        if params is not None or rng.random() < 0.5:
            msg["params"] = params
        out.append((dumps(msg), expect))
    return out


def check_reply(line: bytes, expect_id) -> dict:
    """Strict: UTF-8, JSON without NaN or Infinity, JSON-RPC 2.0's shape."""
    def refuse(name):
        raise AssertionError(f"{name} in a reply: {line[:200]!r}")
    reply = json.loads(line.decode("utf-8"), parse_constant=refuse)
    assert isinstance(reply, dict) and reply.get("jsonrpc") == "2.0", line[:200]
    assert ("result" in reply) != ("error" in reply), line[:200]
    assert reply["id"] == expect_id, (expect_id, line[:300])
    if "error" in reply:
        err = reply["error"]
        assert isinstance(err["code"], int) and isinstance(err["message"], str), line[:200]
        assert err["code"] != -32603, f"internal error: {line[:300]!r}"
        assert len(line) < 4096, f"an error reply of {len(line)} bytes"
    return reply


async def drive(sock_path: str, requests: list[tuple[bytes, object]], counts: dict) -> None:
    reader, writer = await asyncio.open_unix_connection(sock_path, limit=1 << 24)
    try:
        for at in range(0, len(requests), WINDOW):
            window = requests[at:at + WINDOW]
            writer.write(b"".join(line + b"\n" for line, _ in window))
            await writer.drain()
            for line, expect in window:
                while True:
                    reply = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
                    assert reply.endswith(b"\n"), f"connection closed; last request {line[:200]!r}"
                    if b'"method":"event"' in reply or b'"method":"missed"' in reply:
                        continue                          # a subscription's notification
                    break
                got = check_reply(reply, expect)
                counts["replies"] += 1
                counts["errors" if "error" in got else "results"] += 1
    finally:
        writer.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PingWatch:
    """A fresh connection's ping, again and again, while the fuzzers run."""

    def __init__(self, sock_path: str):
        self.sock_path, self.pings, self.failures = sock_path, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(REPLY_TIMEOUT)
                    s.connect(self.sock_path)
                    s.sendall(b'{"jsonrpc":"2.0","id":"watch","method":"ping"}\n')
                    buf = b""
                    while not buf.endswith(b"\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                if json.loads(buf) != {"jsonrpc": "2.0", "result": "pong", "id": "watch"}:
                    self.failures.append(buf[:200])
                self.pings += 1
            except (OSError, ValueError) as e:
                self.failures.append(repr(e))
            self.stop.wait(0.2)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture
def fuzz_daemon(daemon_factory, workdir):
    db = os.path.join(workdir, "fuzz.db")
    seed(db)
    return daemon_factory("--enable_bpf_events=false", "--events_expiry=0", database=db)


def test_socket_api_fuzz(fuzz_daemon):
    d = fuzz_daemon
    pid = d.proc.pid
    rng = random.Random(SEED)
    plans = [make_requests(random.Random(rng.random()), n, REQUESTS_PER_CONNECTION) for n in range(CONNECTIONS)]
    counts = {"replies": 0, "errors": 0, "results": 0}

    async def run(batches):
        await asyncio.gather(*(drive(d.socket, b, counts) for b in batches))

    # Warm-up: one round of every kind, so that RSS before counts what a
    # daemon that has served such requests keeps (caches, arenas).
    asyncio.run(run([p[:100] for p in plans]))
    rss_before = rss_kib(pid)
    watch = PingWatch(d.socket)
    t0 = time.monotonic()
    try:
        asyncio.run(run([p[100:] for p in plans]))
    finally:
        watch.finish()
    elapsed = time.monotonic() - t0
    rss_after = rss_kib(pid)
    sent = CONNECTIONS * REQUESTS_PER_CONNECTION
    assert counts["replies"] == sent >= 20_000
    assert counts["errors"] > sent // 4 and counts["results"] > sent // 20, counts
    assert d.proc.poll() is None, d.log[-3000:]
    assert watch.pings >= 1 and watch.failures == [], watch.failures[:5]
    assert rss_after - rss_before < RSS_GROWTH_KIB, (rss_before, rss_after)
    assert d.call("ping") == "pong"
    assert "Traceback" not in d.log and "never retrieved" not in d.log, d.log[-3000:]
    print(f"fuzz seed {SEED}: {sent} requests in {elapsed:.1f} s, {counts}, "
          f"{watch.pings} watch pings, RSS {rss_before} -> {rss_after} KiB")


# --- D-Bus -------------------------------------------------------------------

DBUS_CALLS = 3000
DBUS_CONCURRENCY = 20


def dbus_cases(rng: random.Random):
    """(interface, member, signature, body) with wrong signatures and extreme values."""
    from dbus_next import Variant

    def variant():
        return rng.choice([
            Variant("x", rng.choice((0, -1, -(1 << 63), (1 << 63) - 1))),
            Variant("t", rng.choice((0, (1 << 64) - 1, 1 << 63))),
            Variant("u", (1 << 32) - 1), Variant("i", -(1 << 31)),
            Variant("d", rng.choice((float("nan"), float("inf"), -float("inf"), 1e308, -0.0))),
            Variant("s", rng.choice(("", "x" * 70000, "yesterday", "9" * 5000, str(1 << 64), "t", "\u202e"))),
            Variant("b", rng.random() < 0.5), Variant("as", ["a", "b"]), Variant("ay", b"\x00\xff"),
            Variant("v", Variant("s", "inner")), Variant("a{sv}", {"start_time": Variant("x", 1)}),
            Variant("(ii)", [1, 2]),
        ])

    def filt():
        keys = rng.sample(FILTER_KEYS + ["pid", "", "k" * 300], rng.randrange(0, 4))
        return {k: variant() for k in keys}

    cursor = rng.choice(["", "!!!", "x" * 70000, base64.urlsafe_b64encode(b"[" * 3000).decode(),
                         base64.urlsafe_b64encode(json.dumps({"bpf_process_events": 1 << 64}).encode()).decode(),
                         base64.urlsafe_b64encode(b'{"bpf_process_events": NaN}').decode()])
    iface = "org.vajra.Vajra1"
    return rng.choice([
        (iface, "ListEvents", "a{sv}sus", [filt(), rng.choice(TABLES + ["", "nope", "x" * 5000]),
                                           rng.choice((0, 1, 10000, 10001, (1 << 32) - 1)), cursor]),
        (iface, "ListEvents", "a{sv}sxs", [filt(), "", -1, ""]),
        (iface, "ListEvents", "a{sv}", [filt()]),
        (iface, "ListEvents", "", []),
        (iface, "ListEvents", "s", ["x"]),
        (iface, "ReadTable", "s", [rng.choice(TABLES + ["", "nope", "x" * 70000])]),
        (iface, "ReadTable", "x", [1 << 40]),
        (iface, "ReadTable", "", []),
        (iface, "Ping", "", []),
        (iface, "Ping", "s", ["extra"]),
        (iface, "GetStatus", "", []),
        (iface, "GetStatus", "a{sv}", [filt()]),
        (iface, "NoSuchMethod", "", []),
        ("org.freedesktop.DBus.Properties", "Get", "ss", [iface, rng.choice(["Version", "EventsLost", "Nope", ""])]),
        ("org.freedesktop.DBus.Properties", "GetAll", "s", [rng.choice([iface, "nope"])]),
        ("org.freedesktop.DBus.Properties", "Set", "ssv", [iface, "Version", variant()]),
        ("org.freedesktop.DBus.Properties", "Get", "x", [5]),
        ("org.freedesktop.DBus.Introspectable", "Introspect", "", []),
        ("org.freedesktop.DBus.Introspectable", "Introspect", "s", ["x"]),
    ])


@needs_root
def test_dbus_fuzz(daemon_factory, private_bus):
    from dbus_next import Message, MessageType
    from dbus_next.aio import MessageBus
    from vajrad.serve.dbus_api import tolerate_full_socket

    d = daemon_factory("--enable_bpf_events=false", f"--dbus={private_bus.address}")
    deadline = time.monotonic() + 10
    while d.call("status")["dbus"] != "running":
        assert time.monotonic() < deadline, d.log
        time.sleep(0.1)
    rng = random.Random(SEED)
    cases = [dbus_cases(rng) for _ in range(DBUS_CALLS)]
    outcomes = {"return": 0, "error": 0}
    internal = []

    async def main():
        bus = await tolerate_full_socket(MessageBus(bus_address=private_bus.address)).connect()
        gate = asyncio.Semaphore(DBUS_CONCURRENCY)

        async def one(case):
            iface, member, signature, body = case
            async with gate:
                reply = await asyncio.wait_for(bus.call(Message(
                    destination="org.vajra.Vajra1", path="/org/vajra/Vajra1", interface=iface, member=member,
                    signature=signature, body=body)), REPLY_TIMEOUT)
            assert reply is not None
            if reply.message_type == MessageType.METHOD_RETURN:
                outcomes["return"] += 1
            else:
                assert reply.message_type == MessageType.ERROR
                outcomes["error"] += 1
                if reply.error_name in ("org.vajra.Vajra1.Error.Failed", "org.freedesktop.DBus.Error.Failed",
                                        "org.freedesktop.DBus.Error.NoReply",
                                        "org.freedesktop.DBus.Error.ServiceUnknown") \
                        or "internal error" in str(reply.body).lower():
                    internal.append((member, signature, reply.error_name, str(reply.body)[:300]))

        try:
            await asyncio.gather(*(one(c) for c in cases))
        finally:
            bus.disconnect()

    asyncio.run(main())
    assert outcomes["return"] + outcomes["error"] == DBUS_CALLS
    assert outcomes["return"] > 0 and outcomes["error"] > 0, outcomes
    assert internal == [], internal[:5]
    assert d.proc.poll() is None
    assert private_bus.busctl("call", "org.vajra.Vajra1", "/org/vajra/Vajra1", "org.vajra.Vajra1",
                              "Ping").stdout.strip() == 's "pong"'
    assert "Traceback" not in d.log, d.log[-3000:]

"""Socket events on the real kernel: real clients and servers on loopback,
each in a process of its own, must produce exactly the expected rows."""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import needs_bpf

pytestmark = needs_bpf
HERE = Path(__file__).resolve().parent
EXE = os.path.realpath(sys.executable)
FIELDS = ("syscall", "fd", "family", "type", "protocol", "local_address", "local_port",
          "remote_address", "remote_port", "status", "exit_code")
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
TCP, UDP, STREAM, DGRAM = 6, 17, 1, 2


def run(name: str, *args: str, prefix=()) -> dict:
    started = time.monotonic_ns()
    out = subprocess.run([*prefix, sys.executable, str(HERE / "socket_scenarios.py"), name, *args],
                         check=True, capture_output=True, text=True).stdout
    scenario = json.loads(out)
    scenario["lifetime_bound_ns"] = time.monotonic_ns() - started
    return scenario


def socket_rows(daemon, pid: int, want: int, timeout: float = 60) -> list[dict]:
    """The rows of pid once `want` of them are in, and nothing more came in a moment."""
    rows = daemon.wait_events(lambda e: e["pid"] == pid, "bpf_socket_events", timeout=timeout, want=want,
                              settle=0.3)
    return sorted(rows, key=lambda e: e["eid"])


def shape(rows):
    return [tuple(r[f] for f in FIELDS) for r in rows]


def tcp_rows(s: dict, family: int, host: str, local_host: str, accepted_host: str, client_family=None):
    """bind, listen, connect, accept4, then the three closes, as a tcp() scenario makes them."""
    P, X = s["port"], s["client_port"]
    cf = client_family or family
    return [
        ("bind", s["srv"], family, STREAM, TCP, local_host, P, "::" if family == AF_INET6 else "0.0.0.0", 0,
         "succeeded", "0"),
        ("listen", s["srv"], family, STREAM, TCP, local_host, P, "::" if family == AF_INET6 else "0.0.0.0",
         0, "succeeded", "0"),
        ("connect", s["cli"], cf, STREAM, TCP, host, X, host, P, "succeeded", "0"),
        ("accept4", s["srv"], family, STREAM, TCP, accepted_host, P, accepted_host, X, "succeeded",
         str(s["conn"])),
        ("close", s["cli"], cf, STREAM, TCP, host, X, host, P, "succeeded", "0"),
        ("close", s["conn"], family, STREAM, TCP, accepted_host, P, accepted_host, X, "succeeded", "0"),
        ("close", s["srv"], family, STREAM, TCP, local_host, P, "::" if family == AF_INET6 else "0.0.0.0", 0,
         "succeeded", "0"),
    ]


def check_common(rows, s):
    for r in rows:
        assert r["pid"] == s["pid"] and r["tid"] == s["pid"] and r["parent"] == os.getpid()
        assert r["path"] == EXE
        assert r["uid"] == os.getuid() and r["gid"] == os.getgid()
        assert r["net_namespace"] == os.stat("/proc/self/ns/net").st_ino
        ancestry = json.loads(r["ancestry"])
        assert ancestry[0]["pid"] == os.getpid()
        assert r["probe_error"] == 0
    for r in rows:
        if r["syscall"] == "close":
            # every socket here was created while the daemon watched
            assert r["duration"] > 0
        else:
            assert 0 < r["duration"] < s["lifetime_bound_ns"]     # inside the scenario's run


def test_tcp_v4_connect_accept_close(bpf_daemon):
    s = run("tcp4")
    rows = socket_rows(bpf_daemon, s["pid"], 7)
    assert shape(rows) == tcp_rows(s, AF_INET, "127.0.0.1", "127.0.0.1", "127.0.0.1")
    check_common(rows, s)
    assert all(r["socket"] == "" for r in rows)


def test_tcp_v6_connect_accept_close(bpf_daemon):
    s = run("tcp6")
    rows = socket_rows(bpf_daemon, s["pid"], 7)
    assert shape(rows) == tcp_rows(s, AF_INET6, "::1", "::1", "::1")
    check_common(rows, s)


def test_listener_on_any_v6_accepts_v4_as_mapped(bpf_daemon):
    s = run("dual")
    rows = socket_rows(bpf_daemon, s["pid"], 7)
    assert shape(rows) == tcp_rows(s, AF_INET6, "127.0.0.1", "::", "::ffff:127.0.0.1", client_family=AF_INET)


def test_refused_connect_is_failed(bpf_daemon):
    s = run("refused")
    assert s["errno"] == 111
    rows = socket_rows(bpf_daemon, s["pid"], 4)
    connect = [r for r in rows if r["syscall"] == "connect"]
    assert [(r["fd"], r["remote_address"], r["remote_port"], r["status"], r["exit_code"]) for r in connect] \
        == [(s["cli"], "127.0.0.1", s["port"], "failed", "-111")]
    assert [r["syscall"] for r in rows] == ["bind", "connect", "close", "close"]


def test_nonblocking_connect_is_in_progress(bpf_daemon):
    s = run("nonblocking")
    assert s["errno"] == 115
    rows = socket_rows(bpf_daemon, s["pid"], 5)
    [connect] = [r for r in rows if r["syscall"] == "connect"]
    assert (connect["fd"], connect["remote_address"], connect["remote_port"], connect["status"],
            connect["exit_code"]) == (s["cli"], "127.0.0.1", s["port"], "in_progress", "-115")
    assert [r["syscall"] for r in rows] == ["bind", "listen", "connect", "close", "close"]


def test_udp_connect_and_unconnected_sendto(bpf_daemon):
    s = run("udp")
    rows = socket_rows(bpf_daemon, s["pid"], 5)
    P = s["port"]
    assert shape(rows) == [
        ("bind", s["srv"], AF_INET, DGRAM, UDP, "127.0.0.1", P, "0.0.0.0", 0, "succeeded", "0"),
        ("connect", s["cli"], AF_INET, DGRAM, UDP, "127.0.0.1", s["client_port"], "127.0.0.1", P,
         "succeeded", "0"),
        # sendto() without connect() is no row; its socket shows at close, remote end unset
        ("close", s["cli"], AF_INET, DGRAM, UDP, "127.0.0.1", s["client_port"], "127.0.0.1", P,
         "succeeded", "0"),
        ("close", s["lone"], AF_INET, DGRAM, UDP, "0.0.0.0", s["lone_port"], "0.0.0.0", 0, "succeeded", "0"),
        ("close", s["srv"], AF_INET, DGRAM, UDP, "127.0.0.1", P, "0.0.0.0", 0, "succeeded", "0"),
    ]


def test_unix_stream_socket_with_a_path(bpf_daemon, workdir):
    path = os.path.join(workdir, f"s-{uuid.uuid4().hex[:6]}.sock")
    s = run("unix", path)
    rows = socket_rows(bpf_daemon, s["pid"], 7)
    assert [(r["syscall"], r["fd"], r["family"], r["type"], r["protocol"], r["local_address"],
             r["remote_address"], r["socket"], r["status"]) for r in rows] == [
        ("bind", s["srv"], AF_UNIX, STREAM, 0, path, "", path, "succeeded"),
        ("listen", s["srv"], AF_UNIX, STREAM, 0, path, "", path, "succeeded"),
        ("connect", s["cli"], AF_UNIX, STREAM, 0, "", path, path, "succeeded"),
        ("accept4", s["srv"], AF_UNIX, STREAM, 0, path, "", path, "succeeded"),
        ("close", s["cli"], AF_UNIX, STREAM, 0, "", path, "", "succeeded"),
        ("close", s["conn"], AF_UNIX, STREAM, 0, path, "", path, "succeeded"),
        ("close", s["srv"], AF_UNIX, STREAM, 0, path, "", path, "succeeded"),
    ]
    assert all(r["local_port"] == 0 and r["remote_port"] == 0 for r in rows)
    check_common(rows, s)


@pytest.fixture
def netns():
    name = f"vajra-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_connection_inside_another_network_namespace(bpf_daemon, netns):
    s = run("tcp4", prefix=("ip", "netns", "exec", netns))
    # `ip netns exec` talks netlink (family 16) in the same pid before it execs python
    rows = [r for r in socket_rows(bpf_daemon, s["pid"], 9) if r["family"] != 16]
    assert shape(rows) == tcp_rows(s, AF_INET, "127.0.0.1", "127.0.0.1", "127.0.0.1")
    inode = os.stat(f"/run/netns/{netns}").st_ino
    assert inode != os.stat("/proc/self/ns/net").st_ino
    assert {r["net_namespace"] for r in rows} == {inode}


def test_closing_files_reaches_no_userspace(bpf_daemon, workdir):
    """close() of a regular file is dropped in the kernel: no row, no record."""
    target = os.path.join(workdir, "plain")
    Path(target).write_text("x")
    before = bpf_daemon.call("status")["collectors"]["socket"]["records"]
    s = run("files", target, "20000")
    time.sleep(0.5)
    after = bpf_daemon.call("status")["collectors"]["socket"]["records"]
    assert socket_rows(bpf_daemon, s["pid"], 1, timeout=1) == []
    # Records count every socket call on the host (the status calls, other
    # programs running meanwhile): far fewer than the 20,000 closes, which
    # would each be a record if the kernel let them through.
    assert after - before < 2000


def start_holder(workdir: str, prefix=()) -> tuple[subprocess.Popen, dict]:
    """A process holding a listener and both ends of a connection until its stdin gets a line."""
    ready = os.path.join(workdir, f"held-{uuid.uuid4().hex[:6]}.json")
    holder = subprocess.Popen([*prefix, sys.executable, str(HERE / "socket_scenarios.py"), "hold", ready],
                              stdin=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(ready):
        if time.monotonic() > deadline:
            holder.kill()
            raise AssertionError("the socket holder did not get ready")
        time.sleep(0.05)
    return holder, json.loads(Path(ready).read_text())


def test_socket_older_than_the_daemon(daemon_factory, workdir):
    holder, s = start_holder(workdir)
    try:
        d = daemon_factory()
        assert d.call("status")["collectors"]["socket"]["seeded"] > 0
        open_rows = [r for r in d.call("table/read", {"table": "vajra_open_sockets"})["rows"]
                     if r["pid"] == s["pid"]]
        assert sorted((r["fd"], r["family"], r["protocol"], r["local_address"], r["local_port"],
                       r["remote_address"], r["remote_port"], r["state"]) for r in open_rows) == sorted([
            (s["srv"], AF_INET, TCP, "127.0.0.1", s["port"], "0.0.0.0", 0, "LISTEN"),
            (s["cli"], AF_INET, TCP, "127.0.0.1", s["client_port"], "127.0.0.1", s["port"], "ESTABLISHED"),
            (s["conn"], AF_INET, TCP, "127.0.0.1", s["port"], "127.0.0.1", s["client_port"], "ESTABLISHED"),
        ])
        assert all(json.loads(r["ancestry"])[0]["pid"] == os.getpid() for r in open_rows)
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(10)
        rows = socket_rows(d, s["pid"], 3)
        assert shape(rows) == [
            ("close", s["cli"], AF_INET, STREAM, TCP, "127.0.0.1", s["client_port"], "127.0.0.1", s["port"],
             "succeeded", "0"),
            ("close", s["conn"], AF_INET, STREAM, TCP, "127.0.0.1", s["port"], "127.0.0.1", s["client_port"],
             "succeeded", "0"),
            ("close", s["srv"], AF_INET, STREAM, TCP, "127.0.0.1", s["port"], "0.0.0.0", 0, "succeeded", "0"),
        ]
        assert [r["duration"] for r in rows] == [None, None, None]     # created before the daemon
        assert not [r for r in d.call("table/read", {"table": "vajra_open_sockets"})["rows"]
                    if r["pid"] == s["pid"]]
    finally:
        holder.kill()


def test_socket_events_can_be_turned_off(daemon_factory):
    d = daemon_factory("--enable_socket_events=false")
    assert "socket" not in d.call("status")["collectors"]
    with pytest.raises(Exception, match="vajra_open_sockets has no source"):
        d.call("table/read", {"table": "vajra_open_sockets"})


def test_open_sockets_in_another_namespace_come_from_events(bpf_daemon, netns, workdir):
    """sock_diag here cannot see another namespace's sockets: the events
    record them, and they go when their holder dies without close()."""
    holder, s = start_holder(workdir, prefix=("ip", "netns", "exec", netns))
    try:
        inode = os.stat(f"/run/netns/{netns}").st_ino
        socket_rows(bpf_daemon, s["pid"], 5)          # bind, listen, connect, accept4 (+ netlink)

        def held():
            return sorted((r["fd"], r["local_port"], r["remote_port"], r["state"], r["net_namespace"])
                          for r in bpf_daemon.call("table/read", {"table": "vajra_open_sockets"})["rows"]
                          if r["pid"] == s["pid"])
        assert held() == sorted([
            (s["srv"], s["port"], 0, "LISTEN", inode),
            (s["cli"], s["client_port"], s["port"], "ESTABLISHED", inode),
            (s["conn"], s["port"], s["client_port"], "ESTABLISHED", inode),
        ])
        holder.kill()                                   # no close(): the exit closes them
        holder.wait(10)
        assert held() == []
    finally:
        holder.kill()

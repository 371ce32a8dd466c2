"""Attribution on the real kernel (issue 12): which process and which image a
row names, for threads born after their process, for calls just before an
exec, on a host with thousands of processes, and for sockets in other network
namespaces or closed after their peer."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import BPF_OK, BPF_WHY, needs_bpf
from harness import Daemon, proc_ancestors, unique_program

pytestmark = needs_bpf
HERE = Path(__file__).resolve().parent
EXE = os.path.realpath(sys.executable)
DASH = os.path.realpath("/bin/sh")
AF_INET, STREAM, TCP = 2, 1, 6


class Host:
    """One daemon for the module, watching W, in a directory removed at the end."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="vajra-attr-")
        os.chmod(self.root, 0o755)
        self.W = os.path.join(self.root, "W")
        os.makedirs(self.W)
        config = Path(self.root, "vajra.conf")
        config.write_text(json.dumps({"options": {}, "file_paths": {"attr": [self.W + "/%%"]}}))
        self.since = int(time.time()) - 5      # the module's rows are younger: reads start here
        self.daemon = Daemon(self.root, f"--config_path={config}").start()

    def rows(self, table: str, predicate, want: int = 1, timeout: float = 30, settle: float = 0.3):
        """The rows matching once `want` are in (and a moment later, so that
        extras would show), sorted by eid. Waits past an eid cursor: a busy
        host's table is not rescanned every poll."""
        found = self.daemon.wait_events(predicate, table=table, timeout=timeout, want=want,
                                        since_time=self.since)
        if len(found) >= want and settle:
            time.sleep(settle)
            found = self.daemon.wait_events(predicate, table=table, timeout=0, want=len(found) + 1,
                                            since_time=self.since)
        return sorted(found, key=lambda e: e["eid"])

    def read(self, table: str) -> list[dict]:
        return self.daemon.call("table/read", {"table": table})["rows"]

    def close(self) -> None:
        self.daemon.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def host():
    if not BPF_OK:
        pytest.skip(BPF_WHY)
    h = Host()
    yield h
    h.close()


@pytest.fixture(scope="module")
def worker_binary(host):
    """tests/attribution_worker.c, static, as Go links (scripts/bootstrap installs gcc and libc6-dev)."""
    cc = shutil.which("cc")
    assert cc, "no C compiler: scripts/bootstrap installs gcc and libc6-dev for the tests"
    out = os.path.join(host.root, f"gostyle-{uuid.uuid4().hex[:6]}")
    subprocess.run([cc, "-static", "-pthread", "-O1", "-o", out, str(HERE / "attribution_worker.c")],
                   check=True, capture_output=True)
    return out


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield srv
    srv.close()


def lineage(row) -> list[tuple[int, str]]:
    return [(a["pid"], a["path"]) for a in json.loads(row["ancestry"])]


def check_our_line(ancestry: list[dict]):
    """The part of an ancestry that is this test process and its ancestors: whole, and linked."""
    assert [a["pid"] for a in ancestry] == [os.getpid(), *proc_ancestors(os.getpid())]
    for child, parent in zip(ancestry, ancestry[1:]):
        assert child["ppid"] == parent["pid"] and child["pproc_time_hr"] == parent["proc_time_hr"]


# --- threads born after their process -----------------------------------------------------------

def test_go_style_static_program_acting_from_a_late_born_thread(host, worker_binary, listener):
    """A static program whose only worker thread, born 300 ms after the
    process, outlives the leader, connects, writes a watched file, forks and
    spawns (CLONE_VFORK, as Go's os/exec), and ends the process with status 3."""
    prog = unique_program(host.root, f"vajra-late-{uuid.uuid4().hex[:8]}")
    target = os.path.join(host.W, f"late-{uuid.uuid4().hex[:6]}")
    port = listener.getsockname()[1]
    argv = [worker_binary, "worker", target, str(port), prog]
    started = time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    lived_ns = (time.monotonic() - started) * 1e9
    assert run.returncode == 3, run.stderr
    pid, tid = map(int, run.stdout.split())
    assert tid != pid
    cmdline = " ".join(argv)
    ours = lambda r: r["pid"] == pid                              # noqa: E731

    # the exit: by the worker, with the process's image and the process's life
    [exit_row] = host.rows("bpf_process_events", lambda r: ours(r) and r["syscall"] == "exit")
    assert (exit_row["tid"], exit_row["exit_code"], exit_row["path"], exit_row["cmdline"],
            exit_row["partial"]) == (tid, "3", worker_binary, cmdline, 0)
    # born 300 ms before its worker, which itself lived 400 ms and more
    assert 700_000_000 <= exit_row["duration"] <= lived_ns
    check_our_line(json.loads(exit_row["ancestry"]))

    # the children: fork rows with the parent's image, exec rows with the whole line
    forks = host.rows("bpf_process_events", lambda r: r["parent"] == pid and r["syscall"] in ("fork", "clone", "vfork"),
                      want=2)
    assert len(forks) == 2
    for f in forks:
        assert (f["path"], f["cmdline"], f["partial"]) == (worker_binary, cmdline, 0)
        assert lineage(f)[0] == (pid, worker_binary)
        check_our_line(json.loads(f["ancestry"])[1:])
    execs = host.rows("bpf_process_events", lambda r: r["path"] == prog and r["syscall"] == "exec", want=2)
    assert sorted(r["cmdline"] for r in execs) == [f"{prog} forked", f"{prog} spawned"]
    assert {r["pid"] for r in execs} == {f["pid"] for f in forks}
    for e in execs:
        anc = json.loads(e["ancestry"])
        assert (anc[0]["pid"], anc[0]["path"], anc[0]["cmdline"], anc[0]["ppid"]) == \
            (pid, worker_binary, cmdline, os.getpid())
        check_our_line(anc[1:])
        assert anc[0]["pproc_time_hr"] == anc[1]["proc_time_hr"]

    # the connect and its close, from the worker thread
    socks = host.rows("bpf_socket_events", ours, want=2)
    assert [(r["syscall"], r["tid"], r["path"], r["remote_port"], r["status"]) for r in socks] == [
        ("connect", tid, worker_binary, port, "succeeded"), ("close", tid, worker_binary, port, "succeeded")]
    for r in socks:
        check_our_line(json.loads(r["ancestry"]))

    # the write, in both file tables
    [opened] = host.rows("bpf_file_events", lambda r: ours(r) and r["file_path"] == target)
    assert (opened["syscall"], opened["tid"], opened["path"], opened["cmdline"]) == \
        ("openat", tid, worker_binary, cmdline)
    check_our_line(json.loads(opened["ancestry"]))
    changes = host.rows("file_events", lambda r: r["target_path"] == target, want=2, settle=1.5)
    assert {r["action"] for r in changes} >= {"CREATED"}
    assert all((r["pid"], r["path"]) == (pid, worker_binary) for r in changes)


def test_python_thread_born_late_exits_last_forks_connects_and_writes(host, listener):
    prog = unique_program(host.root, f"vajra-pyth-{uuid.uuid4().hex[:8]}")
    target = os.path.join(host.W, f"py-{uuid.uuid4().hex[:6]}")
    port = listener.getsockname()[1]
    code = textwrap.dedent(f"""
        import ctypes, os, socket, subprocess, sys, threading, time
        def work():
            time.sleep(0.1)
            socket.create_connection(("127.0.0.1", {port})).close()
            with open({target!r}, "w") as f:
                f.write("x")
            subprocess.run([{prog!r}, "from-thread"], check=True)
            print(os.getpid(), threading.get_native_id(), flush=True)
            time.sleep(0.3)
            os._exit(4)
        time.sleep(0.3)
        threading.Thread(target=work).start()
        ctypes.CDLL(None).syscall(60, 0)          # SYS_exit: the leader thread leaves first
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 4, run.stderr
    pid, tid = map(int, run.stdout.split())
    cmdline = f"{sys.executable} -c {code}"
    [exit_row] = host.rows("bpf_process_events", lambda r: r["pid"] == pid and r["syscall"] == "exit")
    assert (exit_row["tid"], exit_row["path"], exit_row["cmdline"], exit_row["partial"]) == (tid, EXE, cmdline, 0)
    assert exit_row["duration"] >= 700_000_000
    [child] = host.rows("bpf_process_events", lambda r: r["path"] == prog and r["syscall"] == "exec")
    assert lineage(child)[0] == (pid, EXE)
    check_our_line(json.loads(child["ancestry"])[1:])
    [connect] = host.rows("bpf_socket_events", lambda r: r["pid"] == pid and r["syscall"] == "connect")
    assert (connect["tid"], connect["path"], connect["remote_port"]) == (tid, EXE, port)
    check_our_line(json.loads(connect["ancestry"]))
    [opened] = host.rows("bpf_file_events", lambda r: r["pid"] == pid and r["file_path"] == target)
    assert (opened["tid"], opened["path"], opened["cmdline"]) == (tid, EXE, cmdline)


# --- calls just before an exec ----------------------------------------------------------------

def test_bind_and_listen_then_exec_are_the_old_program(host):
    prog = unique_program(host.root, f"vajra-after-{uuid.uuid4().hex[:8]}")
    code = textwrap.dedent(f"""
        import os, socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        print(os.getpid(), s.getsockname()[1], flush=True)
        os.execv({prog!r}, [{prog!r}, "after-listen"])
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    pid, port = map(int, run.stdout.split())
    rows = host.rows("bpf_socket_events", lambda r: r["pid"] == pid and r["family"] == AF_INET, want=2)
    assert [(r["syscall"], r["local_port"], r["path"]) for r in rows] == [("bind", port, EXE), ("listen", port, EXE)]
    [exec_row] = host.rows("bpf_process_events", lambda r: r["pid"] == pid and r["path"] == prog and r["syscall"] == "exec")
    assert exec_row["cmdline"] == f"{prog} after-listen"


def test_redirect_then_exec_is_the_shell(host):
    prog = unique_program(host.root, f"vajra-redir-{uuid.uuid4().hex[:8]}")
    target = os.path.join(host.W, f"redir-{uuid.uuid4().hex[:6]}")
    script = f"echo $$; echo x > {target}; exec {prog} replaced"
    run = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True, timeout=30)
    pid = int(run.stdout)
    [opened] = host.rows("bpf_file_events", lambda r: r["pid"] == pid and r["file_path"] == target)
    assert (opened["syscall"], opened["path"], opened["cmdline"]) == ("openat", DASH, f"sh -c {script}")
    changes = host.rows("file_events", lambda r: r["target_path"] == target, want=2, settle=1.5)
    assert changes and all((r["pid"], r["path"]) == (pid, DASH) for r in changes)
    [exec_row] = host.rows("bpf_process_events", lambda r: r["pid"] == pid and r["path"] == prog and r["syscall"] == "exec")
    assert exec_row["cmdline"] == f"{prog} replaced"
    stats = host.read("process_ancestry_cache_stats")[0]
    assert stats["held_images"] < 1000         # let go once attributed, not kept per exec


# --- thousands of processes -------------------------------------------------------------------

def test_three_thousand_idle_processes_and_short_chains(host, worker_binary):
    """More running processes than process_ancestry_cache_size (1000): none
    is evicted, and chains of three that run meanwhile have whole ancestry."""
    idle = subprocess.Popen([worker_binary, "idle", "3000"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert idle.stdout.readline() == "ready\n"
        forks = host.rows("bpf_process_events", lambda r: r["parent"] == idle.pid and r["syscall"] == "clone",
                          want=3000, timeout=60, settle=0)
        assert len(forks) == 3000
        stats = host.read("process_ancestry_cache_stats")[0]
        assert stats["live_entries"] >= 3001 and stats["max_size"] == 1000
        assert stats["cache_size"] == stats["live_entries"] + stats["exited_entries"]
        misses = stats["cache_misses"]

        prog = unique_program(host.root, f"vajra-busy-{uuid.uuid4().hex[:8]}")
        script = os.path.join(host.root, f"chains-{uuid.uuid4().hex[:6]}.sh")
        Path(script).write_text(f"for i in $(seq 300); do bash -c \"sh -c 'sh -c \\\"{prog} $i\\\"; true'; true\"; done\n")
        driver = subprocess.Popen(["bash", script])
        assert driver.wait(120) == 0
        rows = host.rows("bpf_process_events", lambda r: r["path"] == prog and r["syscall"] == "exec",
                         want=300, timeout=60)
        assert sorted(int(r["cmdline"].split()[1]) for r in rows) == list(range(1, 301))
        for r in rows:
            anc = json.loads(r["ancestry"])
            assert [a["exe_name"] for a in anc[:4]] == ["dash", "dash", "bash", "bash"]
            assert anc[3]["pid"] == driver.pid
            check_our_line(anc[4:])
            for child, parent in zip(anc, anc[1:4]):
                assert child["ppid"] == parent["pid"] and child["pproc_time_hr"] == parent["proc_time_hr"]
        after = host.read("process_ancestry_cache_stats")[0]
        # every idle process is still cached: all 3000 and the idler are alive
        assert after["live_entries"] >= 3001
        # and no ancestor had to be looked up in /proc
        assert after["cache_misses"] == misses
    finally:
        os.killpg(idle.pid, signal.SIGKILL)
        idle.wait(30)
    # their exits move them to the exited entries, which max_size bounds
    host.rows("bpf_process_events", lambda r: r["pid"] == idle.pid and r["syscall"] == "exit")
    deadline = time.monotonic() + 30
    while True:
        stats = host.read("process_ancestry_cache_stats")[0]
        if stats["live_entries"] < 3000 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["live_entries"] < 3000 and stats["exited_entries"] <= 1000


# --- sockets ------------------------------------------------------------------------------------

@pytest.fixture
def netns():
    """A network namespace with lo up and a veth pair whose end v0 is
    10.77.0.1/24; nobody on that link answers (v1 has no address), so a
    connect to 10.77.0.2 stays in SYN_SENT. Deleting the namespace deletes both."""
    name = f"vajra-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                    ["ip", "addr", "add", "10.77.0.1/24", "dev", "v0"], ["ip", "link", "set", "v0", "up"],
                    ["ip", "link", "set", "v1", "up"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_non_blocking_connects_in_another_namespace_are_listed_while_open(host, netns):
    ready = os.path.join(host.root, f"connecting-{uuid.uuid4().hex[:6]}.json")
    holder = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(HERE / "socket_scenarios.py"),
                               "hold_connecting", ready, "10.77.0.2"], stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(ready):
            assert time.monotonic() < deadline and holder.poll() is None, "the holder did not get ready"
            time.sleep(0.05)
        s = json.loads(Path(ready).read_text())
        assert [p["errno"] for p in s["pending"]] == [115, 115]          # EINPROGRESS
        inode = os.stat(f"/run/netns/{netns}").st_ino
        # bind, listen and the three connects
        host.rows("bpf_socket_events", lambda r: r["pid"] == s["pid"] and r["syscall"] == "connect", want=3)

        def held():
            return sorted((r["fd"], r["local_address"], r["local_port"], r["remote_address"], r["remote_port"],
                           r["state"], r["net_namespace"])
                          for r in host.read("vajra_open_sockets") if r["pid"] == s["pid"])
        expected = [(p["fd"], "10.77.0.1", p["local_port"], "10.77.0.2", 9, "SYN_SENT", inode) for p in s["pending"]]
        expected.append((s["srv"], "127.0.0.1", s["port"], "0.0.0.0", 0, "LISTEN", inode))
        loop = s["loop"]
        listed = held()
        # Over loopback the handshake is usually over by the time connect
        # returns EINPROGRESS (the SYN-ACK waits in the socket's backlog until
        # connect releases it); the state listed is the one the call saw.
        [loop_row] = [r for r in listed if r[0] == loop["fd"]]
        assert loop["errno"] in (0, 115) and loop_row[:5] == (loop["fd"], "127.0.0.1", loop["local_port"],
                                                              "127.0.0.1", s["port"])
        assert loop_row[5] in ("ESTABLISHED", "SYN_SENT") and loop_row[6] == inode
        assert [r for r in listed if r[0] != loop["fd"]] == sorted(expected)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(10) == 0
        host.rows("bpf_socket_events", lambda r: r["pid"] == s["pid"] and r["syscall"] == "close"
                  and r["family"] == AF_INET, want=4)
        assert held() == []
    finally:
        holder.kill()
        holder.wait(10)
        if os.path.exists(ready):
            os.unlink(ready)


def test_tcp_close_after_the_peer_closed_first_has_both_ends(host):
    out = subprocess.run([sys.executable, str(HERE / "socket_scenarios.py"), "peer_first"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    s = json.loads(out)
    assert s["reset_errno"] in (32, 104)             # EPIPE or ECONNRESET: the RST came
    closes = host.rows("bpf_socket_events", lambda r: r["pid"] == s["pid"] and r["syscall"] == "close", want=5)
    clients = [r for r in closes if r["local_port"] != s["port"] and r["fd"] != s["srv"]]
    assert [(r["fd"], r["local_address"], r["local_port"], r["remote_address"], r["remote_port"], r["status"])
            for r in clients] == [
        (s["waiting"], "127.0.0.1", s["waiting_port"], "127.0.0.1", s["port"], "succeeded"),
        (s["reset"], "127.0.0.1", s["reset_port"], "127.0.0.1", s["port"], "succeeded"),
    ]

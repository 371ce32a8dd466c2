"""A real daemon on real BPF: execs show up with the right pid, parent,
cmdline and cwd through the socket, vajractl and D-Bus."""
import json
import os
import threading
import subprocess
import sys
import time
import uuid

import pytest

from conftest import needs_bpf
from harness import unique_program

pytestmark = needs_bpf


def run_probe(workdir, *args, cwd=None):
    name = f"vajra-probe-{uuid.uuid4().hex[:10]}"
    prog = unique_program(workdir, name)
    cwd = cwd or workdir
    proc = subprocess.Popen([prog, *args], cwd=cwd)
    proc.wait()
    return name, prog, proc.pid, cwd


def own_cgroup_id() -> int:
    """The cgroup v2 id of this process (and of the children it runs): the
    inode of its directory in the unified hierarchy, what bpf_get_current_cgroup_id() gives."""
    path = next(line.split("::", 1)[1].strip() for line in open("/proc/self/cgroup") if line.startswith("0::"))
    mount = next(line.split()[4] for line in open("/proc/self/mountinfo") if " - cgroup2 " in line)
    return os.stat(mount + path).st_ino


def by_path(prog):
    return lambda e: e["path"] == prog and e["syscall"] == "exec"


@pytest.mark.parametrize("output", ["ringbuf", "perf"])
def test_exec_through_socket(daemon_factory, workdir, output):
    d = daemon_factory(f"--bpf_output={output}")
    started = int(time.time())
    sub = os.path.join(workdir, "sub dir")
    os.mkdir(sub)
    name, prog, pid, cwd = run_probe(workdir, "first arg", "--flag=x", cwd=sub)
    events = d.wait_events(by_path(prog))
    assert len(events) == 1, events
    e = events[0]
    assert e["pid"] == pid and e["tid"] == pid
    assert e["parent"] == os.getpid()           # the real parent's tgid, not 0
    assert e["cwd"] == sub
    assert json.loads(e["json_cmdline"]) == [prog, "first arg", "--flag=x"]
    assert e["cmdline"] == f"{prog} first arg --flag=x"
    assert e["syscall"] == "exec" and e["exit_code"] == "0" and e["probe_error"] == 0
    assert e["uid"] == os.getuid() and e["gid"] == os.getgid()
    assert e["cid"] == own_cgroup_id() and e["duration"] > 0 and int(e["ntime"]) > 0
    assert e["host_identifier"] == os.uname().nodename and e["is_open"] is False
    assert e["table"] == "bpf_process_events" and e["eid"] >= 1
    assert started - 1 <= e["time"] <= time.time() + 1
    assert d.call("status")["collectors"]["process"]["output"] == output


def test_exec_through_vajractl(bpf_daemon, workdir):
    name, prog, pid, cwd = run_probe(workdir, "ctl")
    assert bpf_daemon.wait_events(by_path(prog))
    out = subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "--socket", bpf_daemon.socket,
                          "events", "--json", "--table", "bpf_process_events", "--since", "120"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if name in line and '"syscall": "exec"' in line]
    assert [(r["pid"], r["parent"], r["cwd"]) for r in rows] == [(pid, os.getpid(), cwd)]
    table = subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "--socket", bpf_daemon.socket, "events"],
                           capture_output=True, text=True, check=True).stdout
    line = next(line for line in table.splitlines() if name in line and "syscall=exec" in line)
    assert f"pid={pid}" in line and "syscall=exec" in line and line.startswith("20")


def test_relative_and_symlinked_exec_paths_are_resolved(bpf_daemon, workdir):
    prog = unique_program(workdir, f"vajra-rel-{uuid.uuid4().hex[:8]}")
    link = os.path.join(workdir, "link-to-prog")
    os.symlink(prog, link)
    subprocess.run(["./" + os.path.basename(prog)], cwd=workdir, check=True)
    subprocess.run([link], check=True)
    events = bpf_daemon.wait_events(by_path(prog), want=2)      # both execs, not the first to be visible
    cmds = sorted(json.loads(e["json_cmdline"])[0] for e in events)
    assert cmds == sorted(["./" + os.path.basename(prog), link])


def test_cmdline_cut_is_flagged(bpf_daemon, workdir):
    big = ["x" * 1000] * 6       # more than the 4096 argv bytes read in the kernel by default
    name, prog, pid, cwd = run_probe(workdir, *big)
    e = bpf_daemon.wait_events(by_path(prog))[0]
    assert e["probe_error"] & 1
    assert 3000 < len(e["cmdline"]) <= 4096 and e["cmdline"].startswith(prog)


@needs_bpf
@pytest.mark.parametrize("limit", [1024, 7936])
def test_cmdline_byte_limit_is_configurable(daemon_factory, workdir, limit):
    d = daemon_factory(f"--process_cmdline_max_bytes={limit}")
    _, short, _, _ = run_probe(workdir, *["y" * 100] * 5)
    _, cut, _, _ = run_probe(workdir, *["x" * 1000] * (limit // 1000 + 2))
    [whole] = d.wait_events(by_path(short))
    [e] = d.wait_events(by_path(cut))
    assert whole["probe_error"] & 1 == 0 and len(json.loads(whole["json_cmdline"])) == 6
    assert e["probe_error"] & 1 and limit - 1000 < len(e["cmdline"]) <= limit


def test_subscribe_streams_new_events(bpf_daemon, workdir):
    with bpf_daemon.client() as c:
        c.call("subscribe", {"table": "bpf_process_events"})
        c._sock.settimeout(60)              # a missing event fails the test, it does not hang it
        name, prog, pid, cwd = run_probe(workdir)
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the exec never came"
            msg = c.read_message()
            if msg.get("method") == "event" and by_path(prog)(msg["params"]["event"]):
                break
    ev = msg["params"]["event"]
    assert ev["pid"] == pid and ev["eid"] > 0 and ev["table"] == "bpf_process_events"


def test_follow_prints_new_events(bpf_daemon, workdir):
    subscribers = bpf_daemon.call("status")["api"]["subscribers"]
    follow = subprocess.Popen([sys.executable, "-m", "vajrad.client.ctl", "--socket", bpf_daemon.socket,
                               "events", "--follow", "--json", "--since", "1"],
                              stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    # read all along: what it lists first may fill the pipe before it subscribes
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)
    reader.start()
    found = None
    try:
        deadline = time.monotonic() + 60
        while bpf_daemon.call("status")["api"]["subscribers"] <= subscribers:     # it has subscribed
            assert time.monotonic() < deadline and follow.poll() is None
            time.sleep(0.05)
        name, prog, pid, cwd = run_probe(workdir)
        while found is None:
            assert follow.poll() is None, f"vajractl events --follow exited with {follow.returncode}"
            assert time.monotonic() < deadline, "vajractl events --follow never printed the exec"
            found = next((json.loads(line) for line in list(lines)
                          if name in line and json.loads(line)["syscall"] == "exec"), None)
            time.sleep(0.05)
    finally:
        follow.terminate()
        follow.wait(10)
    assert found["pid"] == pid and found["path"] == prog


def test_records_older_than_bpf_wakeup_ms_wake_the_collector(daemon_factory, workdir):
    """Issue 20, item 2: the kernel side wakes the process collector once the
    oldest unread record is --bpf_wakeup_ms old, instead of leaving it to the
    collector's 400 ms timer (or 128 KiB per CPU, which a few execs never fill)."""
    d = daemon_factory("--bpf_output=ringbuf", "--bpf_wakeup_ms=1")
    before = d.call("status")["collectors"]["process"]["wakeups"]
    for _ in range(10):
        name, prog, pid, cwd = run_probe(workdir)
        assert d.wait_events(by_path(prog))
    woken = d.call("status")["collectors"]["process"]["wakeups"] - before
    assert woken >= 5, woken


def test_bpf_wakeup_ms_zero_leaves_wakeups_to_bytes_and_the_timer(daemon_factory, workdir):
    d = daemon_factory("--bpf_output=ringbuf", "--bpf_wakeup_ms=0")
    name, prog, pid, cwd = run_probe(workdir)
    assert d.wait_events(by_path(prog))

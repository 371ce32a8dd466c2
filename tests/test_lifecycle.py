"""The daemon's life: sd_notify sequence, watchdog, reload, restart and crash."""
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path


from conftest import BPF_OK, needs_bpf, needs_root
from harness import Daemon, unique_program


def _extra():
    return [] if BPF_OK else ["--enable_bpf_events=false"]


@needs_bpf
def test_notify_sequence(daemon_factory):
    d = daemon_factory(start=False, env={"WATCHDOG_USEC": "1000000"}).start()
    ready = d.notify.wait_for("READY=1", 1)
    assert "STATUS=captured" in ready and f"MAINPID={d.proc.pid}" in ready
    # READY came only once the socket answered and the collector was attached
    status = d.call("status")
    assert status["collectors"]["process"]["state"] == "running"
    d.notify.wait_for("WATCHDOG=1", 3, d.proc)
    time.sleep(2.5)
    assert d.stop() == 0
    states = d.notify.states()
    assert states.index("READY=1") < states.index("WATCHDOG=1") < states.index("STOPPING=1")
    assert states.count("WATCHDOG=1") >= 3          # every WATCHDOG_USEC/2
    assert any(s.startswith("STATUS=captured") for s in states[states.index("READY=1") + 1:])
    assert "event store flushed" in d.log


@needs_bpf
def test_threads_carry_their_names(daemon_factory):
    """top -H and ps -L show which part of vajrad is busy."""
    d = daemon_factory()
    tasks = Path(f"/proc/{d.proc.pid}/task")
    names = {(t / "comm").read_text().strip() for t in tasks.iterdir()}
    assert {"vajra-process", "vajra-socket", "vajra-store"} <= names, names


@needs_bpf
def test_ready_within_three_seconds(daemon_factory):
    d = daemon_factory()
    assert d.ready_after < 3, d.ready_after


def test_no_watchdog_without_watchdog_usec(daemon_factory):
    d = daemon_factory(*_extra())
    time.sleep(1.5)
    d.stop()
    assert "WATCHDOG=1" not in d.notify.states()


def test_watchdog_withheld_when_unhealthy(daemon_factory, workdir):
    d = daemon_factory(*_extra(), env={"WATCHDOG_USEC": "400000"})
    d.notify.wait_for("WATCHDOG=1", 3, d.proc)
    os.kill(d.proc.pid, signal.SIGSTOP)     # a wedged loop sends nothing
    time.sleep(0.5)
    d.notify.messages.clear()
    time.sleep(1)
    assert "WATCHDOG=1" not in d.notify.states()
    os.kill(d.proc.pid, signal.SIGCONT)
    d.notify.wait_for("WATCHDOG=1", 3, d.proc)


@needs_bpf
def test_sighup_reloads_config(daemon_factory, workdir):
    cfg = Path(workdir, "reload.conf")
    cfg.write_text(json.dumps({"options": {"host_identifier": "before-reload"}}))
    d = daemon_factory(f"--config_path={cfg}")
    assert d.call("status")["host_identifier"] == "before-reload"
    cfg.write_text(json.dumps({"options": {"host_identifier": "after-reload", "events_max": 7}}))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while d.call("status")["host_identifier"] != "after-reload":
        assert time.monotonic() < deadline, d.log
        time.sleep(0.1)
    prog = unique_program(workdir, f"vajra-hup-{uuid.uuid4().hex[:6]}")
    subprocess.run([prog], check=True)
    [e] = d.wait_events(lambda e: e["path"] == prog and e["syscall"] == "exec")
    assert e["host_identifier"] == "after-reload"
    assert "RELOADING=1" in d.notify.states()
    # a broken file on reload is reported and the daemon keeps going
    cfg.write_text('{"options": {"events_max": "lots"}}')
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert d.call("ping") == "pong"
    assert "reload failed" in d.log and "options.events_max" in d.log
    assert d.call("status")["host_identifier"] == "after-reload"


@needs_bpf
def test_restart_keeps_events_and_eids(daemon_factory, workdir):
    d = daemon_factory()
    first = unique_program(workdir, f"vajra-r1-{uuid.uuid4().hex[:6]}")
    subprocess.run([first], check=True)
    [e1] = d.wait_events(lambda e: e["path"] == first and e["syscall"] == "exec")
    assert d.stop() == 0
    d.start()
    second = unique_program(workdir, f"vajra-r2-{uuid.uuid4().hex[:6]}")
    subprocess.run([second], check=True)
    [e2] = d.wait_events(lambda e: e["path"] == second and e["syscall"] == "exec")
    assert e2["eid"] > e1["eid"]
    [again] = d.wait_events(lambda e: e["path"] == first and e["syscall"] == "exec")
    assert again == e1


@needs_bpf
def test_sigkill_loses_nothing_committed(daemon_factory, workdir):
    d = daemon_factory()
    progs = [unique_program(workdir, f"vajra-k{i}-{uuid.uuid4().hex[:6]}") for i in range(20)]
    for p in progs:
        subprocess.run([p], check=True)
    seen = d.wait_events(lambda e: e["path"] == progs[-1] and e["syscall"] == "exec")
    assert seen
    before = {e["eid"] for e in d.wait_events(lambda e: e["path"] in progs and e["syscall"] == "exec")}
    # keep exec'ing while the daemon is killed mid-stream
    storm = subprocess.Popen(["sh", "-c", "for i in $(seq 300); do /bin/true; done"])
    time.sleep(0.05)
    d.stop(signal.SIGKILL)
    storm.wait()
    con = sqlite3.connect(d.database)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    d.start()
    after = {e["eid"] for e in d.wait_events(lambda e: e["path"] in progs and e["syscall"] == "exec")}
    assert before <= after and len(after) == 20


@needs_root
def test_exits_before_ready_without_btf_or_headers(daemon_factory, workdir):
    # Hide BTF and every header tree in a private mount namespace.
    script = ("mount -t tmpfs none /sys/kernel/btf && mount -t tmpfs none /usr/src && "
              "mkdir -p /tmp/empty && mount --bind /tmp/empty /lib/modules 2>/dev/null; exec \"$@\"")
    d = daemon_factory(start=False, prefix=["unshare", "-m", "sh", "-c", script, "sh"])
    d.start(wait_ready=False)
    rc = d.proc.wait(30)
    assert rc == 1
    assert "READY=1" not in d.notify.states()
    assert "no BTF" in d.log and "install linux-headers-" in d.log


def test_a_receiver_that_stops_reading_does_not_freeze_the_daemon(daemon_factory):
    d = daemon_factory(*_extra(), env={"WATCHDOG_USEC": "100000"})    # 20 messages a second
    d.notify.wait_for("WATCHDOG=1", 3, d.proc)
    d.notify.pause()
    time.sleep(2)              # far more than the 10 datagrams a Unix socket queues
    started = time.monotonic()
    assert d.call("ping") == "pong"
    assert time.monotonic() - started < 1


def test_socket_in_use_is_refused(daemon_factory, workdir):
    d = daemon_factory(*_extra())
    other = Daemon(workdir, *_extra(), database=os.path.join(workdir, "other.db"))
    other.start(wait_ready=False)
    rc = other.proc.wait(30)
    other.stop()
    assert rc == 1 and "in use by another running vajrad" in other.log
    assert d.call("ping") == "pong"


def test_stale_socket_is_replaced(daemon_factory, workdir):
    d = daemon_factory(*_extra())
    d.stop(signal.SIGKILL)
    assert os.path.exists(d.socket)
    d.start()
    assert d.call("ping") == "pong"

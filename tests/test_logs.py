"""The logs unit in real vajrad processes: real files, a real writer
process, real logrotate (installed by the test set-up when missing),
SIGHUP, SIGKILL and restarts. The tailer's cases one by one are in
tests/test_logs_tail.py."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import Daemon

WRITER = str(Path(__file__).resolve().parent / "logwriter.py")
FLAGS = ("--enable_bpf_events=false", "--enable_file_events=false", "--events_max=0", "--events_expiry=0",
         "--log_rescan_interval_ms=500")


@pytest.fixture(scope="module")
def logrotate():
    path = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not os.path.exists(path):
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", "logrotate"],
                           capture_output=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode != 0:
            pytest.skip(f"logrotate cannot be installed: {r.stderr.decode()[-300:]}")
    return path


def write_config(workdir, log_files=None, journal=None, options=None) -> str:
    doc = {"options": options or {}}
    if log_files is not None:
        doc["log_files"] = log_files
    if journal is not None:
        doc["journal"] = journal
    path = os.path.join(workdir, "vajra.conf")
    Path(path).write_text(json.dumps(doc))
    return path


def start(workdir, *extra, **kw) -> Daemon:
    return Daemon(str(workdir), *FLAGS, *extra, **kw).start()


def rows(db, where="action = 'line'") -> list[tuple]:
    if not os.path.exists(db):
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        con.execute("PRAGMA busy_timeout=5000")
        return con.execute(f"SELECT line, path, partial, rule, fields, action FROM log_events WHERE {where} "
                           f"ORDER BY eid").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def wait_lines(db, n, timeout=60, daemon=None) -> list[tuple]:
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        got = rows(db)
        if len(got) >= n:
            return got
        if daemon is not None and daemon.proc is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"vajrad exited: {daemon.log[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{len(got)} of {n} lines after {timeout} s")


def seqs(found) -> list[int]:
    return [int(r[0][4:13]) for r in found]


def app(logdir, **fields) -> dict:
    fields.setdefault("start_at", "beginning")
    fields.setdefault("rotate_wait_ms", 300)
    return {"app": {"paths": [f"{logdir}/app.log"], **fields}}


# --- configuration -------------------------------------------------------------

@pytest.mark.parametrize("section, field", [
    ({"app": {"paths": ["/var/log/x.log"], "rules": [{"name": "r", "regex": "(unclosed"}]}},
     "log_files.app.rules[0].regex"),
    ({"app": {"paths": ["relative/*.log"]}}, "log_files.app.paths[0]"),
    ({"app": {"paths": ["/var/log/*/x.log"]}}, "log_files.app.paths[0]"),
    ({"app": {"paths": ["/var/log/[x.log"]}}, "log_files.app.paths[0]"),
    ({"app": {"paths": ["/var/log/x.log"], "start_at": "middle"}}, "log_files.app.start_at"),
    ({"app": {"paths": ["/var/log/x.log"], "colour": 1}}, "log_files.app.colour"),
    ({"app": {"paths": ["/var/log/x.log"], "rules": [{"name": "r", "regex": "x", "severity": "meh"}]}},
     "log_files.app.rules[0].severity"),
    ({"app": {"paths": ["/var/log/x.log"], "encoding": "klingon"}}, "log_files.app.encoding"),
])
def test_a_bad_log_files_section_exits_2_before_ready_naming_the_field(tmp_path, section, field):
    cfg = write_config(tmp_path, log_files=section)
    d = Daemon(str(tmp_path), *FLAGS, f"--config_path={cfg}").start(wait_ready=False)
    try:
        assert d.proc.wait(30) == 2
        assert field in d.log
        assert not any(s.startswith("READY=1") for s in d.notify.states())
    finally:
        d.stop()


def test_a_bad_journal_field_exits_2(tmp_path):
    cfg = write_config(tmp_path, journal={"j": {"match": {"lower": "x"}}})
    d = Daemon(str(tmp_path), *FLAGS, f"--config_path={cfg}").start(wait_ready=False)
    try:
        assert d.proc.wait(30) == 2 and "journal.j.match.lower" in d.log
    finally:
        d.stop()


def test_sighup_with_a_bad_section_keeps_reading_and_a_good_one_adds_without_rereading(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    (logdir / "app.log").write_text("one\n")
    cfg = write_config(tmp_path, log_files=app(logdir))
    db = str(tmp_path / "events.db")
    d = start(tmp_path, f"--config_path={cfg}")
    try:
        wait_lines(db, 1, daemon=d)
        write_config(tmp_path, log_files={"app": {"paths": [f"{logdir}/app.log"],
                                                  "rules": [{"name": "r", "regex": "(("}]}})
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload failed" not in d.log and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "log_files.app.rules[0].regex" in d.log
        with open(logdir / "app.log", "a") as f:
            f.write("two\n")
        wait_lines(db, 2, daemon=d)
        (logdir / "other.log").write_text("other\n")
        write_config(tmp_path, log_files={
            "app": {"paths": [f"{logdir}/app.log"], "start_at": "beginning"},
            "more": {"paths": [f"{logdir}/other.log"], "start_at": "beginning",
                     "rules": [{"name": "o", "regex": "oth(?P<rest>er)", "severity": "notice"}]}})
        d.proc.send_signal(signal.SIGHUP)
        got = wait_lines(db, 3, daemon=d)
        time.sleep(1.5)       # a few rescans: nothing read again
        got = rows(db)
        assert [r[0] for r in got] == ["one", "two", "other"]
        assert got[2][3] == "o" and json.loads(got[2][4]) == {"rest": "er"}
    finally:
        assert d.stop() == 0


# --- rotation with logrotate and a real writer ----------------------------------

def rotate_conf(tmp_path, logdir, body) -> str:
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{logdir}/app.log {{\n  rotate 5\n  missingok\n{body}\n}}\n")
    return str(conf)


def run_logrotate(binary, conf, state):
    r = subprocess.run([binary, "-f", "-s", state, conf], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_logrotate_create_while_writing_loses_and_repeats_nothing(tmp_path, logrotate):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    log.touch()
    cfg = write_config(tmp_path, log_files=app(logdir))
    db = str(tmp_path / "events.db")
    d = start(tmp_path, f"--config_path={cfg}")
    total = 12_000
    writer = subprocess.Popen([sys.executable, WRITER, str(log), "--lines", str(total), "--rate", "3000"])
    pidfile = tmp_path / "writer.pid"
    pidfile.write_text(str(writer.pid))
    conf = rotate_conf(tmp_path, logdir, f"  create 0644 root root\n  postrotate\n    kill -HUP $(cat {pidfile})\n"
                                         f"  endscript")
    try:
        for _ in range(3):
            time.sleep(0.8)
            run_logrotate(logrotate, conf, str(tmp_path / "lr.state"))
        assert writer.wait(60) == 0
        got = wait_lines(db, total, daemon=d)
        time.sleep(1)
        got = rows(db)
        assert seqs(got) == list(range(total))
        assert {os.path.basename(r[1]) for r in got} >= {"app.log", "app.log.1"}
        status = d.call("status")["collectors"]["logs"]
        assert status["rotations"] >= 1 and status["lines"] == total
    finally:
        writer.kill()
        assert d.stop() == 0


class Writer:
    """tests/logwriter.py under the test's command (stdin), for exact interleavings."""

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, WRITER, str(path), "--stdin"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def __call__(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def test_logrotate_copytruncate_mid_line_loses_nothing(tmp_path, logrotate):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    writer = Writer(log)
    writer("lines 0 100")
    cfg = write_config(tmp_path, log_files=app(logdir))
    db = str(tmp_path / "events.db")
    d = start(tmp_path, f"--config_path={cfg}")
    conf = rotate_conf(tmp_path, logdir, "  copytruncate")
    try:
        wait_lines(db, 100, daemon=d)
        writer("lines 100 200")
        writer("raw half a li")
        run_logrotate(logrotate, conf, str(tmp_path / "lr.state"))      # before vajrad read those
        writer("raw ne\\n")
        writer("lines 200 300")
        got = wait_lines(db, 302, daemon=d)
        time.sleep(1)
        got = rows(db)
        assert seqs(got[:200]) == list(range(200))
        assert [(r[0], r[2]) for r in got[200:202]] == [("half a li", 1), ("ne", 1)]
        assert seqs(got[202:]) == list(range(200, 300))
        (truncated,) = rows(db, "action = 'truncated'")
        assert json.loads(truncated[4])["continued_in"] == f"{log}.1"
    finally:
        writer.close()
        assert d.stop() == 0


def test_stopped_across_two_rotations_with_compression(tmp_path, logrotate):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    writer = Writer(log)
    writer("lines 0 50")
    cfg = write_config(tmp_path, log_files=app(logdir))
    db = str(tmp_path / "events.db")
    conf = rotate_conf(tmp_path, logdir, "  create\n  compress\n  delaycompress")
    d = start(tmp_path, f"--config_path={cfg}")
    try:
        wait_lines(db, 50, daemon=d)
        assert d.stop() == 0
        writer("lines 50 60")
        run_logrotate(logrotate, conf, str(tmp_path / "lr.state"))
        writer("reopen")
        writer("lines 60 70")
        run_logrotate(logrotate, conf, str(tmp_path / "lr.state"))        # app.log.2.gz, app.log.1, app.log
        writer("reopen")
        writer("lines 70 80")
        assert (logdir / "app.log.2.gz").exists()
        d = start(tmp_path, f"--config_path={cfg}")
        got = wait_lines(db, 70, daemon=d)
        time.sleep(1)
        got = rows(db)
        # The generation compressed while we were away (lines 50-59) cannot be read: it is
        # counted as such nowhere, since its bytes were never seen; everything readable is.
        assert seqs(got) == list(range(50)) + list(range(60, 80))
    finally:
        writer.close()
        d.stop()


# --- crashes and restarts --------------------------------------------------------

def test_sigkill_between_reading_and_committing_loses_and_repeats_nothing(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    writer = Writer(log)
    cfg = write_config(tmp_path, log_files=app(logdir))
    db = str(tmp_path / "events.db")
    # Rows wait up to 10 s in the store's queue: a window between read and commit.
    d = start(tmp_path, f"--config_path={cfg}", "--store_max_pending_ms=10000")
    try:
        writer("lines 0 500")
        wait_lines(db, 500, daemon=d)             # committed (by age)
        writer("lines 500 1000")
        deadline = time.monotonic() + 30
        while True:
            status = d.call("status")
            if status["collectors"]["logs"]["lines"] == 1000 and status["store"]["pending"] > 0:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert len(rows(db)) == 500               # read, not committed
        d.stop(signal.SIGKILL)
        d = start(tmp_path, f"--config_path={cfg}")
        got = wait_lines(db, 1000, daemon=d)
        time.sleep(1)
        assert seqs(rows(db)) == list(range(1000))
    finally:
        writer.close()
        d.stop()


def test_ten_restarts_during_a_steady_writer(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    log.touch()
    cfg = write_config(tmp_path, log_files=app(logdir))
    db = str(tmp_path / "events.db")
    total = 24_000
    writer = subprocess.Popen([sys.executable, WRITER, str(log), "--lines", str(total), "--rate", "1500"])
    d = start(tmp_path, f"--config_path={cfg}")
    kills = 0
    try:
        for i in range(10):
            time.sleep(0.6)
            if i % 2:
                d.stop(signal.SIGKILL)
                kills += 1
            else:
                assert d.stop() == 0
            d = start(tmp_path, f"--config_path={cfg}")
        assert writer.wait(60) == 0
        wait_lines(db, total, daemon=d)
        time.sleep(1)
        got = rows(db)
        assert seqs(got) == list(range(total))     # each line once, in order
        assert kills == 5
    finally:
        writer.kill()
        d.stop()


# --- discovery, status and the live table ------------------------------------------

MAX_QUEUED = "/proc/sys/fs/inotify/max_queued_events"


def test_inotify_overflow_is_a_full_rescan_and_counted(tmp_path):
    """The queue limit is read when an inotify instance is made: lowered for
    vajrad's start only, then put back."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    cfg = write_config(tmp_path, log_files={"many": {"paths": [f"{logdir}/*.log"], "start_at": "beginning"}})
    db = str(tmp_path / "events.db")
    before = Path(MAX_QUEUED).read_text()
    try:
        Path(MAX_QUEUED).write_text("4")
        d = start(tmp_path, f"--config_path={cfg}", "--log_rescan_interval_ms=600000")
    finally:
        Path(MAX_QUEUED).write_text(before)
    try:
        for i in range(60):
            (logdir / f"f{i:02d}.log").write_text(f"file {i:02d}\n")
        got = wait_lines(db, 60, timeout=30, daemon=d)
        assert sorted(r[0] for r in got) == [f"file {i:02d}" for i in range(60)]
        status = d.call("status")["collectors"]["logs"]
        assert status["inotify_overflows"] >= 1
        assert status["rescans"] == 1          # only the first: the overflow's scan read them
    finally:
        d.stop()


def test_log_files_live_table_and_status(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    log.write_bytes(b"ok\nbad \xff\n" + b"L" * 300 + b"\n")
    cfg = write_config(tmp_path, log_files=app(logdir, max_line_bytes=100))
    db = str(tmp_path / "events.db")
    d = start(tmp_path, f"--config_path={cfg}")
    try:
        wait_lines(db, 3, daemon=d)
        (live,) = d.call("table/read", {"table": "log_files"})["rows"]
        st = os.stat(log)
        assert live["path"] == str(log) and live["inode"] == st.st_ino and live["state"] == "reading"
        assert live["offset"] == live["size"] == st.st_size and live["lines"] == 3
        assert live["dropped"] == 200 and live["errors"] == 1
        assert live["identity"].startswith(f"{st.st_dev}:{st.st_ino}:{st.st_size}:")
        status = d.call("status")["collectors"]["logs"]
        assert (status["cut_lines"], status["invalid_utf8_lines"], status["lines"]) == (1, 1, 3)
        assert status["watched_directories"] == 1 and status["state"] == "running"
    finally:
        d.stop()


# --- the journal ---------------------------------------------------------------------

JOURNAL_REMOTE = "/usr/lib/systemd/systemd-journal-remote"


def journal_file(path, messages, start_ns=0, unit="app.service"):
    """A journal file written by systemd-journal-remote from export format:
    journald does not run here (systemd is not PID 1), so `systemd-cat`
    has no journal to write to."""
    t = int(time.time() * 1e6)
    export = "".join(f"__REALTIME_TIMESTAMP={t + i}\n__MONOTONIC_TIMESTAMP={start_ns + i + 1}\n"
                     f"_BOOT_ID=0123456789abcdef0123456789abcdef\nMESSAGE={m}\n_SYSTEMD_UNIT={unit}\n\n"
                     for i, m in enumerate(messages))
    src = str(path) + ".export"
    Path(src).write_text(export)
    r = subprocess.run([JOURNAL_REMOTE, f"--output={path}", src], capture_output=True, text=True, timeout=30)
    os.unlink(src)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def journal_tools():
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", "python3-systemd",
                            "systemd-journal-remote"], capture_output=True,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode != 0:
            pytest.skip("python3-systemd cannot be installed")
    if not os.path.exists(JOURNAL_REMOTE):
        pytest.skip("systemd-journal-remote is not installed")


def journal_rows(db):
    return rows(db, "source = 'journal'")


def test_journal_cursor_resumes_and_a_vacuumed_cursor_is_reported(tmp_path, journal_tools):
    jdir = tmp_path / "journal"
    jdir.mkdir()
    journal_file(jdir / "one.journal", [f"one {i}" for i in range(5)])
    cfg = write_config(tmp_path, journal={"j": {
        "directory": str(jdir), "units": ["app.service"], "start_at": "beginning",
        "rules": [{"name": "n", "regex": r"one (?P<n>\d)", "severity": "notice"}]}})
    db = str(tmp_path / "events.db")
    d = start(tmp_path, f"--config_path={cfg}")
    try:
        deadline = time.monotonic() + 20
        while len(journal_rows(db)) < 5:
            assert time.monotonic() < deadline, d.log[-2000:]
            time.sleep(0.1)
        got = journal_rows(db)
        assert [r[0] for r in got] == [f"one {i}" for i in range(5)]
        assert got[3][3] == "n" and json.loads(got[3][4]) == {"n": "3"}
        assert d.stop() == 0
        # A restart resumes after the saved cursor: a new file's entries only.
        journal_file(jdir / "two.journal", [f"two {i}" for i in range(3)], start_ns=100)
        d = start(tmp_path, f"--config_path={cfg}")
        deadline = time.monotonic() + 20
        while len(journal_rows(db)) < 8:
            assert time.monotonic() < deadline, d.log[-2000:]
            time.sleep(0.1)
        time.sleep(0.5)
        assert [r[0] for r in journal_rows(db)][5:] == ["two 0", "two 1", "two 2"]
        assert d.stop() == 0
        # Vacuumed: the files holding the saved cursor are gone.
        os.unlink(jdir / "one.journal")
        os.unlink(jdir / "two.journal")
        journal_file(jdir / "three.journal", ["three 0", "three 1"], start_ns=200)
        d = start(tmp_path, f"--config_path={cfg}")
        deadline = time.monotonic() + 20
        while len(rows(db, "source = 'journal' AND action = 'line'")) < 10:
            assert time.monotonic() < deadline, d.log[-2000:]
            time.sleep(0.1)
        lost = rows(db, "action = 'cursor_lost'")
        assert len(lost) == 1
        assert [r[0] for r in journal_rows(db) if r[5] == "line"][8:] == ["three 0", "three 1"]
        assert d.call("status")["collectors"]["logs"]["journal"]["j"]["cursor_lost"] == 1
    finally:
        d.stop()


def test_journal_missing_is_reported_not_fatal(tmp_path, journal_tools):
    cfg = write_config(tmp_path, journal={"j": {"directory": str(tmp_path / "nowhere")}})
    d = start(tmp_path, f"--config_path={cfg}")
    try:
        status = d.call("status")["collectors"]["logs"]
        assert status["state"] == "running" and "unavailable" in status["journal"]["j"]
    finally:
        assert d.stop() == 0


# --- who wrote it ----------------------------------------------------------------------

def test_rows_name_the_writer_from_proc_without_bpf(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    writer = Writer(log)
    writer("lines 0 3")
    cfg = write_config(tmp_path, log_files=app(logdir))
    db = str(tmp_path / "events.db")
    d = start(tmp_path, f"--config_path={cfg}")
    try:
        wait_lines(db, 3, daemon=d)
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        found = con.execute("SELECT DISTINCT writer_pid, writer_path FROM log_events").fetchall()
        con.close()
        assert found == [(writer.proc.pid, os.path.realpath(sys.executable))]
    finally:
        writer.close()
        d.stop()


def test_rows_name_the_writer_from_bpf_file_events(tmp_path):
    from tests.harness import can_bpf
    ok, why = can_bpf()
    if not ok:
        pytest.skip(why)
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    log.write_text("")
    cfg = os.path.join(tmp_path, "vajra.conf")
    Path(cfg).write_text(json.dumps({"options": {}, "file_paths": {"logs": [f"{logdir}/%%"]},
                                     "log_files": app(logdir)}))
    db = str(tmp_path / "events.db")
    d = Daemon(str(tmp_path), "--events_max=0", "--events_expiry=0", "--enable_socket_events=false",
               f"--config_path={cfg}").start(timeout=120)
    try:
        writer = Writer(log)              # opened after vajrad: bpf_file_events sees the open
        try:
            deadline = time.monotonic() + 30
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            while not con.execute("SELECT 1 FROM bpf_file_events WHERE file_path = ? AND pid = ?",
                                  (str(log), writer.proc.pid)).fetchone():
                assert time.monotonic() < deadline, d.log[-2000:]
                time.sleep(0.1)
            time.sleep(0.3)                # observed by the logs unit once committed
            writer("lines 0 3")
            wait_lines(db, 3, daemon=d)
            found = con.execute("SELECT DISTINCT writer_pid, writer_path, writer_ancestry IS NOT NULL "
                                "FROM log_events").fetchall()
            con.close()
            assert found == [(writer.proc.pid, os.path.realpath(sys.executable), 1)]
        finally:
            writer.close()
    finally:
        d.stop()


def test_truncate_delete_recreate_new_file_and_swapped_symlink_in_vajrad(tmp_path):
    """The remaining cases with other processes doing the damage: coreutils'
    truncate, rm, ln -sfn, and a writer creating a new file under the glob."""
    logdir = tmp_path / "logs"
    real = tmp_path / "real"
    logdir.mkdir()
    real.mkdir()
    (logdir / "app.log").write_text("before start\n")
    (real / "one.txt").write_text("")
    os.symlink(real / "one.txt", logdir / "link.log")
    cfg = write_config(tmp_path, log_files={"all": {"paths": [f"{logdir}/*.log"], "start_at": "end",
                                                    "rotate_wait_ms": 300}})
    db = str(tmp_path / "events.db")
    d = start(tmp_path, f"--config_path={cfg}")
    try:
        time.sleep(0.5)
        w = Writer(logdir / "app.log")
        w("raw a1\\n")
        wait_lines(db, 1, daemon=d)
        subprocess.run(["truncate", "-s", "0", str(logdir / "app.log")], check=True)
        w("raw a2 after truncation\\n")
        wait_lines(db, 2, daemon=d)
        w.close()
        subprocess.run(["rm", str(logdir / "app.log")], check=True)
        w = Writer(logdir / "app.log")                    # re-created by a new writer
        w("raw a3 re-created\\n")
        wait_lines(db, 3, daemon=d)
        w.close()
        w = Writer(logdir / "new.log")                    # a new file under the glob, start_at end
        w("raw n1 new file\\n")
        wait_lines(db, 4, daemon=d)
        w.close()
        w = Writer(real / "one.txt")
        w("raw s1 first target\\n")
        wait_lines(db, 5, daemon=d)
        w.close()
        (real / "two.txt").write_text("s2 second target\n")
        subprocess.run(["ln", "-sfn", str(real / "two.txt"), str(logdir / "link.log")], check=True)
        got = wait_lines(db, 6, daemon=d)
        time.sleep(1)
        got = rows(db)
        assert [r[0] for r in got] == ["a1", "a2 after truncation", "a3 re-created", "n1 new file",
                                       "s1 first target", "s2 second target"]
        truncated = rows(db, "action = 'truncated'")
        assert len(truncated) == 1 and truncated[0][1] == str(logdir / "app.log"), truncated
    finally:
        d.stop()


def test_restarts_across_logrotate_during_a_steady_writer(tmp_path, logrotate):
    """Rotations while vajrad runs and while it is stopped (SIGKILLed), one
    writer throughout: every line once, in order."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = logdir / "app.log"
    log.touch()
    cfg = write_config(tmp_path, log_files=app(logdir))
    db = str(tmp_path / "events.db")
    total = 16_000
    writer = subprocess.Popen([sys.executable, WRITER, str(log), "--lines", str(total), "--rate", "1500"])
    pidfile = tmp_path / "writer.pid"
    pidfile.write_text(str(writer.pid))
    conf = rotate_conf(tmp_path, logdir, f"  create\n  postrotate\n    kill -HUP $(cat {pidfile})\n  endscript")
    state = str(tmp_path / "lr.state")
    d = start(tmp_path, f"--config_path={cfg}")
    try:
        for i in range(6):
            time.sleep(0.7)
            if i in (1, 4):
                run_logrotate(logrotate, conf, state)            # while running
            d.stop(signal.SIGKILL if i % 2 else signal.SIGTERM)
            if i in (2, 3):
                run_logrotate(logrotate, conf, state)            # while stopped
            d = start(tmp_path, f"--config_path={cfg}")
        assert writer.wait(60) == 0
        wait_lines(db, total, daemon=d)
        time.sleep(1)
        assert seqs(rows(db)) == list(range(total))
    finally:
        writer.kill()
        d.stop()

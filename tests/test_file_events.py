"""File integrity monitoring on the real kernel: real shells and coreutils
change files in watched and unwatched trees, and both bpf_file_events (who,
from the kernel) and file_events (inotify, with hashes) must say exactly what
happened."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BPF_OK, BPF_WHY, needs_bpf
from harness import Daemon, private_directory

pytestmark = needs_bpf
BASH = os.path.realpath(shutil.which("bash"))


def tool(name: str) -> str:
    return os.path.realpath(shutil.which(name))


class Fim:
    """A daemon watching W (%%, excluding W/skip), L (one level, %) and A
    (%%, reads recorded too); U is not watched."""

    def __init__(self):
        self.root = private_directory("vajra-fim-")
        self.since = int(time.time()) - 5        # the waits read the tables from here on
        self.W, self.L, self.A, self.U, self.N = (os.path.join(self.root, d) for d in "WLAUN")
        for d in (self.W, self.L, self.A, self.U, self.N, self.L + "/sub"):
            os.makedirs(d)
        self.config = Path(self.root, "vajra.conf")
        self.write_config()
        self.daemon = Daemon(self.root, f"--config_path={self.config}").start()

    def write_config(self, extra: dict | None = None) -> None:
        paths = {"watched": [self.W + "/%%"], "level": [self.L + "/%"], "secret": [self.A + "/%%"]}
        paths.update(extra or {})
        self.config.write_text(json.dumps({
            "options": {}, "file_paths": paths,
            "exclude_paths": {"watched": [self.W + "/skip/%%"]},
            "file_accesses": ["secret"]}))

    def sh(self, script: str, cwd: str | None = None) -> int:
        """Runs a bash script; returns the pid of the bash that ran it."""
        out = subprocess.run([BASH, "-c", "echo $$; " + script], cwd=cwd, check=True,
                             capture_output=True, text=True).stdout
        return int(out.split()[0])

    def rows(self, table: str, predicate, want: int = 1, timeout: float = 60, settle: float = 0.0):
        found = self.daemon.wait_events(predicate, table, timeout=timeout, want=want, since_time=self.since,
                                        settle=settle)
        return sorted(found, key=lambda e: e["eid"])

    def under(self, table: str, prefix: str, want: int = 1, timeout: float = 60, settle: float = 1.5):
        """Rows about paths under prefix; for bpf_file_events, not the test's own set-up writes."""
        if table == "file_events":
            def inside(e):
                return e["target_path"].startswith(prefix)
        else:
            def inside(e):
                return e["pid"] != os.getpid() and (e["file_path"].startswith(prefix)
                                                    or e["dest_path"].startswith(prefix))
        return self.rows(table, inside, want, timeout, settle)

    def status(self, name: str) -> dict:
        return self.daemon.call("status")["collectors"][name]

    def close(self) -> None:
        self.daemon.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def fim():
    if not BPF_OK:
        pytest.skip(BPF_WHY)
    f = Fim()
    yield f
    f.close()


def calls(rows):
    return [(r["syscall"], r["file_path"], r["dest_path"], r["exit_code"]) for r in rows]


def actions(rows):
    return [(r["action"], r["target_path"]) for r in rows]


def test_relative_write_from_a_cd_shell(fim):
    d = fim.W + "/rel"
    os.makedirs(d)
    # The new directory is watched once its CREATED row is out; a write
    # before that is seen only by the scan of what it already holds.
    assert fim.rows("file_events", lambda e: e["target_path"] == d)
    pid = fim.sh("echo hello > f", cwd=d)
    bpf = fim.under("bpf_file_events", d + "/")
    assert calls(bpf) == [("openat", d + "/f", "", "3")]
    r = bpf[0]
    assert (r["pid"], r["path"], r["flags"], r["mode"], r["category"]) == \
        (pid, BASH, "O_WRONLY|O_CREAT|O_TRUNC", "0666", "watched")
    assert r["parent"] == os.getpid() and r["uid"] == os.getuid()
    assert json.loads(r["ancestry"])[0]["pid"] == os.getpid()
    inotify = fim.under("file_events", d + "/", want=2)
    assert actions(inotify) == [("CREATED", d + "/f"), ("UPDATED", d + "/f")]
    for row in inotify:                       # who did it: the bpf row behind each change
        assert (row["pid"], row["path"], row["bpf_eid"], row["category"]) == (pid, BASH, r["eid"], "watched")
    assert inotify[1]["sha256"] == hashlib.sha256(b"hello\n").hexdigest()


def test_write_through_a_symlinked_directory(fim):
    real = fim.W + "/real"
    os.makedirs(real)
    link = os.path.join(fim.U, "link")
    os.symlink(real, link)
    # The new directory is watched once its CREATED row is out (pyinotify
    # adds the watch as it reads that event); a write before that would be
    # seen only by the scan of what the directory already holds.
    assert fim.rows("file_events", lambda e: e["target_path"] == real)
    pid = fim.sh(f"echo x > {link}/f; cd {link} && echo y > g")
    bpf = fim.under("bpf_file_events", real + "/", want=2)
    assert calls(bpf) == [("openat", real + "/f", "", "3"), ("openat", real + "/g", "", "3")]
    assert {r["pid"] for r in bpf} == {pid}
    assert [a for a, _ in actions(fim.under("file_events", real + "/", want=4))] == \
        ["CREATED", "UPDATED", "CREATED", "UPDATED"]


def test_mv_into_out_of_and_within(fim):
    d = fim.W + "/mv"
    os.makedirs(d)
    Path(fim.U, "in").write_text("in")
    Path(d, "out").write_text("out")
    Path(d, "x").write_text("x")
    time.sleep(0.5)
    fim.sh(f"mv {fim.U}/in {d}/in; mv {d}/out {fim.U}/out; mv {d}/x {d}/y")
    bpf = [r for r in fim.under("bpf_file_events", d + "/", want=3) if r["exit_code"] == "0"]
    assert [(r["syscall"], r["file_path"], r["dest_path"]) for r in bpf if r["syscall"].startswith("rename")] == [
        ("renameat2", fim.U + "/in", d + "/in"),
        ("renameat2", d + "/out", fim.U + "/out"),
        ("renameat2", d + "/x", d + "/y")]
    assert {r["path"] for r in bpf} == {tool("mv")}
    moves = [r for r in fim.under("file_events", d + "/", want=7) if r["action"].startswith("MOVED")]
    assert actions(moves) == [("MOVED_TO", d + "/in"), ("MOVED_FROM", d + "/out"),
                              ("MOVED_FROM", d + "/x"), ("MOVED_TO", d + "/y")]
    assert moves[2]["transaction_id"] == moves[3]["transaction_id"] != 0
    assert all(m["path"] == tool("mv") and m["bpf_eid"] for m in moves)


def test_chmod_chown_ln_and_ln_s(fim):
    d = fim.W + "/attrs"
    os.makedirs(d)
    Path(d, "f").write_text("f")
    time.sleep(0.3)
    fim.sh(f"cd {d} && chmod 600 f && chown 1234:5678 f && ln f hard && ln -s f soft")
    bpf = fim.under("bpf_file_events", d + "/", want=4)
    assert calls(bpf) == [("fchmodat", d + "/f", "", "0"), ("fchownat", d + "/f", "", "0"),
                          ("linkat", d + "/f", d + "/hard", "0"), ("symlinkat", d + "/soft", "f", "0")]
    assert bpf[0]["mode"] == "0600"
    assert (bpf[1]["owner_uid"], bpf[1]["owner_gid"]) == (1234, 5678)
    assert [r["path"] for r in bpf] == [tool("chmod"), tool("chown"), tool("ln"), tool("ln")]
    created = [r for r in fim.under("file_events", d + "/", want=4) if r["action"] == "CREATED"]
    assert [(r["target_path"], r["path"]) for r in created if r["target_path"] != d + "/f"] == \
        [(d + "/hard", tool("ln")), (d + "/soft", tool("ln"))]


def test_rm_r_of_a_nested_tree(fim):
    d = fim.W + "/tree"
    os.makedirs(d + "/a/b")
    for p in ("a/1", "a/b/2", "3"):
        Path(d, p).write_text(p)
    time.sleep(0.3)
    fim.sh(f"rm -r {d}")
    bpf = fim.under("bpf_file_events", d, want=6)
    assert sorted((r["file_path"], r["flags"]) for r in bpf) == sorted([
        (d + "/a/1", ""), (d + "/a/b/2", ""), (d + "/3", ""),
        (d + "/a/b", "AT_REMOVEDIR"), (d + "/a", "AT_REMOVEDIR"), (d, "AT_REMOVEDIR")])
    assert {r["syscall"] for r in bpf} == {"unlinkat"}
    deleted = fim.under("file_events", d, want=6)
    assert sorted(r["target_path"] for r in deleted if r["action"] == "DELETED") == \
        sorted([d + "/a/1", d + "/a/b/2", d + "/3", d + "/a/b", d + "/a", d])


def test_truncate_by_path_and_by_fd(fim):
    d = fim.W + "/trunc"
    os.makedirs(d)
    Path(d, "f").write_text("0123456789")
    Path(d, "g").write_text("0123456789")
    time.sleep(0.3)
    fim.sh(f"truncate -s 3 {d}/f")
    subprocess.run([sys.executable, "-c", f"import os; os.truncate({d + '/g'!r}, 2)"], check=True)
    bpf = fim.under("bpf_file_events", d + "/", want=3)
    assert ("ftruncate", d + "/f", "", "0") in calls(bpf)
    assert ("truncate", d + "/g", "", "0") in calls(bpf)
    by_truncate = [r for r in fim.under("file_events", d + "/", want=4)
                   if r["action"] == "UPDATED" and r["path"] == tool("truncate")]
    assert [(r["target_path"], r["size"]) for r in by_truncate] == [(d + "/f", 3)]
    assert by_truncate[0]["md5"] == hashlib.md5(b"012").hexdigest()


def test_new_nested_directory_with_files_created_at_once(fim):
    d = fim.W + "/fresh"
    fim.sh(f"mkdir -p {d}/a/b && echo 1 > {d}/a/b/f1 && echo 2 > {d}/a/f2 && echo 3 > {d}/f3")
    files = {d + "/a/b/f1", d + "/a/f2", d + "/f3"}
    bpf = fim.under("bpf_file_events", d, want=6)
    assert {r["file_path"] for r in bpf if r["syscall"] == "openat"} == files
    created = {r["target_path"] for r in fim.under("file_events", d, want=6) if r["action"] == "CREATED"}
    assert files | {d, d + "/a", d + "/a/b"} <= created


def test_exclude_paths(fim):
    d = fim.W + "/skip/deep"
    pid = fim.sh(f"mkdir -p {d} && echo no > {d}/f && echo yes > {fim.W}/beside-skip")
    assert fim.under("bpf_file_events", fim.W + "/beside-skip", want=1)
    assert fim.rows("bpf_file_events", lambda e: "/skip/" in e["file_path"] + "/" and e["pid"] == pid,
                    want=1, timeout=1) == []
    assert fim.under("file_events", fim.W + "/skip/", want=1, timeout=1, settle=0) == []


def test_one_level_rule(fim):
    fim.sh(f"echo a > {fim.L}/top; echo b > {fim.L}/sub/deep")
    assert calls(fim.under("bpf_file_events", fim.L + "/", want=1)) == [("openat", fim.L + "/top", "", "3")]
    assert {r["target_path"] for r in fim.under("file_events", fim.L + "/", want=2)} == {fim.L + "/top"}


def test_unwatched_activity_reaches_neither_table_nor_userspace(fim):
    before = fim.status("file")
    script = (f"import os\nfor i in range(20000):\n"
              f"    fd = os.open('{fim.U}/f%d' % (i % 50), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n"
              f"    os.write(fd, b'x'); os.close(fd)\n"
              f"    os.rename('{fim.U}/f%d' % (i % 50), '{fim.U}/g%d' % (i % 50))\n"
              f"    os.unlink('{fim.U}/g%d' % (i % 50))\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    time.sleep(1.5)
    after = fim.status("file")
    assert after["kernel_checked"] - before["kernel_checked"] >= 60000
    assert after["kernel_matched"] == before["kernel_matched"]
    assert after["records"] - before["records"] < 50        # only the other tests' stragglers
    assert fim.under("bpf_file_events", fim.U + "/f", want=1, timeout=1, settle=0) == []
    assert fim.rows("file_events", lambda e: e["target_path"].startswith(fim.U), want=1, timeout=1) == []


def test_hashes_match_hashlib(fim):
    d = fim.W + "/hash"
    os.makedirs(d)
    content = os.urandom(3 * 1024 * 1024 + 17)
    Path(d, "blob").write_bytes(content)
    rows = [r for r in fim.under("file_events", d + "/", want=2) if r["action"] == "UPDATED"]
    assert rows, "no UPDATED row"
    r = rows[-1]
    assert (r["md5"], r["sha1"], r["sha256"], r["hashed"]) == (
        hashlib.md5(content).hexdigest(), hashlib.sha1(content).hexdigest(),
        hashlib.sha256(content).hexdigest(), 1)
    assert r["size"] == len(content) and r["inode"] == os.stat(d + "/blob").st_ino


def test_relative_and_dirfd_calls(fim):
    d = fim.W + "/at"
    os.makedirs(d + "/sub")
    script = (f"import os\nd = os.open({d!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
              "fd = os.open('sub/a', os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=d); os.close(fd)\n"
              "os.rename('sub/a', 'b', src_dir_fd=d, dst_dir_fd=d)\n"
              "os.mkdir('m', 0o700, dir_fd=d)\n"
              "os.unlink('b', dir_fd=d)\n"
              "try:\n    os.open('nodir/x', os.O_WRONLY | os.O_CREAT, dir_fd=d)\nexcept OSError: pass\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd="/")
    bpf = fim.under("bpf_file_events", d + "/", want=5)
    assert calls(bpf) == [("openat", d + "/sub/a", "", "4"), ("renameat", d + "/sub/a", d + "/b", "0"),
                          ("mkdirat", d + "/m", "", "0"), ("unlinkat", d + "/b", "", "0"),
                          ("openat", d + "/nodir/x", "", "-2")]
    assert bpf[0]["mode"] == "0640" and bpf[2]["mode"] == "0700"


def test_file_accesses_record_reads(fim):
    Path(fim.A, "key").write_text("secret")
    Path(fim.W, "plain").write_text("plain")
    time.sleep(0.5)
    pid = fim.sh(f"exec cat {fim.A}/key {fim.W}/plain > /dev/null")
    reads = fim.rows("bpf_file_events", lambda e: e["pid"] == pid, want=1, settle=1.5)
    assert [(r["file_path"], r["flags"].split("|")[0], r["category"]) for r in reads] == \
        [(fim.A + "/key", "O_RDONLY", "secret")]
    seen = fim.rows("file_events", lambda e: e["pid"] == pid, want=2, settle=1.5)
    assert {(r["action"], r["target_path"]) for r in seen} == {("OPENED", fim.A + "/key"),
                                                                ("ACCESSED", fim.A + "/key")}


def test_sighup_adds_a_path_without_a_restart(fim):
    n = fim.N
    fim.sh(f"echo before > {n}/f")
    assert fim.under("bpf_file_events", n + "/", want=1, timeout=1.5, settle=0) == []
    pid = fim.daemon.proc.pid
    fim.write_config({"added": [n + "/%%"]})
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in fim.daemon.log and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        fim.sh(f"echo after > {n}/g")
        bpf = fim.under("bpf_file_events", n + "/", want=1)
        assert [(r["file_path"], r["category"]) for r in bpf] == [(n + "/g", "added")]
        inotify = fim.under("file_events", n + "/", want=2)
        assert {r["target_path"] for r in inotify} == {n + "/g"}
        assert fim.daemon.proc.pid == pid and fim.daemon.proc.poll() is None
    finally:
        fim.write_config()
        os.kill(pid, signal.SIGHUP)


def test_status_counts_what_reached_userspace(fim):
    s = fim.status("file")
    assert s["kernel_checked"] > s["kernel_matched"] > 0
    assert s["records"] >= s["kernel_matched"] - s["kernel_lost"]
    w = fim.status("fim")
    assert w["watch_failures"] == 0 and not w["watch_limit_reached"] and w["queue_overflows"] == 0


@pytest.mark.parametrize("pattern, needle", [
    ("relative/%%", "must be an absolute path"),
    ("/etc/%%/x", "only allowed as the last path component"),
])
def test_invalid_patterns_name_the_pattern(daemon_factory, workdir, pattern, needle):
    cfg = Path(workdir, "bad.conf")
    cfg.write_text(json.dumps({"file_paths": {"cat": ["/tmp/ok/%%", pattern]}}))
    d = daemon_factory(f"--config_path={cfg}", start=False)
    d.start(wait_ready=False)
    assert d.proc.wait(30) == 2
    assert "file_paths.cat[1]" in d.log and needle in d.log and pattern in d.log


def test_file_accesses_must_name_a_category(daemon_factory, workdir):
    cfg = Path(workdir, "bad.conf")
    cfg.write_text(json.dumps({"file_paths": {"cat": ["/tmp/%%"]}, "file_accesses": ["nope"]}))
    d = daemon_factory(f"--config_path={cfg}", start=False)
    d.start(wait_ready=False)
    assert d.proc.wait(30) == 2 and "file_accesses[0]" in d.log and "'nope'" in d.log


def test_running_out_of_inotify_watches_is_reported(daemon_factory, workdir):
    """The limit is lowered in a user namespace of the daemon's own
    (user.max_inotify_watches counts per namespace, and the tighter of it and
    every parent's applies), never the host's fs.inotify.max_user_watches."""
    tree = Path(workdir, "many")
    for i in range(40):
        (tree / f"d{i}").mkdir(parents=True)
    cfg = Path(workdir, "fim.conf")
    cfg.write_text(json.dumps({"file_paths": {"many": [str(tree) + "/%%"]}}))
    host_limit = Path("/proc/sys/fs/inotify/max_user_watches").read_text()
    d = daemon_factory(f"--config_path={cfg}", "--enable_bpf_events=false", start=False,
                       prefix=[sys.executable, str(Path(__file__).parent / "userns_exec.py"), "10"])
    d.start(wait_ready=False)
    deadline = time.monotonic() + 30
    while os.readlink(f"/proc/{d.proc.pid}/ns/user") == os.readlink("/proc/self/ns/user"):
        assert time.monotonic() < deadline and d.proc.poll() is None, d.log
        time.sleep(0.01)
    for kind in ("uid_map", "gid_map"):
        Path(f"/proc/{d.proc.pid}/{kind}").write_text("0 0 65536\n")
    d.notify.wait_for("READY=1", 30, d.proc)
    status = d.call("status")["collectors"]["fim"]
    assert status["watch_limit_reached"] is True and status["watch_failures"] > 0
    assert status["watches"] <= 10
    assert "inotify watch limit reached" in d.log
    assert Path("/proc/sys/fs/inotify/max_user_watches").read_text() == host_limit


def test_perf_buffer_output_carries_file_events(daemon_factory, workdir):
    """The kernels before 5.8 path: the same rows through a perf buffer."""
    watched = Path(workdir, "w")
    watched.mkdir()
    cfg = Path(workdir, "fim.conf")
    cfg.write_text(json.dumps({"file_paths": {"w": [str(watched) + "/%%"]}}))
    d = daemon_factory(f"--config_path={cfg}", "--bpf_output=perf")
    out = subprocess.run([BASH, "-c", f"echo $$; echo x > {watched}/f"], check=True,
                         capture_output=True, text=True).stdout
    rows = d.wait_events(lambda e: e["file_path"] == f"{watched}/f", "bpf_file_events")
    assert [(r["syscall"], r["pid"], r["category"]) for r in rows] == [("openat", int(out), "w")]
    assert d.call("status")["collectors"]["file"]["output"] == "perf"


def test_first_file_paths_on_sighup_start_the_bpf_side(daemon_factory, workdir):
    """Without file_paths there is no file program to compile or hook; the
    reload that brings the first pattern starts it."""
    watched = Path(workdir, "w")
    watched.mkdir()
    cfg = Path(workdir, "fim.conf")
    cfg.write_text('{"options": {}}')
    d = daemon_factory(f"--config_path={cfg}")
    assert "file" not in d.call("status")["collectors"]
    cfg.write_text(json.dumps({"file_paths": {"w": [str(watched) + "/%%"]}}))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while d.call("status")["collectors"].get("file", {}).get("state") != "running":
        assert time.monotonic() < deadline, d.log
        time.sleep(0.2)
    out = subprocess.run([BASH, "-c", f"echo $$; echo x > {watched}/f"], check=True,
                         capture_output=True, text=True).stdout
    rows = d.wait_events(lambda e: e["file_path"] == f"{watched}/f", "bpf_file_events")
    assert [(r["syscall"], r["pid"]) for r in rows] == [("openat", int(out))]
    seen = d.wait_events(lambda e: e["target_path"] == f"{watched}/f" and e["action"] == "UPDATED",
                         "file_events")
    assert seen and seen[0]["pid"] == int(out) and seen[0]["bpf_eid"] == rows[0]["eid"]


def test_reload_to_a_narrower_tree_keeps_watching_it(daemon_factory, workdir):
    """From W/%% to W/sub/%%: the watches of W's tree go, but not the ones
    under W/sub that the new rule still needs."""
    w = Path(workdir, "w")
    (w / "sub" / "deep").mkdir(parents=True)
    cfg = Path(workdir, "fim.conf")
    cfg.write_text(json.dumps({"file_paths": {"all": [str(w) + "/%%"]}}))
    d = daemon_factory(f"--config_path={cfg}", "--enable_bpf_events=false")
    cfg.write_text(json.dumps({"file_paths": {"sub": [str(w / "sub") + "/%%"]}}))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.log.count("inotify:") < 2:
        assert time.monotonic() < deadline, d.log
        time.sleep(0.1)
    (w / "outside").write_text("no")
    (w / "sub" / "deep" / "inside").write_text("yes")
    rows = d.wait_events(lambda e: e["target_path"].startswith(str(w)), "file_events")
    time.sleep(1)
    rows = d.wait_events(lambda e: e["target_path"].startswith(str(w)), "file_events")
    assert {(r["target_path"], r["category"]) for r in rows} == {(str(w / "sub" / "deep" / "inside"), "sub")}
    assert d.call("status")["collectors"]["fim"]["watches"] == 2      # sub and sub/deep


def test_files_larger_than_read_max_are_not_hashed(daemon_factory, workdir):
    """read_max bounds what file_events hashes: a bigger file gets hashed = 0
    and no hashes; one within it is hashed (issue 21: read_max was untested)."""
    watched = Path(workdir, "rm")
    watched.mkdir()
    cfg = Path(workdir, "rm.conf")
    cfg.write_text(json.dumps({"options": {"read_max": 1000}, "file_paths": {"rm": [f"{watched}/%%"]}}))
    d = daemon_factory(f"--config_path={cfg}", "--enable_bpf_events=false")
    (watched / "big").write_bytes(b"x" * 1001)
    (watched / "small").write_bytes(b"y" * 1000)
    deadline = time.monotonic() + 30
    with d.client() as c:
        while time.monotonic() < deadline:
            updated = {Path(e["target_path"]).name: e for e in c.iter_events({"start_time": 0}, "file_events")
                       if e["action"] == "UPDATED"}
            if {"big", "small"} <= set(updated):
                break
            time.sleep(0.1)
    assert {"big", "small"} <= set(updated), updated
    big, small = updated["big"], updated["small"]
    assert (big["hashed"], big["md5"], big["sha256"], big["size"]) == (0, "", "", 1001)
    assert (small["hashed"], small["sha256"], small["size"]) == (1, hashlib.sha256(b"y" * 1000).hexdigest(), 1000)

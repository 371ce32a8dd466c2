"""Process auditing on the real kernel: fork, exec, exit, failed execs,
credentials, threads, orphans, pid reuse, and ancestry that is complete even
when every parent has exited before the query."""
import errno
import grp
import json
import os
import shutil
import tempfile
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from conftest import needs_bpf
from harness import unique_program

pytestmark = needs_bpf


def proc_chain_len(pid: int) -> int:
    """How many ancestors /proc shows for pid, up to and including pid 1."""
    n = 0
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        n += 1
    return n


# Rows of this module's tests are younger than this: the waits read the table from here on.
SINCE = int(time.time()) - 5


def rows_of(d, pred, want=1, timeout=60):
    """The matching rows once there are `want` of them (or what there is at
    the timeout, for the assertion to show)."""
    rows = d.wait_events(pred, want=want, timeout=timeout, since_time=SINCE)
    if len(rows) < want:        # shown with the failure: lost, or never seen?
        status = d.call("status")
        print("rows_of: timed out; events:", status["events"], "process:", status["collectors"].get("process"),
              "store:", status.get("store"))
    return rows


def execs_of(d, prog, want=1):
    return rows_of(d, lambda e: e["path"] == prog and e["syscall"] == "exec", want)


def test_chain_ancestry_survives_its_parents(bpf_daemon, workdir):
    prog = unique_program(workdir, f"vajra-chain-{uuid.uuid4().hex[:8]}")
    # "; true" keeps each shell from exec'ing its last command in place
    subprocess.run(["bash", "-c", f"sh -c \"sh -c '{prog}'; true\"; true"], check=True)
    # run() returned: every parent has exited now
    [e] = execs_of(bpf_daemon, prog)
    anc = json.loads(e["ancestry"])
    assert [a["exe_name"] for a in anc[:4]] == ["dash", "dash", "bash",
                                               os.path.basename(os.path.realpath(sys.executable))]
    assert anc[3]["pid"] == os.getpid()
    assert len(anc) == 3 + 1 + proc_chain_len(os.getpid())
    for child, parent in zip(anc, anc[1:]):
        assert child["ppid"] == parent["pid"] and child["pproc_time_hr"] == parent["proc_time_hr"]
    assert anc[-1]["pid"] == 1
    assert anc[0]["cmdline"] == f"sh -c {prog}" and anc[0]["path"] == "/usr/bin/dash"
    assert abs(anc[0]["proc_time"] - time.time()) < 30
    assert anc[0]["proc_time_hr"] // 1_000_000_000 == anc[0]["proc_time"]
    # the shells' own fork and exit rows are there too
    kinds = {r["syscall"] for r in rows_of(bpf_daemon, lambda r: r["pid"] == anc[0]["pid"], 3)}
    assert {"exec", "exit"} <= kinds and kinds & {"fork", "vfork", "clone"}


def test_a_thousand_chains_are_all_complete(bpf_daemon, workdir):
    prog = unique_program(workdir, f"vajra-k-{uuid.uuid4().hex[:8]}")
    script = os.path.join(workdir, "chains.sh")
    with open(script, "w") as f:
        f.write(f"for i in $(seq 1000); do bash -c \"sh -c 'sh -c \\\"{prog} $i\\\"; true'; true\"; done\n")
    driver = subprocess.Popen(["bash", script])
    driver.wait()
    rows = rows_of(bpf_daemon, lambda e: e["path"] == prog and e["syscall"] == "exec", want=1000, timeout=300)
    assert len(rows) == 1000
    base = 1 + 1 + proc_chain_len(os.getpid())          # driver bash, then us and ours
    complete = 0
    for r in rows:
        anc = json.loads(r["ancestry"])
        names = [a["exe_name"] for a in anc[:4]]
        linked = all(c["ppid"] == p["pid"] for c, p in zip(anc, anc[1:]))
        if names == ["dash", "dash", "bash", "bash"] and len(anc) == 3 + base and linked \
                and anc[3]["pid"] == driver.pid:
            complete += 1
    assert complete == 1000


def test_quotes_newlines_non_utf8_and_200_arguments(bpf_daemon, workdir):
    prog = unique_program(workdir, f"vajra-argv-{uuid.uuid4().hex[:8]}")
    args = ['say "hi"', "it's", "two\nlines", "back\\slash", "tab\there"] + [f"a{i}" for i in range(195)]
    parent = ["sh", "-c", f'"{prog}" "$@"; true', 'parent "quoted"\nnewline', *args]
    subprocess.run(parent, check=True)
    subprocess.run([prog.encode(), b"\xff\xfe-not-utf8"], check=True)
    rows = execs_of(bpf_daemon, prog, want=2)
    by_len = sorted(rows, key=lambda r: len(r["json_cmdline"]))
    assert json.loads(by_len[1]["json_cmdline"]) == [prog, *args]
    assert len(json.loads(by_len[1]["json_cmdline"])) == 201
    anc = json.loads(by_len[1]["ancestry"])       # valid JSON with the parent's awkward argv
    assert anc[0]["cmdline"] == " ".join(["sh", "-c", f'"{prog}" "$@"; true', 'parent "quoted"\nnewline', *args])
    odd = json.loads(by_len[0]["json_cmdline"])
    assert odd == [prog, "\\xff\\xfe-not-utf8"]


def test_setuid_exec_has_euid_apart_from_uid(bpf_daemon):
    # The setuid-root copy lives in a directory only root and group nogroup
    # (which the test's unprivileged user runs with) may enter, and goes at once.
    private = tempfile.mkdtemp(prefix="vajra-suid-")
    try:
        os.chown(private, 0, grp.getgrnam("nogroup").gr_gid)
        os.chmod(private, 0o710)
        prog = unique_program(private, f"vajra-suid-{uuid.uuid4().hex[:8]}")
        os.chmod(prog, 0o4755)                          # setuid root
        subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", prog], check=True)
    finally:
        shutil.rmtree(private)
    [e] = execs_of(bpf_daemon, prog)
    assert e["uid"] == 65534 and e["euid"] == 0 and e["gid"] == 65534


AUID = 4242


def test_credentials_session_and_audit_ids(bpf_daemon, workdir):
    """The child sets its own loginuid (as pam_loginuid does at login) before
    it execs, so auid is a value the kernel could not have made up."""
    with open("/proc/self/loginuid") as f:
        if int(f.read()) != 4294967295:
            pytest.skip("this process already has a loginuid: a child may not set another "
                        "where loginuid is immutable")
    prog = unique_program(workdir, f"vajra-cred-{uuid.uuid4().hex[:8]}")
    p = subprocess.Popen(["setsid", "sh", "-c", f"echo {AUID} > /proc/self/loginuid && exec {prog}"])
    assert p.wait() == 0
    [e] = execs_of(bpf_daemon, prog)
    assert e["sid"] == e["pid"] == p.pid            # setsid made it a session leader
    assert e["auid"] == AUID


def failed_exec(path, argv_expr=None):
    """execv(path) in a child process; argv_expr is built there (it may be huge)."""
    code = (f"import os, sys\ntry:\n    os.execv({path!r}, {argv_expr or repr([path])})\n"
            f"except OSError as e:\n    sys.exit(e.errno)")
    return subprocess.run([sys.executable, "-c", code]).returncode


def test_every_failed_exec_is_recorded(bpf_daemon, workdir):
    tag = uuid.uuid4().hex[:8]
    not_exec = os.path.join(workdir, f"noexec-{tag}")
    open(not_exec, "w").write("x")
    garbage = os.path.join(workdir, f"garbage-{tag}")
    open(garbage, "wb").write(b"\x00\x01\x02 not an executable format")
    os.chmod(garbage, 0o755)
    loop = os.path.join(workdir, f"loop-{tag}")
    os.symlink(loop, loop)
    busy = unique_program(workdir, f"busy-{tag}")
    writer = open(busy, "ab")                        # open for writing: ETXTBSY
    cases = {
        os.path.join(workdir, f"missing-{tag}"): errno.ENOENT,
        not_exec: errno.EACCES,
        workdir: errno.EACCES,                       # a directory
        garbage: errno.ENOEXEC,
        f"/etc/passwd/sub-{tag}": errno.ENOTDIR,
        loop: errno.ELOOP,
        busy: errno.ETXTBSY,
    }
    try:
        for path, err in cases.items():
            assert failed_exec(path) == err, path
    finally:
        writer.close()
    huge = "['x' * 100_000] * 40"                    # 4 MB of argv
    assert failed_exec("/bin/true", f"['/bin/true', 'e2big-{tag}'] + {huge}") == errno.E2BIG
    for path, err in cases.items():
        rows = rows_of(bpf_daemon, lambda e, p=path: e["path"] == p and e["exit_code"] != "0")
        assert [r["exit_code"] for r in rows] == [str(-err)], path
        assert rows[0]["syscall"] == "exec" and json.loads(rows[0]["json_cmdline"]) == [path]
    bigs = rows_of(bpf_daemon, lambda e: e["exit_code"] == str(-errno.E2BIG) and f"e2big-{tag}" in e["cmdline"])
    # On failure, say whether the daemon lost events or never saw this one.
    assert len(bigs) == 1, (bigs, bpf_daemon.call("status")["events"])
    [big] = bigs
    assert big["path"] == "/bin/true" and big["probe_error"] & 1     # argv cut, and flagged
    relative = subprocess.run([sys.executable, "-c", "import os\ntry: os.execv('./nope-%s', ['x'])\n"
                               "except OSError: pass" % tag], cwd=workdir)
    assert relative.returncode == 0
    [rel] = rows_of(bpf_daemon, lambda e: e["path"] == os.path.join(workdir, f"nope-{tag}"))
    assert rel["exit_code"] == str(-errno.ENOENT) and rel["cwd"] == workdir


def test_exec_from_a_non_leader_thread(bpf_daemon, workdir):
    prog = unique_program(workdir, f"vajra-thr-{uuid.uuid4().hex[:8]}")
    code = textwrap.dedent(f"""
        import os, threading, time
        t = threading.Thread(target=lambda: os.execv({prog!r}, [{prog!r}, "from-thread"]))
        t.start()
        time.sleep(10)
    """)
    p = subprocess.Popen([sys.executable, "-c", code])
    assert p.wait(20) == 0
    [e] = execs_of(bpf_daemon, prog)
    assert e["pid"] == p.pid and e["tid"] == p.pid      # the thread took over the leader's pid
    assert json.loads(e["json_cmdline"]) == [prog, "from-thread"]
    assert json.loads(e["ancestry"])[0]["pid"] == os.getpid()
    exits = rows_of(bpf_daemon, lambda r: r["pid"] == p.pid and r["syscall"] == "exit")
    assert [(x["exit_code"], x["path"]) for x in exits] == [("0", prog)]


def test_leader_exits_before_its_threads(bpf_daemon, workdir):
    """The exit row's duration is the process's lifetime: the leader lives
    0.6 s, then starts the worker and exits; the worker, the last thread,
    lives about 0.1 s. A thread's lifetime would be either far shorter."""
    code = textwrap.dedent("""
        import ctypes, os, threading, time
        libc = ctypes.CDLL(None, use_errno=True)
        def worker():
            time.sleep(0.1)
            os._exit(7)                  # the last thread takes the process down
        time.sleep(0.6)
        threading.Thread(target=worker).start()
        libc.syscall(60, 0)              # SYS_exit: only the leader thread exits
    """)
    before = time.monotonic_ns()
    p = subprocess.Popen([sys.executable, "-c", code])
    assert p.wait(20) == 7
    lifetime_bound = time.monotonic_ns() - before
    exits = rows_of(bpf_daemon, lambda r: r["pid"] == p.pid and r["syscall"] == "exit")
    assert len(exits) == 1
    assert exits[0]["exit_code"] == "7" and exits[0]["tid"] != p.pid
    assert 650_000_000 <= exits[0]["duration"] <= lifetime_bound      # lifetime in ns


def test_killed_process_exit_code_is_the_signal(bpf_daemon, workdir):
    # Rows from this test only: another test of the module steers pids
    # (ns_last_pid), so the same pid may have lived and died before.
    before = time.monotonic_ns()

    def ours(r):
        return r["pid"] == p.pid and int(r["ntime"]) >= before
    p = subprocess.Popen(["sleep", "30"])
    rows_of(bpf_daemon, lambda r: ours(r) and r["syscall"] == "exec")    # it is sleep now
    p.kill()
    p.wait()
    [x] = rows_of(bpf_daemon, lambda r: ours(r) and r["syscall"] == "exit")
    assert x["exit_code"] == "-9" and x["path"] == "/usr/bin/sleep"


def test_orphan_keeps_its_original_parent_in_ancestry(bpf_daemon, workdir):
    prog = unique_program(workdir, f"vajra-orphan-{uuid.uuid4().hex[:8]}")
    code = textwrap.dedent(f"""
        import ctypes, os, subprocess, time
        ctypes.CDLL(None).prctl(36, 1)               # PR_SET_CHILD_SUBREAPER
        # the middle shell backgrounds the grandchild and exits at once
        subprocess.run(["sh", "-c", "(sleep 0.5; exec {prog} orphan) & exit 0"])
        time.sleep(2)
        os.waitpid(-1, 0)
    """)
    p = subprocess.Popen([sys.executable, "-c", code])
    assert p.wait(20) == 0
    [e] = execs_of(bpf_daemon, prog)
    assert e["parent"] == p.pid                      # reparented to the subreaper
    anc = json.loads(e["ancestry"])
    assert anc[0]["exe_name"] == "dash" and anc[0]["pid"] != p.pid    # born to the subshell
    assert [a["pid"] for a in anc].index(p.pid) >= 1


def test_reused_pid_does_not_inherit_a_strangers_ancestry(bpf_daemon, workdir):
    """The kernel hands out pid X again (forced through ns_last_pid, the
    interface CRIU uses); the new X must get its own parents, not those of
    the exited X still in the cache.

    This writes the host's ns_last_pid, and cannot be moved into a PID
    namespace of its own: the probes and the process cache key on the
    global pid (the one in the initial namespace), and a child namespace's
    ns_last_pid steers only the number inside it, never the global one. So
    the test puts ns_last_pid back where it found it (pids are then handed
    out on from there, as if the test had not rewound them)."""
    prog = unique_program(workdir, f"vajra-reuse-{uuid.uuid4().hex[:8]}")
    first = subprocess.Popen(["sh", "-c", f"{prog} first; true"])
    first.wait()
    [old] = execs_of(bpf_daemon, prog)
    reused = old["pid"]                   # X: prog, child of the first sh
    assert json.loads(old["ancestry"])[0]["pid"] == first.pid
    last_pid = "/proc/sys/kernel/ns_last_pid"
    with open(last_pid) as f:
        found = int(f.read())
    try:
        for _ in range(50):               # another fork may take X first; try again
            with open(last_pid, "w") as f:
                f.write(str(reused - 1))
            again = subprocess.Popen(["sh", "-c", f"{prog} second; true"])
            again.wait()
            if again.pid == reused:
                break
        else:
            pytest.fail(f"could not get pid {reused} again")
    finally:
        with open(last_pid) as f:
            now = int(f.read())
        with open(last_pid, "w") as f:
            f.write(str(max(found, now)))
    # (subprocess's PATH search makes failed execs of "sh" first: those are rows too)
    [new_sh] = rows_of(bpf_daemon, lambda r: r["pid"] == reused and r["syscall"] == "exec"
                       and r["exit_code"] == "0" and r["cmdline"] == f"sh -c {prog} second; true")
    anc = json.loads(new_sh["ancestry"])
    assert anc[0]["pid"] == os.getpid()                   # its own parent: us
    assert all(a["pid"] != first.pid for a in anc)        # nothing of the old X's line
    [probe] = rows_of(bpf_daemon, lambda r: r["cmdline"] == f"{prog} second" and r["syscall"] == "exec"
                      and r["exit_code"] == "0")
    anc = json.loads(probe["ancestry"])
    assert (anc[0]["pid"], anc[0]["exe_name"], anc[1]["pid"]) == (reused, "dash", os.getpid())
    assert anc[0]["cmdline"] == f"sh -c {prog} second; true"


def test_cache_stats_table(bpf_daemon):
    [row] = bpf_daemon.call("table/read", {"table": "process_ancestry_cache_stats"})["rows"]
    assert row["max_size"] == 1000 and row["cache_hits"] > 0 and 0 < row["exited_entries"] <= 1000
    assert row["cache_size"] == row["live_entries"] + row["exited_entries"] and row["live_entries"] > 0
    assert set(row) == {"cache_hits", "cache_misses", "cache_size", "live_entries", "exited_entries", "evictions",
                        "expired_entries", "vanished_entries", "held_images", "max_size"}


def test_ancestry_disabled_gives_empty_arrays(daemon_factory, workdir):
    d = daemon_factory("--process_ancestry_cache_size=0")
    prog = unique_program(workdir, f"vajra-noanc-{uuid.uuid4().hex[:8]}")
    subprocess.run([prog], check=True)
    [e] = execs_of(d, prog)
    assert e["ancestry"] == "[]"


# The queries of the process-ancestry osquery README
# (../shared/reference/osquery-ancestry-README.txt), verbatim.
ANCESTRY_README_QUERIES = [
    """SELECT pid, parent, ancestry, cmdline 
FROM process_events 
WHERE ancestry != '[]' 
ORDER BY time DESC 
LIMIT 5;""",
    """SELECT 
  pid,
  JSON_EXTRACT(ancestry, '$[0].exe_name') as immediate_parent,
  JSON_EXTRACT(ancestry, '$[0].proc_time') as parent_start_time,
  JSON_ARRAY_LENGTH(ancestry) as ancestry_depth,
  cmdline
FROM process_events 
WHERE ancestry != '[]' 
LIMIT 3;""",
    """SELECT pid, parent, cmdline, JSON_ARRAY_LENGTH(ancestry) as depth
FROM process_events 
WHERE JSON_ARRAY_LENGTH(ancestry) > 3
ORDER BY depth DESC;""",
    """SELECT pid, parent, ancestry, cmdline
FROM process_events 
WHERE JSON_EXTRACT(ancestry, '$[0].exe_name') LIKE '%sh%'
   OR JSON_EXTRACT(ancestry, '$[1].exe_name') LIKE '%sh%';""",
    "SELECT cache_hits, cache_misses FROM process_ancestry_cache_stats;",
    """SELECT pe.pid, pe.parent, pe.path, pe.cmdline, pe.ancestry, pe.time
FROM process_events pe
WHERE pe.ancestry != '[]';""",
    """SELECT pid, path, cmdline, ancestry
FROM process_events
WHERE path LIKE '%/tmp/%' AND ancestry != '[]';""",
]


def test_ancestry_readme_queries_run_verbatim(bpf_daemon, workdir):
    prog = unique_program(workdir, f"vajra-readme-{uuid.uuid4().hex[:8]}")
    subprocess.run(["bash", "-c", f"sh -c '{prog}; true'; true"], check=True)
    execs_of(bpf_daemon, prog)
    results = []
    for sql in ANCESTRY_README_QUERIES:
        r = subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "--socket", bpf_daemon.socket,
                            "query", "--json", sql], capture_output=True, text=True)
        assert r.returncode == 0, (sql, r.stderr)
        results.append([json.loads(line) for line in r.stdout.splitlines()])
    assert results[1] and all(row["immediate_parent"] and row["ancestry_depth"] >= 1 for row in results[1])
    assert any(row["depth"] > 3 for row in results[2])
    assert any(json.loads(row["ancestry"])[0]["exe_name"] == "dash" and row["cmdline"] == prog
               for row in results[3])
    [stats] = results[4]
    assert stats["cache_hits"] > 0
    assert any(row["path"] == prog for row in results[6])


def test_vajractl_tree_by_pid_and_eid(bpf_daemon, workdir):
    prog = unique_program(workdir, f"vajra-tree-{uuid.uuid4().hex[:8]}")
    # A newline in an ancestor's command line (as CI's own `bash -c` script
    # has) must not split that ancestor over two lines of the tree.
    sleeper = subprocess.Popen(["bash", "-c", "sh -c 'sleep 30; true'\n\x1b[31mtrue"])
    try:
        [sleep_exec] = rows_of(bpf_daemon, lambda r: r["syscall"] == "exec" and r["cmdline"] == "sleep 30"
                               and json.loads(r["ancestry"])[1:2] and json.loads(r["ancestry"])[1]["pid"]
                               == sleeper.pid)
        sleep_pid = sleep_exec["pid"]
        ctl = [sys.executable, "-m", "vajrad.client.ctl", "--socket", bpf_daemon.socket, "tree"]
        out = subprocess.run(ctl + [str(sleep_pid)], capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        assert lines[-1].lstrip("└─ ").startswith(f"sleep [{sleep_pid}]")
        assert "dash [" in lines[-2] and f"bash [{sleeper.pid}]" in lines[-3]
        assert lines[-3].endswith("true'\\n\\x1b[31mtrue")
        assert lines[0].split()[1] == "[1]"                   # the root of the tree: pid 1
        assert all("started 20" in line for line in lines)
        indents = [len(line) - len(line.lstrip(" └─")) for line in lines]
        assert indents == sorted(indents) and len(set(indents)) == len(lines)
    finally:
        sleeper.kill()
    subprocess.run(["sh", "-c", f"{prog}; true"], check=True)
    [e] = execs_of(bpf_daemon, prog)
    out = subprocess.run(ctl + ["--eid", str(e["eid"])], capture_output=True, text=True, check=True).stdout
    assert "exec at" in out.splitlines()[-1] and f"(eid {e['eid']})" in out
    assert "dash [" in out.splitlines()[-2]
    bad = subprocess.run(ctl + ["999999"], capture_output=True, text=True)
    assert bad.returncode == 1 and "no running process 999999" in bad.stderr
    bad = subprocess.run(ctl, capture_output=True, text=True)
    assert bad.returncode == 2 and "PID or --eid" in bad.stderr


def test_tty_is_the_controlling_terminal(bpf_daemon, workdir):
    """An exec on a pseudo-terminal names it exactly (pts/N); one without a
    controlling terminal has tty '' (issue 21: tty was untested)."""
    import pty
    prog = unique_program(workdir, f"vajra-tty-{uuid.uuid4().hex[:8]}")
    named = os.path.join(workdir, "tty-name")
    pid, fd = pty.fork()                 # child: a new session whose controlling terminal is the pty
    if pid == 0:
        try:
            with open(named, "w") as f:
                f.write(os.ttyname(0))
            os.execv(prog, [prog])
        finally:
            os._exit(127)
    try:
        os.waitpid(pid, 0)
    finally:
        os.close(fd)
    subprocess.run([prog], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, start_new_session=True)
    with open(named) as f:
        expected = f.read().removeprefix("/dev/")
    rows = execs_of(bpf_daemon, prog, want=2)
    on_pty = [r["tty"] for r in rows if r["pid"] == pid]
    detached = [r["tty"] for r in rows if r["pid"] != pid]
    assert expected.startswith("pts/") and on_pty == [expected] and detached == [""], rows

"""Captures the golden records of tests/data/decoder_records.json from the real kernel.

Run as root on a host that loads BPF (from the checkout's root):

    sudo /work/main/.venv/bin/python tests/data/capture_records.py

It loads process.bpf.c, socket.bpf.c and file.bpf.c as the collectors build
them (their own constructors, so the same -D settings), does a known set of
things in child processes (fork, exec, a failed exec, exits, socket calls, file
changes), and keeps each record those children caused as the ring buffer
handed it over. What each row must then say comes from this side: the pids
and fds we got back, getsockname(), our cwd and argv, /proc/self/loginuid,
the pty we opened. Only what the kernel alone knows (ktime, durations) is read
from the record, through the ctypes mirror in vajrad/kernel/abi.py, and only
after checking it against bounds measured here.

Rerun it whenever bpf/vajra.h and vajrad/kernel/abi.py change the record
layout: tests/test_decoders.py refuses goldens whose record sizes no longer
match the ABI and says so.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import pty
import shutil
import signal
import socket
import sys
import tempfile
import termios
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from vajrad.kernel import abi  # noqa: E402
from vajrad.enrich.containers import CONTAINER_FIELDS  # noqa: E402
from vajrad.kernel.environment import ensure_tracefs, probe  # noqa: E402
from vajrad.collectors.process.bpf_process_events import ProcessCollector  # noqa: E402
from vajrad.collectors.socket.bpf_socket_events import SocketCollector  # noqa: E402
from vajrad.collectors.fim.bpf_file_events import FileCollector  # noqa: E402
from vajrad.collectors.fim import rules as fim  # noqa: E402
from vajrad.collectors.bpf import MonotonicClock  # noqa: E402

OUT = os.path.join(ROOT, "tests", "data", "decoder_records.json")
libc = ctypes.CDLL(None, use_errno=True)
# x86-64 syscall numbers: the file calls are made as raw syscalls, so that the
# row's syscall name is known here (glibc picks its own, e.g. openat for open()).
SYS_OPENAT, SYS_RENAMEAT2 = 257, 316
AT_FDCWD = -100
RENAME_NOREPLACE = 1


def ids() -> dict:
    with open("/proc/self/loginuid") as f:
        auid = int(f.read())
    return {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(), "egid": os.getegid(),
            "auid": auid, "sid": os.getsid(0)}


def cgroup_id() -> int:
    """bpf_get_current_cgroup_id(): the inode of our cgroup v2 directory."""
    with open("/proc/self/cgroup") as f:
        path = [line.split("::", 1)[1].strip() for line in f if line.startswith("0::")][0]
    return os.stat("/sys/fs/cgroup" + path).st_ino


def child(fn) -> int:
    """Runs fn in a forked child (os.fork: glibc's fork is the clone syscall)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            code = fn() or 0
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        os._exit(code)
    return pid


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: loading BPF programs needs it")
    ensure_tracefs()
    work = tempfile.mkdtemp(prefix="vajra-capture-")
    try:
        capture(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def capture(work: str) -> None:
    watched = os.path.join(work, "watched")
    os.mkdir(watched)
    fim_doc = {"file_paths": {"captured": [watched + "/%%"]}}
    kenv = probe(work)
    collectors = {"process": ProcessCollector(kenv), "socket": SocketCollector(kenv),
                  "file": FileCollector(kenv, rules=fim.parse(fim_doc, "capture"))}
    seen: list[tuple[str, bytes]] = []
    hdr_size = ctypes.sizeof(abi.ProcHeader)
    me = os.getpid()

    def keeper(kind):
        def keep(buf, off, size):
            record = bytes(buf[off:off + size])
            hdr = abi.ProcHeader.from_buffer_copy(record[:hdr_size])
            if hdr.ppid == me or hdr.pid == me:     # our children's records, and our own
                seen.append((kind, record))
        return keep

    for kind, c in collectors.items():
        c.program.load()
    collectors["file"].apply(collectors["file"].rules)
    for kind, c in collectors.items():
        c.program.open_events(keeper(kind))
    clock = MonotonicClock()
    facts = {"ids": ids(), "cgroup_id": cgroup_id(), "net_ns": os.stat("/proc/self/ns/net").st_ino,
             "parent": me, "clock_offset_ns": clock.offset_ns, "work": work, "watched": watched,
             "fim": fim_doc}
    t0 = time.monotonic_ns()

    # 1. A fork that does socket and file calls, then exits with 7.
    report_r, report_w = os.pipe()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener6.bind(("::1", 0))
    listener6.listen(4)
    unix_path = os.path.join(work, "golden.sock")

    def acts():
        os.close(report_r)
        out = {}
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.connect(listener.getsockname())
        out["connect"] = {"fd": c.fileno(), "local": c.getsockname(), "remote": c.getpeername()}
        c6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        c6.connect(listener6.getsockname())
        out["connect6"] = {"local": c6.getsockname()[:2], "remote": c6.getpeername()[:2]}
        out["close"] = {"fd": c.fileno()}
        c.close()
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        u.bind(unix_path)
        out["bind_unix"] = {"fd": u.fileno()}
        target = os.path.join(watched, "config.txt")
        fd = libc.syscall(SYS_OPENAT, AT_FDCWD, target.encode(),
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        out["openat"] = {"ret": fd}
        os.close(fd)
        moved = os.path.join(watched, "config.new")
        rc = libc.syscall(SYS_RENAMEAT2, AT_FDCWD, target.encode(), AT_FDCWD, moved.encode(),
                          RENAME_NOREPLACE)
        out["renameat2"] = {"ret": rc}
        os.write(report_w, json.dumps(out).encode())
        os.close(report_w)
        return 7

    actor = child(acts)
    os.close(report_w)
    with os.fdopen(report_r) as f:
        acted = json.loads(f.read())
    accepted, _ = listener.accept()
    accepted.close()
    listener.close()
    accepted6, _ = listener6.accept()          # Python's accept() is the accept4 syscall
    acted["accept6"] = {"fd": listener6.fileno(), "ret": accepted6.fileno()}
    accepted6.close()
    listener6.close()
    _, status = os.waitpid(actor, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7, status

    # 2. A successful exec, with a controlling terminal, in a known cwd.
    argv = ["true", "two words", "line\nbreak"]
    exe = os.path.realpath("/bin/true")
    cwd = os.path.join(work, "cwd dir")
    os.mkdir(cwd)
    master, slave = pty.openpty()
    tty = os.ttyname(slave)

    def with_tty():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        os.chdir(cwd)
        os.execv(exe, argv)

    execd = child(with_tty)
    os.waitpid(execd, 0)
    os.close(slave)
    os.close(master)

    # 3. A failed exec (ENOENT) of a relative path, then exit 0.
    def failing():
        os.chdir(cwd)
        try:
            os.execv("./missing-program", ["missing-program", "arg"])
        except FileNotFoundError:
            return 0
        return 1

    failed = child(failing)
    os.waitpid(failed, 0)

    # 4. A process killed by SIGKILL.
    victim = child(lambda: (time.sleep(60), 0)[1])
    time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    os.waitpid(victim, 0)
    t1 = time.monotonic_ns()

    def drain_until(found) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for c in collectors.values():
                c.program.poll(50)
            if found():
                return
        closes = [(e.fd, e.family, e.inode, e.hdr.flags) for e in
                  (abi.SockEvent.from_buffer_copy(r) for r in sock_call(actor, abi.SYS_CLOSE)())]
        raise SystemExit("records not all seen: " + repr({name: len(f()) for name, f in wanted.items()})
                         + f"; closes: {closes}")

    def hdr(record):
        return abi.ProcHeader.from_buffer_copy(record[:hdr_size])

    def find(kind, pid, rtype, test=lambda r: True):
        return [r for k, r in seen if k == kind and hdr(r).pid == pid and hdr(r).type == rtype and test(r)]

    def sock_call(pid, syscall, family=None):
        def match(r):
            e = abi.SockEvent.from_buffer_copy(r)
            return e.syscall == syscall and family in (None, e.family)
        return lambda: find("socket", pid, abi.EV_SOCKET, match)

    def file_call(pid, syscall):
        return lambda: find("file", pid, abi.EV_FILE,
                            lambda r: abi.FILE_SYSCALLS[abi.FileEvent.from_buffer_copy(
                                r.ljust(ctypes.sizeof(abi.FileEvent), b"\0")).syscall] == syscall)

    def exec_of(pid):
        return lambda: find("process", pid, abi.EV_EXEC)

    wanted = {
        "fork": lambda: find("process", actor, abi.EV_FORK),
        "exit_code": lambda: find("process", actor, abi.EV_EXIT),
        "exec": exec_of(execd),
        "exec_failed": exec_of(failed),
        "exit_signal": lambda: find("process", victim, abi.EV_EXIT),
        "connect_ipv4": sock_call(actor, abi.SYS_CONNECT, socket.AF_INET),
        "bind_unix": sock_call(actor, abi.SYS_BIND),
        "close_ipv4": sock_call(actor, abi.SYS_CLOSE, socket.AF_INET),
        "accept4_ipv6": sock_call(me, abi.SYS_ACCEPT4, socket.AF_INET6),
        "openat_write": file_call(actor, "openat"),
        "renameat2": file_call(actor, "renameat2"),
    }
    drain_until(lambda: all(len(f()) == 1 for f in wanted.values()))
    records = {name: f()[0] for name, f in wanted.items()}
    for c in collectors.values():
        c.program.close()

    def kernel_times(record, struct_type):
        e = struct_type.from_buffer_copy(record.ljust(ctypes.sizeof(struct_type), b"\0"))
        assert t0 <= e.hdr.ktime_ns <= t1, (e.hdr.ktime_ns, t0, t1)
        assert 0 <= e.duration_ns <= t1 - t0, e.duration_ns
        return e.hdr.ktime_ns, e.duration_ns

    def common(pid, record, struct_type):
        ktime, duration = kernel_times(record, struct_type)
        return ktime, duration, {"tid": pid, "pid": pid, "parent": me, **{k: facts["ids"][k] for k in ("uid", "gid")},
                                 "cid": facts["cgroup_id"], "ntime": str(ktime),
                                 "time": (ktime + clock.offset_ns) // 1_000_000_000,
                                 # the host's own processes: no container; our namespaces
                                 **{k: "" for k in CONTAINER_FIELDS},
                                 **{f"{ns}_namespace": os.stat(f"/proc/self/ns/{ns}").st_ino
                                    for ns in ("pid", "mnt", "net")}}

    def process_row(pid, record, struct_type, **fields):
        ktime, duration, row = common(pid, record, struct_type)
        row.update({k: facts["ids"][k] for k in ("euid", "egid", "auid", "sid")})
        row.update(tty="", probe_error=0, partial=0, cwd="", json_cmdline=None, ancestry="[]",
                   host_identifier=None, is_open=0, eid=None, duration=duration)
        row.update(fields)
        return row

    sid_of = {execd: execd}             # it called setsid()
    out = []

    def add(name, table, expect, note):
        out.append({"name": name, "table": table, "note": note, "size": len(records[name]),
                    "hex": records[name].hex(), "expect": expect})

    add("fork", "bpf_process_events",
        process_row(actor, records["fork"], abi.TaskEvent, exit_code="0", syscall="clone", path="",
                    cmdline="", partial=1, duration=0),
        "os.fork() (glibc: the clone syscall) of the capturing process; its image is unknown to an empty cache")
    add("exit_code", "bpf_process_events",
        process_row(actor, records["exit_code"], abi.TaskEvent, exit_code="7", syscall="exit", path="",
                    cmdline="", partial=1),
        "the forked child's os._exit(7), after the fork record; duration is its lifetime")
    add("exec", "bpf_process_events",
        process_row(execd, records["exec"], abi.ExecEvent, sid=sid_of[execd],
                    tty=tty.removeprefix("/dev/"), exit_code="0", syscall="exec",
                    path=exe, cwd=cwd, cmdline=" ".join(argv), json_cmdline=json.dumps(argv)),
        "execv(/bin/true, argv with a space and a newline) in a cwd with a space, on a pty made its "
        "controlling terminal after setsid()")
    add("exec_failed", "bpf_process_events",
        process_row(failed, records["exec_failed"], abi.ExecEvent, exit_code=str(-errno.ENOENT),
                    syscall="exec", path=os.path.join(cwd, "missing-program"), cwd=cwd,
                    cmdline="missing-program arg", json_cmdline=json.dumps(["missing-program", "arg"])),
        "execv('./missing-program') failing with ENOENT: the path as given, joined to the cwd")
    add("exit_signal", "bpf_process_events",
        process_row(victim, records["exit_signal"], abi.TaskEvent, exit_code=str(-signal.SIGKILL),
                    syscall="exit", path="", cmdline="", partial=1),
        "a child killed by SIGKILL; no fork record was fed first, so the cache does not know it")
    c = acted["connect"]
    ktime, duration, row = common(actor, records["connect_ipv4"], abi.SockEvent)
    add("connect_ipv4", "bpf_socket_events", dict(
        row, exit_code="0", probe_error=0, syscall="connect", path="", fd=c["fd"], family=socket.AF_INET,
        type=socket.SOCK_STREAM, protocol=socket.IPPROTO_TCP, local_address=c["local"][0],
        remote_address=c["remote"][0], local_port=c["local"][1], remote_port=c["remote"][1],
        duration=duration, status="succeeded", socket="", net_namespace=facts["net_ns"], ancestry="[]"),
        "TCP connect() to a listener on 127.0.0.1; addresses and ports from getsockname()/getpeername()")
    ktime, duration, row = common(actor, records["close_ipv4"], abi.SockEvent)
    add("close_ipv4", "bpf_socket_events", dict(
        row, exit_code="0", probe_error=0, syscall="close", path="", fd=acted["close"]["fd"],
        family=socket.AF_INET, type=socket.SOCK_STREAM, protocol=socket.IPPROTO_TCP,
        local_address=c["local"][0], remote_address=c["remote"][0], local_port=c["local"][1],
        remote_port=c["remote"][1], duration=duration, status="succeeded", socket="",
        net_namespace=facts["net_ns"], ancestry="[]"),
        "close() of the connected TCP socket above: its last reference, duration its lifetime")
    a = acted["accept6"]
    c6 = acted["connect6"]
    ktime, duration, row = common(me, records["accept4_ipv6"], abi.SockEvent)
    add("accept4_ipv6", "bpf_socket_events", dict(
        row, parent=os.getppid(), exit_code=str(a["ret"]), probe_error=0, syscall="accept4", path="",
        fd=a["fd"], family=socket.AF_INET6, type=socket.SOCK_STREAM, protocol=socket.IPPROTO_TCP,
        local_address=c6["remote"][0], remote_address=c6["local"][0], local_port=c6["remote"][1],
        remote_port=c6["local"][1], duration=duration, status="succeeded", socket="",
        net_namespace=facts["net_ns"], ancestry="[]"),
        "the capturing process's accept() (accept4) on ::1 of the child's IPv6 connect; fd is the "
        "listener, exit_code the new fd")
    ktime, duration, row = common(actor, records["bind_unix"], abi.SockEvent)
    add("bind_unix", "bpf_socket_events", dict(
        row, exit_code="0", probe_error=0, syscall="bind", path="", fd=acted["bind_unix"]["fd"],
        family=socket.AF_UNIX, type=socket.SOCK_STREAM, protocol=0, local_address=unix_path,
        remote_address="", local_port=0, remote_port=0, duration=duration, status="succeeded",
        socket=unix_path, net_namespace=facts["net_ns"], ancestry="[]"),
        "bind() of an AF_UNIX stream socket to a path")
    ktime, duration, row = common(actor, records["openat_write"], abi.FileEvent)
    target = os.path.join(watched, "config.txt")
    add("openat_write", "bpf_file_events", dict(
        row, syscall="openat", path="", cmdline="", file_path=target, dest_path="",
        flags="O_WRONLY|O_CREAT|O_TRUNC", mode="0640", owner_uid=None, owner_gid=None, category="captured",
        exit_code=str(acted["openat"]["ret"]), probe_error=0, duration=duration, ancestry="[]"),
        "raw openat(AT_FDCWD, watched/config.txt, O_WRONLY|O_CREAT|O_TRUNC, 0640)")
    ktime, duration, row = common(actor, records["renameat2"], abi.FileEvent)
    add("renameat2", "bpf_file_events", dict(
        row, syscall="renameat2", path="", cmdline="", file_path=target,
        dest_path=os.path.join(watched, "config.new"), flags="RENAME_NOREPLACE", mode="", owner_uid=None,
        owner_gid=None, category="captured", exit_code="0", probe_error=0, duration=duration, ancestry="[]"),
        "raw renameat2(config.txt -> config.new, RENAME_NOREPLACE) inside the watched directory")

    doc = {
        "note": "Records as the kernel handed them over, captured by tests/data/capture_records.py "
                "(run it as root to recapture after any change to bpf/vajra.h / vajrad/kernel/abi.py). "
                "'expect' holds each row as tests/test_decoders.py must decode it; the values come from "
                "the capturing side (pids, fds, getsockname, cwd, argv), ktime and durations from the "
                "record, checked against bounds at capture.",
        "captured_on": {"kernel": os.uname().release, "machine": os.uname().machine,
                        "date": time.strftime("%Y-%m-%d")},
        "abi_sizes": {"ProcHeader": ctypes.sizeof(abi.ProcHeader), "TaskEvent": ctypes.sizeof(abi.TaskEvent),
                      "ExecEvent": ctypes.sizeof(abi.ExecEvent), "SockEvent": ctypes.sizeof(abi.SockEvent),
                      "FileEvent": ctypes.sizeof(abi.FileEvent)},
        "clock_offset_ns": clock.offset_ns,
        "fim": fim_doc,
        "records": out,
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(out)} records to {OUT}")


if __name__ == "__main__":
    main()

"""The three record decoders on record bytes, without root or BPF.

Two kinds of input:
- records built here from the ctypes mirror in vajrad/kernel/abi.py, fields set
  by name and the variable tail placed by the structs' own field offsets, so a
  change of bpf/vajra.h (and its mirror) flows into every test below;
- golden records the real kernel produced (tests/data/decoder_records.json,
  captured by tests/data/capture_records.py). The decoders read records with
  struct formats of their own (abi.EXEC_EVENT, SOCK_EVENT, ...) and parse
  sockaddrs by hand, which only the kernel's bytes can check.

The ProcessCache is a real one whose /proc is an empty directory: rows carry
only what the records told it, never a guess from this host's processes.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct

import pytest

from vajrad.collectors.bpf import MonotonicClock
from vajrad.collectors.fim import rules as fim
from vajrad.collectors.fim.bpf_file_events import FileCollector
from vajrad.collectors.process.bpf_process_events import ROW, EventDecoder
from vajrad.collectors.socket.bpf_socket_events import OpenSockets, SocketDecoder
from vajrad.enrich.process_cache import ProcessCache
from vajrad.kernel import abi
from vajrad.kernel.environment import KernelEnv

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "decoder_records.json")
SEC = 1_000_000_000
AF_UNIX, AF_INET, AF_INET6 = socket.AF_UNIX, socket.AF_INET, socket.AF_INET6
PID_NS, MNT_NS, NET_NS = 4026532201, 4026532202, 4026532203     # a container's, say
NO_CONTAINER = {"container_id": "", "container_name": "", "container_image": "", "container_runtime": "",
                "pod_name": "", "pod_namespace": "", "pod_uid": ""}


# --- building records from the ABI mirror --------------------------------------------
def put(record: ctypes.Structure, field: str, raw: bytes) -> None:
    """Raw bytes into an array field, NULs included (ctypes' own char-array
    setter stops at the first NUL, which would lose abstract Unix names)."""
    descriptor = getattr(type(record), field)
    assert len(raw) <= descriptor.size, f"{field}: {len(raw)} bytes do not fit in {descriptor.size}"
    ctypes.memmove(ctypes.addressof(record) + descriptor.offset, raw, len(raw))


def header(kind: int, *, pid: int, start_ns: int, ppid: int = 1, parent_start_ns: int = 0, tid: int = 0,
           ktime_ns: int = 5_000 * SEC, flags: int = 0, uid: int = 1000, gid: int = 1000, euid: int = 1000,
           egid: int = 1000, auid: int = 1000, sid: int = 700, cgroup_id: int = 4242,
           tty: bytes = b"", pid_ns: int = PID_NS, mnt_ns: int = MNT_NS, net_ns: int = NET_NS) -> abi.ProcHeader:
    h = abi.ProcHeader(type=kind, flags=flags, ktime_ns=ktime_ns, start_ns=start_ns,
                       parent_start_ns=parent_start_ns, pid=pid, tid=tid or pid, ppid=ppid, uid=uid, gid=gid,
                       euid=euid, egid=egid, auid=auid, sid=sid, cgroup_id=cgroup_id, pid_ns=pid_ns,
                       mnt_ns=mnt_ns, net_ns=net_ns)
    put(h, "tty", tty)
    return h


def components(path: str) -> bytes:
    """A path as the kernel's walk_path writes it: leaf first, each NUL-terminated."""
    return b"".join(p.encode() + b"\0" for p in reversed(path.strip("/").split("/")) if p)


def exec_record(*, args: bytes, cwd: bytes, exe: bytes, exit_code: int = 0, duration_ns: int = 1500,
                **who) -> bytes:
    e = abi.ExecEvent(hdr=header(abi.EV_EXEC, **who), duration_ns=duration_ns, exit_code=exit_code,
                      old_tid=who.get("tid") or who["pid"], args_len=len(args), cwd_len=len(cwd),
                      exe_len=len(exe))
    data = args + cwd + exe
    e.pos = len(data)
    put(e, "data", data)
    return bytes(e)[:abi.ExecEvent.data.offset + len(data)]      # sent only as far as data is used


def task_record(kind: int, *, duration_ns: int = 0, exit_code: int = 0, fork_kind: int = 0, **who) -> bytes:
    return bytes(abi.TaskEvent(hdr=header(kind, **who), duration_ns=duration_ns, exit_code=exit_code,
                               fork_kind=fork_kind))


def argv_bytes(*args: str | bytes) -> bytes:
    return b"".join((a if isinstance(a, bytes) else a.encode()) + b"\0" for a in args)


def sockaddr_in(address: str, port: int) -> bytes:
    # struct sockaddr_in as the caller passes it (the C layout, not ours).
    return struct.pack("=H", AF_INET) + port.to_bytes(2, "big") + socket.inet_pton(AF_INET, address) + bytes(8)


def sockaddr_in6(address: str, port: int) -> bytes:
    return (struct.pack("=H", AF_INET6) + port.to_bytes(2, "big") + bytes(4)
            + socket.inet_pton(AF_INET6, address) + bytes(4))


def sockaddr_un(path: bytes) -> bytes:
    return struct.pack("=H", AF_UNIX) + path


def sock_record(syscall: int, *, family: int, inode: int = 0, ret: int = 0, fd: int = 3, stype: int = 1,
                protocol: int = 0, state: int = 0, local: tuple[str, int] | None = None,
                remote: tuple[str, int] | None = None, user_addr: bytes = b"", local_path: bytes = b"",
                remote_path: bytes = b"", duration_ns: int = 2500, net_ns: int = 4026531840,
                flags: int = 0, **who) -> bytes:
    e = abi.SockEvent(hdr=header(abi.EV_SOCKET, flags=flags, **who), duration_ns=duration_ns, inode=inode,
                      ret=ret, fd=fd, syscall=syscall, net_ns=net_ns, family=family, type=stype,
                      protocol=protocol, state=state, user_addr_len=len(user_addr),
                      local_path_len=len(local_path), remote_path_len=len(remote_path))
    for end, field, port_field in ((local, "local_addr", "local_port"), (remote, "remote_addr", "remote_port")):
        if end is not None:
            put(e, field, socket.inet_pton(family, end[0]))
            setattr(e, port_field, end[1])
    put(e, "user_addr", user_addr)
    put(e, "local_path", local_path)
    put(e, "remote_path", remote_path)
    return bytes(e)


FILE_SYSCALL_NUMBERS = {name: n for n, name in abi.FILE_SYSCALLS.items()}


def file_record(syscall: str | int, path: str | bytes, dest: str | bytes = b"", *, ret: int = 0,
                open_flags: int = 0, mode: int = 0, owner_uid: int = 0, owner_gid: int = 0, fd: int = -1,
                call_flags: int = 0, duration_ns: int = 900, **who) -> bytes:
    """A file record laid out as file.bpf.c sends it: the path straddles
    FILE_HALF (directory before, what the caller passed after), dest_path sits
    in the second region, and the record ends one byte past the last path."""
    path = path.encode() if isinstance(path, str) else path
    dest = dest.encode() if isinstance(dest, str) else dest
    number = FILE_SYSCALL_NUMBERS[syscall] if isinstance(syscall, str) else syscall
    e = abi.FileEvent(hdr=header(abi.EV_FILE, **who), duration_ns=duration_ns, ret=ret, syscall=number,
                      open_flags=open_flags, mode=mode, owner_uid=owner_uid, owner_gid=owner_gid, fd=fd,
                      call_flags=call_flags, matched=1)
    e.path_start = abi.FILE_HALF - len(path) // 2
    e.path_end = e.path_start + len(path)
    e.dest_start = abi.FILE_REGION + abi.FILE_HALF - len(dest) // 2
    e.dest_end = e.dest_start + len(dest)
    data = bytearray(e.dest_end + 1)
    data[e.path_start:e.path_end] = path
    data[e.dest_start:e.dest_end] = dest
    put(e, "data", bytes(data))
    last = e.dest_end if dest else e.path_end
    return bytes(e)[:abi.FileEvent.data.offset + last + 1]


# --- fixtures ------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path):
    empty = tmp_path / "proc"
    empty.mkdir()
    return ProcessCache(proc=str(empty))


@pytest.fixture
def clock():
    return MonotonicClock()


@pytest.fixture
def decoder(cache, clock):
    return EventDecoder(cache, clock)


def decode(decoder: EventDecoder, record: bytes) -> dict:
    row = decoder.row(record, 0, len(record))
    assert len(row) == len(ROW)
    return dict(zip(ROW, row))


def entry(cache: ProcessCache, *, pid: int, ppid: int, path: str, cmdline: str, start_ns: int,
          parent_start_ns: int) -> dict:
    """An ancestry entry as osquery 5.18.1 shapes it, from first principles."""
    start = start_ns + cache.clock.offset_ns
    return {"exe_name": os.path.basename(path), "pid": pid, "ppid": ppid, "path": path, "cmdline": cmdline,
            "proc_time": start // SEC, "proc_time_hr": start,
            "pproc_time_hr": parent_start_ns + cache.clock.offset_ns if parent_start_ns else 0,
            "container_id": ""}


SHELL = dict(pid=3000, start_ns=100 * SEC, ppid=1, parent_start_ns=SEC)
CHILD = dict(pid=3001, start_ns=101 * SEC, ppid=3000, parent_start_ns=100 * SEC)


def start_shell(decoder) -> None:
    """A login shell the cache knows: forked from pid 1, then exec'd."""
    decode(decoder, task_record(abi.EV_FORK, fork_kind=1, **SHELL))
    decode(decoder, exec_record(args=argv_bytes("bash", "-l"), cwd=components("/root"),
                                exe=components("/usr/bin/bash"), **SHELL))


# --- process: exec -------------------------------------------------------------------------
def test_exec_row_field_by_field_with_ancestry(decoder, cache, clock):
    start_shell(decoder)
    decode(decoder, task_record(abi.EV_FORK, fork_kind=0, **CHILD))
    ktime = 7_000 * SEC + 123
    row = decode(decoder, exec_record(
        args=argv_bytes("grep", "two words", "line\nbreak", "tab\there"),
        cwd=components("/home/alice/my docs"), exe=components("/usr/bin/grep"), duration_ns=48_000,
        ktime_ns=ktime, tty=b"pts3", uid=1001, gid=1002, euid=0, egid=0, auid=1001, sid=2999,
        cgroup_id=8812, **CHILD))
    assert row == {
        "tid": 3001, "pid": 3001, "parent": 3000, "uid": 1001, "gid": 1002, "euid": 0, "egid": 0,
        "auid": 1001, "sid": 2999, "tty": "pts/3", "cid": 8812, "exit_code": "0", "probe_error": 0,
        "partial": 0, "syscall": "exec", "path": "/usr/bin/grep", "cwd": "/home/alice/my docs",
        "cmdline": "grep two words line\nbreak tab\there", "duration": 48_000,
        "json_cmdline": '["grep", "two words", "line\\nbreak", "tab\\there"]',
        "ancestry": row["ancestry"], "ntime": str(ktime), "host_identifier": None, "is_open": 0,
        "time": (ktime + clock.offset_ns) // SEC, "eid": None, **NO_CONTAINER, "pid_namespace": PID_NS,
        "mnt_namespace": MNT_NS, "net_namespace": NET_NS}
    assert json.loads(row["json_cmdline"]) == ["grep", "two words", "line\nbreak", "tab\there"]
    assert json.loads(row["ancestry"]) == [entry(cache, path="/usr/bin/bash", cmdline="bash -l", **SHELL)]


def test_exec_argv_cut_at_the_limit_is_flagged_and_keeps_the_cut_argument(decoder):
    # The kernel stops at the argv limit mid-argument: no NUL after the last bytes.
    args = argv_bytes("cp", "-r") + b"/very/long/pa"
    row = decode(decoder, exec_record(args=args, cwd=components("/"), exe=components("/usr/bin/cp"),
                                      flags=abi.F_ARGS_TRUNCATED, **CHILD))
    assert row["probe_error"] == abi.F_ARGS_TRUNCATED
    assert row["cmdline"] == "cp -r /very/long/pa"
    assert json.loads(row["json_cmdline"]) == ["cp", "-r", "/very/long/pa"]
    assert row["cwd"] == "/"


def test_exec_argv_that_is_not_utf8_is_escaped_not_dropped(decoder):
    row = decode(decoder, exec_record(args=argv_bytes("cat", b"caf\xe9", ""), cwd=components("/tmp"),
                                      exe=components("/usr/bin/cat"), **CHILD))
    # An empty argument stays an argument.
    assert json.loads(row["json_cmdline"]) == ["cat", "caf\\xe9", ""]
    assert row["cmdline"] == "cat caf\\xe9 "


def test_exec_cut_cwd_and_path_are_flagged(decoder):
    row = decode(decoder, exec_record(
        args=argv_bytes("x"), cwd=components("deep/er"), exe=components("bin/x"),
        flags=abi.F_CWD_TRUNCATED | abi.F_EXE_TRUNCATED | abi.F_READ_FAILED, **CHILD))
    assert row["probe_error"] == abi.F_CWD_TRUNCATED | abi.F_EXE_TRUNCATED | abi.F_READ_FAILED == 14
    assert (row["cwd"], row["path"]) == ("/deep/er", "/bin/x")


def test_exec_path_across_a_mount_root_has_no_slash_component(decoder):
    # walk_path writes "/" for the root of each mount it crosses.
    row = decode(decoder, exec_record(args=argv_bytes("run"), cwd=b"work\0/\0srv\0",
                                      exe=b"run\0bin\0/\0opt\0", **CHILD))
    assert (row["cwd"], row["path"]) == ("/srv/work", "/opt/bin/run")


def test_failed_exec_reports_errno_and_the_path_as_given_and_leaves_the_image(decoder, cache):
    start_shell(decoder)
    decode(decoder, task_record(abi.EV_FORK, fork_kind=0, **CHILD))
    row = decode(decoder, exec_record(
        args=argv_bytes("tool", "--x"), cwd=components("/home/alice/src"), exe=b"../bin/tool\0",
        exit_code=-errno.EACCES, flags=abi.F_EXE_AS_GIVEN, **CHILD))
    assert row["exit_code"] == "-13"
    assert row["path"] == "/home/alice/bin/tool"       # normalised against the cwd
    assert row["probe_error"] == 0                      # F_EXE_AS_GIVEN says how, not what went wrong
    assert row["cmdline"] == "tool --x"
    assert json.loads(row["ancestry"]) == [entry(cache, path="/usr/bin/bash", cmdline="bash -l", **SHELL)]
    # The process still runs its parent's image: its exit says so.
    exit_row = decode(decoder, task_record(abi.EV_EXIT, duration_ns=5 * SEC, **CHILD))
    assert (exit_row["path"], exit_row["cmdline"], exit_row["partial"]) == ("/usr/bin/bash", "bash -l", 0)


def test_failed_exec_with_no_path_given(decoder):
    row = decode(decoder, exec_record(args=b"", cwd=components("/tmp"), exe=b"\0", exit_code=-errno.EFAULT,
                                      flags=abi.F_EXE_AS_GIVEN, **CHILD))
    assert (row["path"], row["cmdline"], row["json_cmdline"], row["exit_code"]) == ("", "", "[]", "-14")


def test_tty_is_the_name_up_to_its_nul(decoder):
    rows = [decode(decoder, exec_record(args=argv_bytes("sh"), cwd=b"", exe=components("/bin/sh"), tty=t,
                                        **CHILD)) for t in (b"", b"tty1", b"pts12\0junk")]
    assert [r["tty"] for r in rows] == ["", "tty1", "pts/12"]


def test_unknown_record_type_is_refused(decoder):
    with pytest.raises(ValueError, match="unknown event type 9"):
        decoder.row(task_record(9, **CHILD), 0, ctypes.sizeof(abi.TaskEvent))
    record = exec_record(args=b"", cwd=b"", exe=b"", **CHILD)
    record = bytes(abi.ProcHeader(type=9)) + record[ctypes.sizeof(abi.ProcHeader):]
    with pytest.raises(ValueError, match="unknown event type 9"):
        decoder.row(record, 0, len(record))


def in_ring(record: bytes, at: int = 24) -> tuple[ctypes.Array, int]:
    """The record inside a larger buffer of the type the ring reader hands
    over (a ctypes char array over the mapped ring), at an offset."""
    raw = b"\xff" * at + record + b"\xee" * 64
    return (ctypes.c_char * len(raw)).from_buffer_copy(raw), at


def test_a_record_is_read_at_its_offset_in_the_rings_buffer(decoder):
    record = exec_record(args=argv_bytes("ls", "-l"), cwd=components("/"), exe=components("/bin/ls"), **CHILD)
    buf, at = in_ring(record)
    row = dict(zip(ROW, decoder.row(buf, at, len(record))))
    assert (row["cmdline"], row["path"], row["cwd"]) == ("ls -l", "/bin/ls", "/")
    record = task_record(abi.EV_EXIT, exit_code=2 << 8, **CHILD)
    buf, at = in_ring(record, 40)
    assert dict(zip(ROW, decoder.row(buf, at, len(record))))["exit_code"] == "2"


# --- process: fork and exit ----------------------------------------------------------------
@pytest.mark.parametrize("kind, name", [(0, "clone"), (1, "fork"), (2, "vfork"), (77, "clone")])
def test_fork_kinds(decoder, kind, name):
    start_shell(decoder)
    row = decode(decoder, task_record(abi.EV_FORK, fork_kind=kind, duration_ns=999, **CHILD))
    assert row["syscall"] == name
    # A fork runs its parent's image, and has no duration or exit code of its own.
    assert (row["path"], row["cmdline"], row["partial"]) == ("/usr/bin/bash", "bash -l", 0)
    assert (row["duration"], row["exit_code"], row["cwd"], row["json_cmdline"]) == (0, "0", "", None)


def test_fork_of_an_unknown_parent_is_partial(decoder):
    row = decode(decoder, task_record(abi.EV_FORK, fork_kind=1, **CHILD))
    assert (row["path"], row["cmdline"], row["partial"], row["ancestry"]) == ("", "", 1, "[]")


@pytest.mark.parametrize("status, exit_code", [
    (0, "0"),
    (3 << 8, "3"),                  # exit(3)
    (255 << 8, "255"),
    (9, "-9"),                      # killed by SIGKILL
    (0x80 | 11, "-11"),             # SIGSEGV with a core dump: the core bit is not the signal
    (15, "-15"),
])
def test_exit_code_versus_killed_by_signal(decoder, status, exit_code):
    row = decode(decoder, task_record(abi.EV_EXIT, exit_code=status, **CHILD))
    assert row["exit_code"] == exit_code and row["syscall"] == "exit"


def test_exit_row_has_the_lifetime_and_the_image_it_ran(decoder, cache, clock):
    start_shell(decoder)
    decode(decoder, task_record(abi.EV_FORK, **CHILD))
    decode(decoder, exec_record(args=argv_bytes("sleep", "3"), cwd=components("/"),
                                exe=components("/usr/bin/sleep"), **CHILD))
    ktime = 9_000 * SEC
    row = decode(decoder, task_record(abi.EV_EXIT, duration_ns=3 * SEC + 17, exit_code=0, ktime_ns=ktime,
                                      **CHILD))
    assert row == {
        "tid": 3001, "pid": 3001, "parent": 3000, "uid": 1000, "gid": 1000, "euid": 1000, "egid": 1000,
        "auid": 1000, "sid": 700, "tty": "", "cid": 4242, "exit_code": "0", "probe_error": 0, "partial": 0,
        "syscall": "exit", "path": "/usr/bin/sleep", "cwd": "", "cmdline": "sleep 3",
        "duration": 3 * SEC + 17, "json_cmdline": None, "ancestry": row["ancestry"], "ntime": str(ktime),
        "host_identifier": None, "is_open": 0, "time": (ktime + clock.offset_ns) // SEC, "eid": None,
        **NO_CONTAINER, "pid_namespace": PID_NS, "mnt_namespace": MNT_NS, "net_namespace": NET_NS}
    assert json.loads(row["ancestry"]) == [entry(cache, path="/usr/bin/bash", cmdline="bash -l", **SHELL)]
    assert cache.get(CHILD["pid"], CHILD["start_ns"]).exited_at > 0    # kept for its children's rows


def test_exit_of_a_process_never_seen_is_partial(decoder):
    row = decode(decoder, task_record(abi.EV_EXIT, exit_code=1 << 8, duration_ns=10, **CHILD))
    assert (row["path"], row["cmdline"], row["partial"], row["exit_code"]) == ("", "", 1, "1")


def test_orphan_keeps_the_line_it_was_born_into(decoder, cache):
    """Reparented to a subreaper (pid 1 here): the parent column is the
    current parent, the ancestry the original line."""
    start_shell(decoder)
    decode(decoder, task_record(abi.EV_FORK, **CHILD))
    row = decode(decoder, task_record(abi.EV_EXIT, **dict(CHILD, ppid=1, parent_start_ns=SEC)))
    assert row["parent"] == 1
    assert json.loads(row["ancestry"]) == [entry(cache, path="/usr/bin/bash", cmdline="bash -l", **SHELL)]


# --- sockets ---------------------------------------------------------------------------------
@pytest.fixture
def open_sockets():
    return OpenSockets()


@pytest.fixture
def sockets(clock, open_sockets):
    return SocketDecoder(clock, open_sockets)


def sock_row(sockets: SocketDecoder, record: bytes) -> dict:
    row, who = sockets.row(record, 0, len(record))
    return row


def test_connect_ipv4_row_field_by_field(sockets, open_sockets, clock):
    ktime = 6_000 * SEC + 5
    record = sock_record(abi.SYS_CONNECT, family=AF_INET, inode=1001, fd=7, protocol=socket.IPPROTO_TCP,
                         state=1, local=("10.0.0.5", 40000), remote=("93.184.216.34", 443),
                         user_addr=sockaddr_in("93.184.216.34", 443), duration_ns=31_000, ktime_ns=ktime,
                         uid=33, gid=33, cgroup_id=77, **CHILD)
    row, who = sockets.row(record, 0, len(record))
    assert row == {
        "tid": 3001, "pid": 3001, "parent": 3000, "uid": 33, "gid": 33, "cid": 77, "exit_code": "0",
        "probe_error": 0, "syscall": "connect", "path": "", "fd": 7, "family": AF_INET, "type": 1,
        "protocol": 6, "local_address": "10.0.0.5", "remote_address": "93.184.216.34", "local_port": 40000,
        "remote_port": 443, "duration": 31_000, "status": "succeeded", "socket": "",
        "net_namespace": 4026531840, "ancestry": "[]", "ntime": str(ktime),
        "time": (ktime + clock.offset_ns) // SEC, **NO_CONTAINER, "pid_namespace": PID_NS,
        "mnt_namespace": MNT_NS}
    assert who == (3001, 101 * SEC, 3000, 100 * SEC, ktime, 0)     # exec_id: the record's, 0 here
    tracked = open_sockets.by_inode[1001]
    assert tracked["owners"] == {(3001, 7)} and tracked["state"] == "ESTABLISHED"
    assert (tracked["remote_address"], tracked["remote_port"]) == ("93.184.216.34", 443)


def test_connect_status_in_progress_and_failed(sockets, open_sockets):
    common = dict(family=AF_INET, inode=1002, protocol=6, local=("10.0.0.5", 40001),
                  user_addr=sockaddr_in("192.0.2.1", 22), **CHILD)
    pending = sock_row(sockets, sock_record(abi.SYS_CONNECT, ret=-errno.EINPROGRESS, **common))
    assert (pending["status"], pending["exit_code"]) == ("in_progress", "-115")
    # What the caller asked for, even before the kernel's socket has a peer.
    assert (pending["remote_address"], pending["remote_port"]) == ("192.0.2.1", 22)
    # A non-blocking connect is an open socket while it is in progress.
    assert 1002 in open_sockets.by_inode
    refused = sock_row(sockets, sock_record(abi.SYS_CONNECT, ret=-errno.ECONNREFUSED, **dict(common, inode=1003)))
    assert (refused["status"], refused["exit_code"]) == ("failed", "-111")
    assert 1003 not in open_sockets.by_inode        # a failed call opens nothing


def test_connect_on_an_fd_that_is_no_socket_takes_the_family_from_the_caller(sockets, open_sockets):
    row = sock_row(sockets, sock_record(abi.SYS_CONNECT, family=0, inode=0, ret=-errno.ENOTSOCK, fd=4,
                                        user_addr=sockaddr_in6("2001:db8::1", 8443), **CHILD))
    assert (row["family"], row["local_address"], row["local_port"]) == (AF_INET6, "", 0)
    assert (row["remote_address"], row["remote_port"], row["status"]) == ("2001:db8::1", 8443, "failed")
    assert open_sockets.by_inode == {}


def test_accept4_ipv6_describes_the_new_connection(sockets, open_sockets):
    row = sock_row(sockets, sock_record(abi.SYS_ACCEPT4, family=AF_INET6, inode=2002, fd=3, ret=9,
                                        protocol=6, state=1, local=("::1", 8080),
                                        remote=("::ffff:192.0.2.7", 51000), **CHILD))
    assert row["syscall"] == "accept4" and row["exit_code"] == "9" and row["fd"] == 3
    assert (row["local_address"], row["local_port"]) == ("::1", 8080)
    assert (row["remote_address"], row["remote_port"]) == ("::ffff:192.0.2.7", 51000)    # RFC 5952
    assert open_sockets.by_inode[2002]["owners"] == {(3001, 9)}     # held as the new fd
    plain = sock_row(sockets, sock_record(abi.SYS_ACCEPT, family=AF_INET, inode=2003, fd=3, ret=10,
                                          local=("0.0.0.0", 80), remote=("198.51.100.2", 1234), **CHILD))
    assert plain["syscall"] == "accept" and open_sockets.by_inode[2003]["owners"] == {(3001, 10)}


def test_bind_reports_the_kernels_address_or_on_failure_the_callers(sockets, open_sockets):
    ok = sock_row(sockets, sock_record(abi.SYS_BIND, family=AF_INET, inode=3003, fd=5, protocol=17, stype=2,
                                       local=("127.0.0.1", 5353), user_addr=sockaddr_in("0.0.0.0", 0),
                                       **CHILD))
    assert (ok["local_address"], ok["local_port"], ok["status"]) == ("127.0.0.1", 5353, "succeeded")
    assert (ok["type"], ok["protocol"]) == (2, 17)
    failed = sock_row(sockets, sock_record(abi.SYS_BIND, family=AF_INET, inode=3004, fd=6,
                                           ret=-errno.EADDRINUSE, local=("0.0.0.0", 0),
                                           user_addr=sockaddr_in("127.0.0.1", 8080), **CHILD))
    assert (failed["local_address"], failed["local_port"]) == ("127.0.0.1", 8080)
    assert (failed["status"], failed["exit_code"]) == ("failed", "-98")
    assert 3004 not in open_sockets.by_inode


def test_listen_ipv6_is_tracked_as_listening(sockets, open_sockets):
    row = sock_row(sockets, sock_record(abi.SYS_LISTEN, family=AF_INET6, inode=4004, fd=8, protocol=6,
                                        state=10, local=("::", 443), remote=("::", 0), **CHILD))
    assert (row["syscall"], row["local_address"], row["local_port"]) == ("listen", "::", 443)
    assert (row["remote_address"], row["remote_port"]) == ("::", 0)
    assert open_sockets.by_inode[4004]["state"] == "LISTEN"


def test_unix_bind_and_abstract_connect(sockets, open_sockets):
    bound = sock_row(sockets, sock_record(abi.SYS_BIND, family=AF_UNIX, inode=5005, fd=3,
                                          local_path=b"/run/app.sock",
                                          user_addr=sockaddr_un(b"/run/app.sock\0"), **CHILD))
    assert (bound["local_address"], bound["socket"], bound["local_port"]) == ("/run/app.sock",) * 2 + (0,)
    assert open_sockets.by_inode[5005]["path"] == "/run/app.sock"
    connected = sock_row(sockets, sock_record(abi.SYS_CONNECT, family=AF_UNIX, inode=5006, fd=4,
                                              remote_path=b"\0dbus-Xyz",
                                              user_addr=sockaddr_un(b"\0dbus-Xyz"), **CHILD))
    # An abstract name reads @name, as ss shows it; the socket a connect names is its peer.
    assert (connected["local_address"], connected["remote_address"]) == ("", "@dbus-Xyz")
    assert connected["socket"] == "@dbus-Xyz" and connected["remote_port"] == 0


def test_unix_connect_on_a_non_socket_takes_the_path_from_the_caller(sockets):
    row = sock_row(sockets, sock_record(abi.SYS_CONNECT, family=0, inode=0, ret=-errno.ENOTSOCK,
                                        user_addr=sockaddr_un(b"/run/gone.sock\0"), **CHILD))
    assert (row["family"], row["remote_address"], row["socket"]) == (AF_UNIX, "/run/gone.sock", "/run/gone.sock")


def test_close_reports_the_lifetime_and_fills_a_peer_that_went_first(sockets, open_sockets):
    sock_row(sockets, sock_record(abi.SYS_CONNECT, family=AF_UNIX, inode=6006, fd=4,
                                  remote_path=b"/run/peer.sock", user_addr=sockaddr_un(b"/run/peer.sock\0"),
                                  **CHILD))
    closed = sock_row(sockets, sock_record(abi.SYS_CLOSE, family=AF_UNIX, inode=6006, fd=4,
                                           duration_ns=12 * SEC,
                                           flags=abi.SF_LAST_REF | abi.SF_START_SEEN, **CHILD))
    assert closed["syscall"] == "close" and closed["duration"] == 12 * SEC
    assert closed["remote_address"] == "/run/peer.sock"      # the kernel no longer had the peer
    assert closed["probe_error"] == 0                         # the SF_ bits are not probe errors
    assert 6006 not in open_sockets.by_inode


def test_close_without_a_seen_start_has_no_duration_and_a_shared_socket_stays(sockets, open_sockets):
    common = dict(family=AF_INET, inode=7007, protocol=6, local=("10.0.0.5", 40002),
                  remote=("10.0.0.9", 5432), **CHILD)
    sock_row(sockets, sock_record(abi.SYS_CONNECT, fd=4, user_addr=sockaddr_in("10.0.0.9", 5432), **common))
    open_sockets.by_inode[7007]["owners"].add((3001, 11))       # dup()ed
    closed = sock_row(sockets, sock_record(abi.SYS_CLOSE, fd=4, duration_ns=777, **common))
    assert closed["duration"] is None
    assert open_sockets.by_inode[7007]["owners"] == {(3001, 11)}


def test_socket_record_is_read_at_its_offset_in_the_rings_buffer(sockets):
    record = sock_record(abi.SYS_CONNECT, family=AF_INET6, inode=8008, fd=6, local=("fe80::1", 1000),
                         remote=("2001:db8::2", 53), user_addr=sockaddr_in6("2001:db8::2", 53), **CHILD)
    buf, at = in_ring(record, 8)
    row, who = sockets.row(buf, at, len(record))
    assert (row["local_address"], row["remote_address"], row["remote_port"]) == ("fe80::1", "2001:db8::2", 53)


def test_unknown_socket_syscall_is_refused(sockets):
    with pytest.raises(KeyError):
        sock_row(sockets, sock_record(99, family=AF_INET, **CHILD))


# --- files -------------------------------------------------------------------------------
FIM_DOC = {"file_paths": {"etc": ["/etc/%%"], "bins": ["/usr/local/bin/%"], "secrets": ["/srv/secrets/%%"]},
           "exclude_paths": {"etc": ["/etc/mtab"]}, "file_accesses": ["secrets"]}


@pytest.fixture
def files(cache):
    kenv = KernelEnv(release=os.uname().release, has_ringbuf=True)   # never loaded: decode() needs no kernel
    return FileCollector(kenv, cache=cache, rules=fim.parse(FIM_DOC, "test_decoders"))


def file_row(files: FileCollector, record: bytes) -> dict | None:
    decoded = files.decode(record, 0, len(record))
    return None if decoded is None else decoded[0]


def test_open_for_write_row_field_by_field(files):
    ktime = 8_000 * SEC
    record = file_record("openat", "/etc/ssh/../ssh//sshd_config", ret=3, mode=0o644,
                         open_flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, duration_ns=4200,
                         ktime_ns=ktime, uid=0, gid=0, cgroup_id=99, **CHILD)
    row, who = files.decode(record, 0, len(record))
    assert row == {
        "tid": 3001, "pid": 3001, "parent": 3000, "uid": 0, "gid": 0, "cid": 99, "syscall": "openat",
        "path": "", "cmdline": "", "file_path": "/etc/ssh/sshd_config", "dest_path": "",
        "flags": "O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC", "mode": "0644", "owner_uid": None, "owner_gid": None,
        "category": "etc", "exit_code": "3", "probe_error": 0, "duration": 4200, "ancestry": "[]",
        "ntime": str(ktime), "time": (ktime + files.clock.offset_ns) // SEC, **NO_CONTAINER,
        "pid_namespace": PID_NS, "mnt_namespace": MNT_NS, "net_namespace": NET_NS}
    assert who == (3001, 101 * SEC, 3000, 100 * SEC, ktime, 0)     # exec_id: the record's, 0 here


def test_open_flag_texts(files):
    def flags(oflags: int, path: str = "/etc/x") -> tuple[str, str]:
        row = file_row(files, file_record("openat", path, open_flags=oflags, mode=0o600, **CHILD))
        return row["flags"], row["mode"]
    assert flags(os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW) == ("O_RDWR|O_APPEND|O_NOFOLLOW", "")
    assert flags(os.O_WRONLY | os.O_CREAT | os.O_EXCL) == ("O_WRONLY|O_CREAT|O_EXCL", "0600")
    # O_TMPFILE carries O_DIRECTORY; its mode counts, as with O_CREAT.
    assert flags(os.O_RDWR | os.O_TMPFILE) == ("O_RDWR|O_DIRECTORY|O_TMPFILE", "0600")
    # Bits without a name are kept, in hex.
    assert flags(os.O_WRONLY | 0x40000000) == ("O_WRONLY|0x40000000", "")
    assert flags(os.O_WRONLY | os.O_SYNC) == ("O_WRONLY|O_DSYNC|O_SYNC", "")   # O_SYNC includes O_DSYNC
    # creat() has no flags argument: file.bpf.c records the ones it implies.
    row = file_row(files, file_record("creat", "/etc/new", open_flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                      mode=0o600, ret=5, **CHILD))
    assert (row["syscall"], row["flags"], row["mode"]) == ("creat", "O_WRONLY|O_CREAT|O_TRUNC", "0600")


def test_reads_are_rows_only_where_accesses_are_recorded(files):
    assert file_row(files, file_record("openat", "/etc/hosts", open_flags=os.O_RDONLY, **CHILD)) is None
    assert files.filtered_in_userspace == 1
    row = file_row(files, file_record("open", "/srv/secrets/key.pem", open_flags=os.O_RDONLY, ret=4, **CHILD))
    assert (row["syscall"], row["flags"], row["mode"], row["category"]) == ("open", "O_RDONLY", "", "secrets")


def test_paths_the_kernels_coarser_view_let_through_are_dropped_and_counted(files):
    for path in ("/etc/mtab", "/usr/local/bin/sub/tool", "/var/log/syslog"):
        assert file_row(files, file_record("unlink", path, **CHILD)) is None
    assert files.filtered_in_userspace == 3
    assert file_row(files, file_record("unlink", "/usr/local/bin/tool", **CHILD))["category"] == "bins"


def test_rename_into_a_watched_tree_takes_its_category_from_the_destination(files):
    row = file_row(files, file_record("renameat2", "/tmp/staging/app.conf", "/etc/app/./app.conf",
                                      call_flags=1 | 2, **CHILD))
    assert (row["file_path"], row["dest_path"]) == ("/tmp/staging/app.conf", "/etc/app/app.conf")
    assert (row["category"], row["flags"], row["mode"]) == ("etc", "RENAME_NOREPLACE|RENAME_EXCHANGE", "")
    plain = file_row(files, file_record("rename", "/etc/passwd+", "/etc/passwd", **CHILD))
    assert (plain["syscall"], plain["dest_path"], plain["flags"]) == ("rename", "/etc/passwd", "")


def test_unlink_and_rmdir(files):
    row = file_row(files, file_record("unlinkat", "/etc/cron.d", call_flags=0x200, **CHILD))
    assert (row["syscall"], row["flags"], row["dest_path"]) == ("unlinkat", "AT_REMOVEDIR", "")
    row = file_row(files, file_record("unlink", "/etc/motd", ret=-errno.ENOENT, **CHILD))
    assert (row["flags"], row["exit_code"]) == ("", "-2")


def test_chmod_modes_and_flags(files):
    row = file_row(files, file_record("chmod", "/usr/local/bin/tool", mode=0o4755, **CHILD))
    assert (row["mode"], row["flags"], row["owner_uid"]) == ("4755", "", None)
    row = file_row(files, file_record("fchmodat", "/etc/shadow", mode=0o640, call_flags=0x100, **CHILD))
    assert (row["mode"], row["flags"]) == ("0640", "AT_SYMLINK_NOFOLLOW")
    row = file_row(files, file_record("mkdir", "/etc/new.d", mode=0o755, **CHILD))
    assert row["mode"] == "0755"


def test_chown_owner_and_unchanged_ids(files):
    row = file_row(files, file_record("chown", "/etc/shadow", owner_uid=1000, owner_gid=0xFFFFFFFF, **CHILD))
    assert (row["owner_uid"], row["owner_gid"], row["mode"]) == (1000, -1, "")
    row = file_row(files, file_record("fchownat", "/etc/group", owner_uid=0xFFFFFFFF, owner_gid=42,
                                      call_flags=0x100 | 0x1000, **CHILD))
    assert (row["owner_uid"], row["owner_gid"]) == (-1, 42)
    assert row["flags"] == "AT_SYMLINK_NOFOLLOW|AT_EMPTY_PATH"


def test_truncate(files):
    row = file_row(files, file_record("truncate", "/etc/shadow", ret=-errno.EPERM, **CHILD))
    assert (row["syscall"], row["exit_code"], row["flags"], row["mode"]) == ("truncate", "-1", "", "")
    assert (row["owner_uid"], row["owner_gid"], row["dest_path"]) == (None, None, "")


def test_symlink_target_is_kept_as_written(files):
    row = file_row(files, file_record("symlinkat", "/etc/alternatives/editor", "../../usr/bin/./vim", **CHILD))
    assert (row["file_path"], row["dest_path"]) == ("/etc/alternatives/editor", "../../usr/bin/./vim")


def test_xattr_flags(files):
    row = file_row(files, file_record("setxattr", "/etc/hosts", call_flags=1, **CHILD))
    assert row["flags"] == "XATTR_CREATE"
    row = file_row(files, file_record("setxattrat", "/etc/hosts", call_flags=0x100, **CHILD))
    assert row["flags"] == "AT_SYMLINK_NOFOLLOW"      # setxattrat's flags are AT_ ones


def test_file_record_is_read_at_its_offset_in_the_rings_buffer(files):
    record = file_record("renameat", "/etc/a", "/etc/b", **CHILD)
    buf, at = in_ring(record, 16)
    row, who = files.decode(buf, at, len(record))
    assert (row["file_path"], row["dest_path"], row["syscall"]) == ("/etc/a", "/etc/b", "renameat")


def test_unknown_file_syscall_keeps_its_number(files):
    row = file_row(files, file_record(200, "/etc/hosts", **CHILD))
    assert row["syscall"] == "200"


def test_file_rows_are_attributed_from_the_process_events(files, cache, decoder):
    """The same ProcessCache the process decoder keeps fills path, cmdline and
    ancestry of the file row once the process events are applied."""
    start_shell(decoder)
    decode(decoder, task_record(abi.EV_FORK, **CHILD))
    decode(decoder, exec_record(args=argv_bytes("vi", "/etc/hosts"), cwd=components("/root"),
                                exe=components("/usr/bin/vi"), **CHILD))
    record = file_record("openat", "/etc/hosts", open_flags=os.O_WRONLY, ret=3, **CHILD)
    assert files.row(record, 0, len(record)) is None       # waits for attribution
    files._after_poll(final=True)
    [row] = files._pending
    assert (row["path"], row["cmdline"]) == ("/usr/bin/vi", "vi /etc/hosts")
    assert json.loads(row["ancestry"]) == [entry(cache, path="/usr/bin/bash", cmdline="bash -l", **SHELL)]


# --- golden records from the real kernel ---------------------------------------------------
with open(GOLDEN) as f:
    GOLDEN_DOC = json.load(f)


RECAPTURE = "record layout changed since the goldens were captured: rerun tests/data/capture_records.py as root"


def abi_sizes_now() -> dict:
    return {name: ctypes.sizeof(getattr(abi, name)) for name in GOLDEN_DOC["abi_sizes"]}


def test_golden_records_match_the_current_abi():
    """The goldens' sizes follow the layout they were captured with; a changed
    bpf/vajra.h needs new ones (tests/data/capture_records.py, as root)."""
    assert abi_sizes_now() == GOLDEN_DOC["abi_sizes"], RECAPTURE
    kinds = {abi.EV_EXEC, abi.EV_FORK, abi.EV_EXIT, abi.EV_SOCKET, abi.EV_FILE}
    seen = {abi.ProcHeader.from_buffer_copy(bytes.fromhex(r["hex"])[:ctypes.sizeof(abi.ProcHeader)]).type
            for r in GOLDEN_DOC["records"]}
    assert seen == kinds            # one real record of every kind at least


@pytest.mark.parametrize("golden", GOLDEN_DOC["records"], ids=[r["name"] for r in GOLDEN_DOC["records"]])
def test_golden_record_decodes_to_what_the_capture_saw(golden, cache):
    if abi_sizes_now() != GOLDEN_DOC["abi_sizes"]:
        pytest.fail(RECAPTURE)
    record = bytes.fromhex(golden["hex"])
    assert len(record) == golden["size"]
    clock = MonotonicClock()
    clock.offset_ns = GOLDEN_DOC["clock_offset_ns"]     # the capture's, so `time` is exact
    if golden["table"] == "bpf_process_events":
        row = decode(EventDecoder(cache, clock), record)
    elif golden["table"] == "bpf_socket_events":
        row, who = SocketDecoder(clock, OpenSockets()).row(record, 0, len(record))
    else:
        files = FileCollector(KernelEnv(release=os.uname().release, has_ringbuf=True), cache=cache,
                              rules=fim.parse(GOLDEN_DOC["fim"], "golden"))
        files.clock = clock
        row, who = files.decode(record, 0, len(record))
    expect = golden["expect"]
    for column in expect:
        assert row[column] == expect[column], f"{golden['name']}: {column}"
    assert set(row) == set(expect)

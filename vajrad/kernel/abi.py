"""ctypes mirror of bpf/vajra.h, the one place Python learns the event layout.

BpfProgram passes ABI_CHECKS to the compiler, where _Static_assert rejects
a header that drifted from this file.
"""
from __future__ import annotations

import ctypes
import struct
from ctypes import c_char, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64

ARGS_MAX = 8192
PATH_MAX = 4096
NAME_MAX = 256
DATA_SIZE = 16384
WAKEUP_BYTES = 128 * 1024     # ring buffer bytes per CPU between consumer wakeups
TTY_MAX = 32

EV_EXEC, EV_FORK, EV_EXIT, EV_SOCKET, EV_FILE = 1, 2, 3, 4, 5
FORK_KINDS = {0: "clone", 1: "fork", 2: "vfork"}

F_ARGS_TRUNCATED = 1 << 0
F_CWD_TRUNCATED = 1 << 1
F_EXE_TRUNCATED = 1 << 2
F_READ_FAILED = 1 << 3
F_EXE_AS_GIVEN = 1 << 4

SYS_CONNECT, SYS_ACCEPT, SYS_ACCEPT4, SYS_BIND, SYS_LISTEN, SYS_CLOSE = 1, 2, 3, 4, 5, 6
SOCK_SYSCALLS = {SYS_CONNECT: "connect", SYS_ACCEPT: "accept", SYS_ACCEPT4: "accept4",
                 SYS_BIND: "bind", SYS_LISTEN: "listen", SYS_CLOSE: "close"}
SF_LAST_REF = 1 << 8
SF_START_SEEN = 1 << 9
SOCKADDR_ROOM = 128
SUN_PATH_ROOM = 128

# enum vajra_file_syscall, in order from 1
FILE_SYSCALLS = dict(enumerate((
    "open", "openat", "openat2", "creat", "truncate", "ftruncate",
    "unlink", "unlinkat", "rmdir", "mkdir", "mkdirat",
    "rename", "renameat", "renameat2",
    "chmod", "fchmod", "fchmodat", "fchmodat2",
    "chown", "lchown", "fchown", "fchownat",
    "link", "linkat", "symlink", "symlinkat",
    "setxattr", "lsetxattr", "fsetxattr", "setxattrat"), start=1))
# Syscalls only some kernels have: the program hooks them when the tracepoint exists.
FILE_OPTIONAL_SYSCALLS = ("openat2", "fchmodat2", "setxattrat")
FILE_HALF = 4096
FILE_REGION = 2 * FILE_HALF + 256
FIM_KEY_MAX = 256
FIM_TREE, FIM_LEVEL, FIM_EXACT, FIM_EXCLUDE = 1, 2, 3, 4
FIM_ENABLED, FIM_ACCESS_ANY, FIM_SELF_TGID = 0, 1, 2
FIM_CHECKED, FIM_MATCHED = 0, 1


class ProcHeader(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32), ("flags", c_uint32), ("ktime_ns", c_uint64),
        ("start_ns", c_uint64), ("parent_start_ns", c_uint64),
        ("pid", c_uint32), ("tid", c_uint32), ("ppid", c_uint32),
        ("uid", c_uint32), ("gid", c_uint32), ("euid", c_uint32), ("egid", c_uint32),
        ("auid", c_uint32), ("sid", c_uint32), ("exec_id", c_uint32),
        ("cgroup_id", c_uint64), ("tty", c_char * TTY_MAX),
        ("pid_ns", c_uint32), ("mnt_ns", c_uint32), ("net_ns", c_uint32), ("_ns_pad", c_uint32),
    ]


class TaskEvent(ctypes.Structure):
    _fields_ = [("hdr", ProcHeader), ("duration_ns", c_uint64), ("exit_code", c_int32),
                ("fork_kind", c_uint32)]


class ExecEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", ProcHeader), ("duration_ns", c_uint64), ("exit_code", c_int32), ("old_tid", c_uint32),
        ("args_len", c_uint32), ("cwd_len", c_uint32), ("exe_len", c_uint32),
        ("pos", c_uint32),
        ("data", c_char * (DATA_SIZE + NAME_MAX)),
    ]


class SockEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", ProcHeader), ("duration_ns", c_uint64), ("inode", c_uint64), ("ret", c_int64),
        ("fd", c_int32), ("syscall", c_uint32), ("net_ns", c_uint32),
        ("family", c_uint16), ("type", c_uint16), ("protocol", c_uint16), ("state", c_uint16),
        ("local_port", c_uint16), ("remote_port", c_uint16),
        ("local_addr", c_uint8 * 16), ("remote_addr", c_uint8 * 16),
        ("user_addr_len", c_uint32), ("local_path_len", c_uint16), ("remote_path_len", c_uint16),
        ("user_addr", c_uint8 * SOCKADDR_ROOM),
        ("local_path", c_char * SUN_PATH_ROOM), ("remote_path", c_char * SUN_PATH_ROOM),
    ]


class FileEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", ProcHeader), ("duration_ns", c_uint64), ("ret", c_int64),
        ("syscall", c_uint32), ("open_flags", c_uint32), ("mode", c_uint32),
        ("owner_uid", c_uint32), ("owner_gid", c_uint32), ("fd", c_int32), ("call_flags", c_uint32),
        ("matched", c_uint32), ("path_start", c_uint32), ("path_end", c_uint32),
        ("dest_start", c_uint32), ("dest_end", c_uint32), ("pos", c_uint32), ("_pad", c_uint32),
        ("data", c_char * (2 * FILE_REGION)),
    ]


class FimKey(ctypes.Structure):
    _fields_ = [("prefixlen", c_uint32), ("data", c_char * FIM_KEY_MAX)]


class FimRule(ctypes.Structure):
    _fields_ = [("kind", c_uint32), ("len", c_uint32), ("access", c_uint32), ("_pad", c_uint32)]


EXEC_DATA_OFFSET = ExecEvent.data.offset
FILE_DATA_OFFSET = FileEvent.data.offset

# The same layouts as struct formats, for decoding in place with one call per
# record; checked against the ctypes mirror when this module loads.
_HEADER_FORMAT = "<IIQQQ10IQ32s3I4x"   # ... tty, pid_ns, mnt_ns, net_ns, pad
TASK_EVENT = struct.Struct(_HEADER_FORMAT + "QiI")       # + duration_ns, exit_code, fork_kind
EXEC_EVENT = struct.Struct(_HEADER_FORMAT + "QiIIIII")   # + duration_ns, exit_code, old_tid, lens, pos
# + duration_ns .. remote_path: addresses stay bytes, formatted by family
SOCK_EVENT = struct.Struct(_HEADER_FORMAT + f"QQqiII6H16s16sIHH{SOCKADDR_ROOM}s{SUN_PATH_ROOM}s{SUN_PATH_ROOM}s")
# + duration_ns .. _pad; the paths follow at FILE_DATA_OFFSET
FILE_EVENT = struct.Struct(_HEADER_FORMAT + "Qq14I")
if (struct.calcsize(_HEADER_FORMAT) != ctypes.sizeof(ProcHeader)
        or TASK_EVENT.size != ctypes.sizeof(TaskEvent) or EXEC_EVENT.size != EXEC_DATA_OFFSET
        or SOCK_EVENT.size != ctypes.sizeof(SockEvent) or FILE_EVENT.size != FILE_DATA_OFFSET):
    raise ImportError("bpf_abi: struct formats disagree with the ctypes mirror of bpf/vajra.h")

# -D flags that make the C side check this mirror at compile time.
ABI_CHECKS = {
    "VAJRA_EXPECT_EXEC_EVENT_SIZE": ctypes.sizeof(ExecEvent),
    "VAJRA_EXPECT_TASK_EVENT_SIZE": ctypes.sizeof(TaskEvent),
    "VAJRA_EXPECT_SOCK_EVENT_SIZE": ctypes.sizeof(SockEvent),
    "VAJRA_EXPECT_FILE_EVENT_SIZE": ctypes.sizeof(FileEvent),
    "VAJRA_EXPECT_FILE_HALF": FILE_HALF, "VAJRA_EXPECT_FIM_KEY_MAX": FIM_KEY_MAX,
    "VAJRA_EXPECT_TTY_MAX": TTY_MAX,
    "VAJRA_EXPECT_ARGS_MAX": ARGS_MAX, "VAJRA_EXPECT_PATH_MAX": PATH_MAX,
    "VAJRA_EXPECT_NAME_MAX": NAME_MAX, "VAJRA_EXPECT_DATA_SIZE": DATA_SIZE,
    "VAJRA_EXPECT_WAKEUP_BYTES": WAKEUP_BYTES,
}


def join_components(raw: bytes) -> str:
    """Leaf-first NUL-terminated components, as walk_path writes them, to a path."""
    parts = raw.decode("utf-8", "surrogateescape").split("\0")
    parts.pop()                     # after the last NUL (or all of an empty raw)
    if "/" in parts:                # a mount's root, which names nothing
        parts = [p for p in parts if p != "/"]
    parts.reverse()
    return "/" + "/".join(parts)

"""`python3 seccomp_deny_bpf.py PROGRAM ARGS...`: runs PROGRAM with bpf(2)
failing with EPERM, as a container's seccomp filter makes it (Docker's and
podman's default profiles, systemd-nspawn without --system-call-filter=bpf).
A stand-in for such a container, which these tests cannot start everywhere."""
from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW, EPERM = 0x00050000, 0x7fff0000, 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
BPF_NR = {"x86_64": 321, "aarch64": 280}


def deny_bpf() -> None:
    machine = platform.machine()
    if machine not in BPF_NR:
        raise SystemExit(f"no seccomp recipe for {machine}")

    def stmt(code: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, 0, 0, k)

    def jump(code: int, k: int, jt: int, jf: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    prog = b"".join([
        stmt(BPF_LD_W_ABS, 4),                                   # seccomp_data.arch
        jump(BPF_JEQ_K, AUDIT_ARCH[machine], 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW),                      # another ABI: leave it alone
        stmt(BPF_LD_W_ABS, 0),                                   # seccomp_data.nr
        jump(BPF_JEQ_K, BPF_NR[machine], 0, 1),
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO | EPERM),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
    ])
    buf = ctypes.create_string_buffer(prog)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")


if __name__ == "__main__":
    deny_bpf()
    os.execvp(sys.argv[1], sys.argv[1:])

"""BTF offsets against bpftool's independent reading of the same file, and
the header tree merge that lets BCC compile on a kernel without headers."""
import functools
import os
import re
import struct
import subprocess

import pytest

from vajrad.kernel import environment as kernel
from vajrad.kernel.btf import Btf
from vajrad.errors import KernelSupportError

BTF = "/sys/kernel/btf/vmlinux"
needs_btf = pytest.mark.skipif(not os.path.exists(BTF), reason="kernel has no BTF")


@functools.lru_cache(1)
def bpftool_raw():
    return subprocess.run(["bpftool", "btf", "dump", "file", BTF, "format", "raw"],
                          capture_output=True, text=True, check=True).stdout


def bpftool_member_offset(struct_name, member):
    out = bpftool_raw()
    block = re.search(rf"^\[\d+\] STRUCT '{struct_name}' size=\d+ vlen=\d+\n((?:\t.*\n)+)", out, re.M)
    m = re.search(rf"'{member}' type_id=\d+ bits_offset=(\d+)", block.group(1))
    return int(m.group(1)) // 8


@needs_btf
@pytest.mark.parametrize("struct_name,member", [
    ("task_struct", "real_parent"), ("task_struct", "tgid"), ("task_struct", "mm"),
    ("task_struct", "fs"), ("vfsmount", "mnt_root"), ("mount", "mnt_mountpoint"),
    ("fs_struct", "pwd"), ("dentry", "d_parent"), ("mount", "mnt_parent"),
])
def test_offsets_match_bpftool(struct_name, member):
    assert Btf.from_file(BTF).offsetof(struct_name, member) == bpftool_member_offset(struct_name, member)


@needs_btf
def test_members_inside_anonymous_structs():
    btf = Btf.from_file(BTF)
    # mm_struct's fields sit in an anonymous struct; qstr.len in an anonymous union
    assert btf.offsetof("mm_struct", "arg_start") > 0
    assert btf.offsetof("mm_struct", "arg_end") == btf.offsetof("mm_struct", "arg_start") + 8
    assert btf.offsetof("qstr", "len") in (0, 4)
    assert btf.offsetof("fs_struct", "pwd.dentry") == btf.offsetof("fs_struct", "pwd") + \
        btf.offsetof("path", "dentry")
    with pytest.raises(KernelSupportError, match="no member"):
        btf.offsetof("task_struct", "no_such_member")
    with pytest.raises(KernelSupportError, match="no struct"):
        btf.struct_id("no_such_struct")


def synthetic_btf():
    """struct outer { int a; union { int b; long c; }; } with BTF's layout rules."""
    strings = b"\0int\0long\0outer\0a\0b\0c\0"
    off = {s: strings.index(s.encode() + b"\0") for s in ("int", "long", "outer", "a", "b", "c")}
    types = b""
    types += struct.pack("<III", off["int"], 1 << 24, 4) + struct.pack("<I", 32)            # [1] int
    types += struct.pack("<III", off["long"], 1 << 24, 8) + struct.pack("<I", 64)           # [2] long
    types += struct.pack("<III", 0, (5 << 24) | 2, 8)                                       # [3] union
    types += struct.pack("<III", off["b"], 1, 0) + struct.pack("<III", off["c"], 2, 0)
    types += struct.pack("<III", off["outer"], (4 << 24) | 2, 16)                           # [4] outer
    types += struct.pack("<III", off["a"], 1, 0) + struct.pack("<III", 0, 3, 64)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_synthetic_blob():
    btf = Btf(synthetic_btf())
    assert btf.offsetof("outer", "a") == 0
    assert btf.offsetof("outer", "c") == 8
    with pytest.raises(KernelSupportError, match="magic"):
        Btf(b"\0" * 64)


def test_header_trees_are_merged(tmp_path):
    arch = tmp_path / "src" / "linux-headers-6.1.0-9-amd64"
    common = tmp_path / "src" / "linux-headers-6.1.0-9-common"
    (arch / "include" / "generated").mkdir(parents=True)
    (arch / "include" / "generated" / "autoconf.h").write_text("")
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "sched.h").write_text("")
    (arch / "Makefile").write_text(f"include {common}/Makefile\n")
    pairs = kernel._header_pairs(str(tmp_path / "src"), "-amd64")
    assert pairs == [(str(arch), str(common))]
    dst = tmp_path / "merged"
    kernel.merge_trees(str(dst), [str(arch), str(common)])
    assert (dst / "include" / "generated" / "autoconf.h").exists()
    assert (dst / "include" / "linux" / "sched.h").exists()


def test_a_published_header_tree_is_reused_not_rebuilt_under_another_daemon(tmp_path):
    """Daemons (tests, a second instance) share the runtime dir: one must never
    remove the tree another is compiling against (CI saw kconfig.h vanish)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "include").mkdir(parents=True)
        (d / "include" / f"{d.name}.h").write_text("")
    merged = tmp_path / "run" / "kernel-headers" / "linux-headers-x-amd64"
    kernel._publish_merged(str(merged), [str(a)])
    inode = (merged / "include").stat().st_ino
    kernel._publish_merged(str(merged), [str(a)])        # what a second daemon does
    assert (merged / "include").stat().st_ino == inode
    kernel._publish_merged(str(merged), [str(b)])        # new header sources: replaced
    assert (merged / "include" / "b.h").exists() and not (merged / "include" / "a.h").exists()
    assert sorted(p.name for p in merged.parent.iterdir()) == [merged.name]     # nothing left aside


def test_no_btf_no_headers_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(os.path, "isdir", lambda p: False if p.startswith("/lib/modules") else os.path.exists(p))
    with pytest.raises(KernelSupportError) as e:
        kernel.probe(str(tmp_path), btf_path=str(tmp_path / "none"), headers_root=str(tmp_path))
    assert "install linux-headers-" in str(e.value) and "no BTF" in str(e.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to load BPF")
def test_abi_drift_fails_the_build(monkeypatch):
    """The ctypes mirror and bpf/vajra.h are checked against each other when compiling."""
    from vajrad.kernel import abi as bpf_abi
    from vajrad.kernel.program import BpfProgram
    from vajrad.errors import CollectorError
    kenv = kernel.probe("/run/vajra")
    kernel.ensure_tracefs()
    monkeypatch.setitem(bpf_abi.ABI_CHECKS, "VAJRA_EXPECT_EXEC_EVENT_SIZE",
                        bpf_abi.ABI_CHECKS["VAJRA_EXPECT_EXEC_EVENT_SIZE"] + 8)
    prog = BpfProgram("process.bpf.c", kenv)
    with pytest.raises(CollectorError, match="failed to compile"):
        prog.load()

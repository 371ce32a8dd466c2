"""What the running kernel offers the collectors, and how BCC gets to compile.

No header package matches a self-built or cloud kernel, and offsets compiled
from mismatched headers are wrong. So struct offsets come from BTF, while any
installed header tree of the right architecture is good enough for BCC's own
helper headers. Such a tree is split by Debian into an arch dir and a -common
dir; BCC_KERNEL_SOURCE takes a single dir, so we merge the two with symlinks
in our runtime directory rather than touching /lib/modules.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field

from vajrad.kernel.btf import Btf
from vajrad.errors import KernelSupportError

log = logging.getLogger(__name__)

BTF_PATH = "/sys/kernel/btf/vmlinux"
TRACEFS = "/sys/kernel/tracing"
HEADERS_ROOT = "/usr/src"

# Kernel struct members the BPF programs read: macro suffix -> (struct, member path).
# bpf/vajra.h falls back to offsetof() for each when no -D value is given.
KERNEL_FIELDS: dict[str, tuple[str, str]] = {
    "TASK_REAL_PARENT": ("task_struct", "real_parent"),
    "TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "TASK_SELF_EXEC_ID": ("task_struct", "self_exec_id"),
    "TASK_TGID": ("task_struct", "tgid"),
    "TASK_MM": ("task_struct", "mm"),
    "TASK_FS": ("task_struct", "fs"),
    "MM_ARG_START": ("mm_struct", "arg_start"),
    "MM_ARG_END": ("mm_struct", "arg_end"),
    "MM_EXE_FILE": ("mm_struct", "exe_file"),
    "FILE_F_PATH": ("file", "f_path"),
    "FS_PWD": ("fs_struct", "pwd"),
    "PATH_MNT": ("path", "mnt"),
    "PATH_DENTRY": ("path", "dentry"),
    "DENTRY_D_PARENT": ("dentry", "d_parent"),
    "DENTRY_D_NAME": ("dentry", "d_name"),
    "QSTR_NAME": ("qstr", "name"),
    "QSTR_LEN": ("qstr", "len"),
    "VFSMOUNT_MNT_ROOT": ("vfsmount", "mnt_root"),
    "TASK_PID": ("task_struct", "pid"),
    "TASK_FLAGS": ("task_struct", "flags"),
    "TASK_START_TIME": ("task_struct", "start_time"),
    "TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "TASK_START_BOOTTIME": ("task_struct", "start_boottime"),
    "TASK_EXIT_CODE": ("task_struct", "exit_code"),
    "TASK_CRED": ("task_struct", "cred"),
    "TASK_LOGINUID": ("task_struct", "loginuid"),
    "TASK_SIGNAL": ("task_struct", "signal"),
    "CRED_UID": ("cred", "uid"),
    "CRED_GID": ("cred", "gid"),
    "CRED_EUID": ("cred", "euid"),
    "CRED_EGID": ("cred", "egid"),
    "SIGNAL_LIVE": ("signal_struct", "live"),
    "SIGNAL_PIDS": ("signal_struct", "pids"),
    "SIGNAL_TTY": ("signal_struct", "tty"),
    "TTY_NAME": ("tty_struct", "name"),
    "PID_NUMBERS": ("pid", "numbers"),
    "UPID_NR": ("upid", "nr"),
    # struct mount is private to fs/ and absent from header packages: without
    # BTF the path walk cannot cross mount points (see vajra.h).
    "MOUNT_MNT": ("mount", "mnt"),
    "MOUNT_MNT_PARENT": ("mount", "mnt_parent"),
    "MOUNT_MNT_MOUNTPOINT": ("mount", "mnt_mountpoint"),
    # sockets: fd -> file -> socket -> sock
    "TASK_FILES": ("task_struct", "files"),
    "FILES_FDT": ("files_struct", "fdt"),
    "FDTABLE_FD": ("fdtable", "fd"),
    "FDTABLE_MAX_FDS": ("fdtable", "max_fds"),
    "FILE_F_INODE": ("file", "f_inode"),
    "FILE_PRIVATE_DATA": ("file", "private_data"),
    "INODE_I_MODE": ("inode", "i_mode"),
    "INODE_I_INO": ("inode", "i_ino"),
    "SOCKET_SK": ("socket", "sk"),
    "SOCKET_TYPE": ("socket", "type"),
    "SKC_FAMILY": ("sock_common", "skc_family"),
    "SKC_STATE": ("sock_common", "skc_state"),
    "SKC_DADDR": ("sock_common", "skc_daddr"),
    "SKC_RCV_SADDR": ("sock_common", "skc_rcv_saddr"),
    "SKC_DPORT": ("sock_common", "skc_dport"),
    "SKC_NUM": ("sock_common", "skc_num"),
    "SKC_V6_DADDR": ("sock_common", "skc_v6_daddr"),
    "SKC_V6_RCV_SADDR": ("sock_common", "skc_v6_rcv_saddr"),
    "SKC_NET": ("sock_common", "skc_net"),
    "SK_PROTOCOL": ("sock", "sk_protocol"),
    "UNIX_ADDR": ("unix_sock", "addr"),
    "UNIX_PEER": ("unix_sock", "peer"),
    "UNIX_ADDRESS_LEN": ("unix_address", "len"),
    "UNIX_ADDRESS_NAME": ("unix_address", "name"),
    "NET_NS_INUM": ("net", "ns.inum"),
    # namespaces of the task, for every record's header (containers)
    "TASK_NSPROXY": ("task_struct", "nsproxy"),
    "TASK_THREAD_PID": ("task_struct", "thread_pid"),
    "NSPROXY_MNT_NS": ("nsproxy", "mnt_ns"),
    "NSPROXY_NET_NS": ("nsproxy", "net_ns"),
    "PID_LEVEL": ("pid", "level"),
    "UPID_NS": ("upid", "ns"),
    "PIDNS_INUM": ("pid_namespace", "ns.inum"),
    # struct mnt_namespace is private to fs/, like struct mount
    "MNTNS_INUM": ("mnt_namespace", "ns.inum"),
}

# struct file's reference count was f_count (1 for one reference) until 6.13
# made it f_ref, a file_ref_t that counts from 0: (member, value of one reference).
FILE_REF_LAYOUTS = (("f_ref", 0), ("f_count", 1))


def file_ref_layout(btf: Btf) -> tuple[int, int]:
    """(offset of struct file's reference count, its value for one reference)."""
    for member, one in FILE_REF_LAYOUTS:
        try:
            return btf.offsetof("file", member), one
        except KernelSupportError:
            continue
    raise KernelSupportError(f"{btf.source}: struct file has neither f_ref nor f_count")


def _release_tuple(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release)[:3])


@dataclass
class KernelEnv:
    release: str
    offsets: dict[str, int] = field(default_factory=dict)
    offsets_source: str = ""          # "btf" or "headers"
    headers: str = ""                 # the tree BCC compiles against
    headers_match: bool = False
    has_ringbuf: bool = False
    defines: dict[str, int] = field(default_factory=dict)   # other layout facts, as -D

    @property
    def cflags(self) -> list[str]:
        flags = [f"-DVAJRA_OFF_{k}={v}" for k, v in sorted(self.offsets.items())]
        flags += [f"-D{k}={v}" for k, v in sorted(self.defines.items())]
        if self.offsets_source == "btf":
            flags.append("-DVAJRA_HAVE_MOUNT_LAYOUT=1")
        return flags

    def describe(self) -> dict:
        return {"release": self.release, "offsets": self.offsets_source,
                "headers": self.headers, "headers_match": self.headers_match,
                "output": "ringbuf" if self.has_ringbuf else "perf"}


def ensure_tracefs() -> None:
    """BCC reads tracepoint formats from tracefs; mount it when nobody has."""
    for path in (TRACEFS, "/sys/kernel/debug/tracing"):
        if os.path.exists(os.path.join(path, "events")):
            return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    except OSError as e:
        raise KernelSupportError(
            f"tracefs is not mounted and mounting it on {TRACEFS} failed ({e.strerror}); "
            f"run: mount -t tracefs tracefs {TRACEFS}") from e


def _header_pairs(root: str, arch_suffix: str) -> list[tuple[str, str]]:
    """(arch dir, common dir) of every Debian-style header tree, newest first."""
    found = []
    try:
        names = os.listdir(root)
    except OSError:
        return []
    for name in names:
        arch_dir = os.path.join(root, name)
        if not name.startswith("linux-headers-") or not name.endswith(arch_suffix):
            continue
        if not os.path.isdir(os.path.join(arch_dir, "include", "generated")):
            continue
        common = ""
        try:
            with open(os.path.join(arch_dir, "Makefile")) as f:
                m = re.search(r"^include\s+(\S+)/Makefile", f.read(), re.M)
                common = m.group(1) if m else ""
        except OSError:
            pass
        found.append((arch_dir, common if os.path.isdir(common) else ""))
    found.sort(key=lambda p: _release_tuple(os.path.basename(p[0])[len("linux-headers-"):]),
               reverse=True)
    return found


def merge_trees(dst: str, sources: list[str]) -> None:
    """Symlink-merge directories; the first source wins where names clash."""
    os.makedirs(dst, exist_ok=True)
    entries: dict[str, list[str]] = {}
    for src in sources:
        for name in os.listdir(src):
            entries.setdefault(name, []).append(os.path.join(src, name))
    for name, paths in entries.items():
        if len(paths) > 1 and all(os.path.isdir(p) for p in paths):
            merge_trees(os.path.join(dst, name), paths)
        else:
            os.symlink(os.path.realpath(paths[0]), os.path.join(dst, name))


def _arch_suffix(machine: str) -> str:
    return {"x86_64": "-amd64", "aarch64": "-arm64"}.get(machine, "-" + machine)


# bpf(2)'s number per architecture (Python has no wrapper); BPF_MAP_CREATE = 0.
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351,
               "armv7l": 386, "i686": 357}
BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2


def bpf_refusal() -> str | None:
    """Why the kernel refuses bpf() to this process, or None when it accepts
    it: creates and closes a one-entry array map. A container's seccomp filter
    or missing CAP_BPF shows up here as EPERM, which BCC would otherwise
    report as a compile failure."""
    import ctypes
    import errno
    import struct
    number = BPF_SYSCALL.get(os.uname().machine)
    if number is None:
        return None                 # unknown architecture: let BCC find out
    libc = ctypes.CDLL(None, use_errno=True)
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags
    attr = ctypes.create_string_buffer(struct.pack("=5I", BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0), 128)
    fd = libc.syscall(number, BPF_MAP_CREATE, attr, ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return None
    err = ctypes.get_errno()
    why = {errno.EPERM: "a seccomp filter (as in a container) or missing CAP_BPF/CAP_SYS_ADMIN",
           errno.ENOSYS: "the kernel is built without CONFIG_BPF_SYSCALL"}.get(err, "")
    return f"the kernel refused bpf() ({errno.errorcode.get(err, err)}: {os.strerror(err)})" + \
        (f": {why}" if why else "")


def probe(runtime_dir: str, btf_path: str = BTF_PATH, headers_root: str = HEADERS_ROOT) -> KernelEnv:
    uname = os.uname()
    if refusal := bpf_refusal():
        raise KernelSupportError(f"{refusal}; the eBPF collectors cannot load "
                                 f"(--enable_bpf_events=false runs without them)")
    env = KernelEnv(release=uname.release)
    env.has_ringbuf = _release_tuple(uname.release) >= (5, 8)
    build = f"/lib/modules/{uname.release}/build"
    env.headers_match = os.path.isdir(os.path.join(build, "include"))
    have_btf = os.path.exists(btf_path)

    if have_btf:
        btf = Btf.from_file(btf_path)
        env.offsets = {k: btf.offsetof(s, m) for k, (s, m) in KERNEL_FIELDS.items()}
        env.offsets["FILE_REFS"], env.defines["VAJRA_FILE_ONE_REF"] = file_ref_layout(btf)
        env.defines["VAJRA_SIZEOF_UPID"] = btf.size(btf.struct_id("upid"))
        env.offsets_source = "btf"
    elif env.headers_match:
        # No -D values: vajra.h computes offsetof() from the matching headers.
        env.offsets_source = "headers"
    else:
        raise KernelSupportError(
            f"kernel {uname.release} has no BTF ({btf_path}) and no matching headers ({build}): "
            f"install linux-headers-{uname.release}, or run a kernel built with CONFIG_DEBUG_INFO_BTF=y")

    if env.headers_match:
        env.headers = build
        return env
    pairs = _header_pairs(headers_root, _arch_suffix(uname.machine))
    if not pairs:
        raise KernelSupportError(
            f"no kernel header tree for BCC to compile with ({build} is missing and "
            f"{headers_root} has no linux-headers-*{_arch_suffix(uname.machine)}): "
            f"install linux-headers{_arch_suffix(uname.machine)}")
    arch_dir, common = pairs[0]
    merged = os.path.join(runtime_dir, "kernel-headers", os.path.basename(arch_dir))
    _publish_merged(merged, [d for d in (arch_dir, common) if d])
    env.headers = merged
    os.environ["BCC_KERNEL_SOURCE"] = merged
    log.info("kernel %s has no matching headers: BCC compiles against %s, offsets come from BTF",
             uname.release, os.path.basename(arch_dir))
    return env


def _publish_merged(merged: str, sources: list[str]) -> None:
    """Puts the merged header tree at `merged` without ever removing one that
    another vajrad (a test, a second instance) may be compiling against: a
    tree for the same sources is reused, and a new one is built aside and
    renamed into place."""
    want = "\n".join(sources)

    def published() -> bool:
        try:
            with open(os.path.join(merged, ".vajra-sources")) as f:
                return f.read() == want
        except OSError:
            return False

    if published():
        return
    tmp = f"{merged}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merge_trees(tmp, sources)
    with open(os.path.join(tmp, ".vajra-sources"), "w") as f:
        f.write(want)
    if published():                     # another vajrad was quicker
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = f"{merged}.{os.getpid()}.old"
    try:
        os.rename(merged, old)          # a tree for other sources, or an unfinished one
    except FileNotFoundError:
        old = ""
    try:
        os.rename(tmp, merged)
    except OSError:                     # another vajrad published first: use its tree
        shutil.rmtree(tmp, ignore_errors=True)
    if old:
        shutil.rmtree(old, ignore_errors=True)

"""bpf_file_events through bpf/file.bpf.c: who changed which watched file, and how.

The watch rules live in the program's LPM trie, written from FimRules here;
the kernel drops every call on an unwatched path. What comes up is made exact
here: paths are normalised, and a row gets its category from the same rules
(a row the kernel's coarser view let through is dropped and counted).
"""
from __future__ import annotations

import ctypes
import logging
import os
import posixpath

from vajrad.kernel import abi as bpf_abi

from vajrad.collectors.fim import rules as fim
from vajrad.enrich.containers import CONTAINER_FIELDS
from vajrad.enrich.process_cache import ProcessCache
from vajrad.kernel.program import BpfProgram
from vajrad.kernel.environment import KernelEnv
from vajrad.collectors.bpf import AttributedCollector

log = logging.getLogger(__name__)

TABLE = "bpf_file_events"
TRACEFS_SYSCALLS = "/sys/kernel/tracing/events/syscalls"

_OPEN_FLAGS = (  # (bit, name) of the flags worth naming, x86-64 / generic values
    (0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"), (0o40000, "O_DIRECT"),
    (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"),
    (0o2000000, "O_CLOEXEC"), (0o4000000, "O_SYNC"), (0o10000000, "O_PATH"), (0o20000000, "O_TMPFILE"),
)
_ACCESS_MODES = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR", 3: "O_ACCMODE"}
_AT_FLAGS = ((0x100, "AT_SYMLINK_NOFOLLOW"), (0x200, "AT_REMOVEDIR"), (0x400, "AT_SYMLINK_FOLLOW"),
             (0x1000, "AT_EMPTY_PATH"))
_RENAME_FLAGS = ((1, "RENAME_NOREPLACE"), (2, "RENAME_EXCHANGE"), (4, "RENAME_WHITEOUT"))
_XATTR_FLAGS = ((1, "XATTR_CREATE"), (2, "XATTR_REPLACE"))
OPEN_SYSCALLS = frozenset({"open", "openat", "openat2", "creat"})
_MODE_SYSCALLS = frozenset({"mkdir", "mkdirat", "chmod", "fchmod", "fchmodat", "fchmodat2"})


def _named(value: int, table) -> list[str]:
    names = [name for bit, name in table if value & bit]
    rest = value & ~sum(bit for bit, _ in table)
    return names + ([hex(rest)] if rest else [])


def open_flags_text(flags: int) -> str:
    """O_WRONLY|O_CREAT|O_TRUNC, as strace writes them."""
    return "|".join([_ACCESS_MODES[flags & 3]] + _named(flags & ~3, _OPEN_FLAGS))


def call_flags_text(syscall: str, flags: int, open_flags: int) -> str:
    if syscall in OPEN_SYSCALLS:
        return open_flags_text(open_flags)
    if not flags:
        return ""
    table = _RENAME_FLAGS if syscall == "renameat2" else \
        _XATTR_FLAGS if "setxattr" in syscall and syscall != "setxattrat" else _AT_FLAGS
    return "|".join(_named(flags, table))


def _signed(id32: int) -> int:
    """A uid or gid argument: -1 (leave unchanged) arrives as 0xFFFFFFFF."""
    return -1 if id32 == 0xFFFFFFFF else id32


def normalise(raw: bytes) -> str:
    """An absolute path as text; . and .. resolved lexically, as the kernel
    does for the components the caller wrote."""
    text = raw.decode("utf-8", "surrogateescape")
    if not text:
        return ""
    return posixpath.normpath(text) if ("/." in text or "//" in text or text.endswith("/")) \
        and text.startswith("/") else text


def available_syscalls(names=bpf_abi.FILE_OPTIONAL_SYSCALLS, root: str = TRACEFS_SYSCALLS) -> dict:
    """-D flags for the optional syscalls this kernel has tracepoints for."""
    return {f"VAJRA_HAVE_SYS_{n.upper()}": 1 for n in names
            if os.path.exists(os.path.join(root, f"sys_enter_{n}"))}


class FileCollector(AttributedCollector):
    name = "file"
    tables = (TABLE,)
    table = TABLE

    def __init__(self, kenv: KernelEnv, output: str = "auto", cache: ProcessCache | None = None,
                 rules: fim.FimRules | None = None, containers=None):
        program = BpfProgram("file.bpf.c", kenv, output, available_syscalls(),
                             tail_calls={"file_progs": ("file_decide",)})
        super().__init__(program, cache)
        self.use_containers(containers)
        self.rules = rules or fim.FimRules()
        self._installed: dict[bytes, bpf_abi.FimKey] = {}
        self.filtered_in_userspace = 0

    # --- rules ----------------------------------------------------------------
    async def prepare(self) -> None:
        self.apply(self.rules)

    def reconfigure(self, config) -> None:
        """New rules, in place: entries are added before stale ones go, so a
        path watched before and after is never unwatched in between."""
        if config.fim != self.rules and self.program.bpf is not None:
            self.apply(config.fim)
        self.rules = config.fim

    def apply(self, rules: fim.FimRules) -> None:
        bpf = self.program.bpf
        trie, settings = bpf["fim_rules"], bpf["fim_settings"]
        wanted: dict[bytes, bpf_abi.FimKey] = {}
        entries = rules.kernel_entries()
        for entry in entries:
            key = bpf_abi.FimKey()
            raw = entry.key[:bpf_abi.FIM_KEY_MAX]
            key.prefixlen = len(raw) * 8
            ctypes.memmove(ctypes.addressof(key) + bpf_abi.FimKey.data.offset, raw, len(raw))
            leaf = bpf_abi.FimRule(entry.kind, entry.length, int(entry.access), 0)
            trie[key] = leaf
            wanted[entry.key] = key
        for stale in set(self._installed) - set(wanted):
            try:
                del trie[self._installed[stale]]
            except KeyError:
                pass
        self._installed = wanted
        access_any = any(e.access for e in entries)
        settings[ctypes.c_int(bpf_abi.FIM_SELF_TGID)] = ctypes.c_uint32(os.getpid())
        settings[ctypes.c_int(bpf_abi.FIM_ACCESS_ANY)] = ctypes.c_uint32(int(access_any))
        settings[ctypes.c_int(bpf_abi.FIM_ENABLED)] = ctypes.c_uint32(int(bool(rules)))
        log.info("file integrity rules: %d patterns, %d kernel entries%s", len(rules.includes),
                 len(wanted), ", reads recorded for " + ", ".join(sorted(rules.accesses))
                 if rules.accesses else "")

    # --- records ------------------------------------------------------------------
    def decode(self, buf, off: int, size: int) -> tuple[dict, tuple] | None:
        (_, flags, ktime, start, pstart, pid, tid, ppid, uid, gid, _euid, _egid, _auid, _sid, exec_id,
         cgroup, _tty, pid_ns, mnt_ns, net_ns, duration, ret, syscall, oflags, mode, ouid, ogid, _fd, cflags, matched,
         ps, pe, ds, de, _pos, _pad2) = bpf_abi.FILE_EVENT.unpack_from(buf, off)
        data = off + bpf_abi.FILE_DATA_OFFSET
        file_path = normalise(bytes(buf[data + ps:data + pe]))
        dest_raw = bytes(buf[data + ds:data + de]) if de > ds else b""
        name = bpf_abi.FILE_SYSCALLS.get(syscall, str(syscall))
        symlink = name.startswith("symlink")
        chown = "chown" in name
        dest = dest_raw.decode("utf-8", "surrogateescape") if symlink else normalise(dest_raw)
        read_only = name in OPEN_SYSCALLS and not oflags & 0o1103
        rules = self.rules
        category = rules.classify(file_path, access=read_only)
        if category is None and dest and not symlink:
            category = rules.classify(dest)
        if category is None:        # the kernel's view is a superset (.., level rules, long paths)
            self.filtered_in_userspace += 1
            return None
        row = {
            "tid": tid, "pid": pid, "parent": ppid, "uid": uid, "gid": gid, "cid": cgroup,
            "syscall": name, "path": "", "cmdline": "", "file_path": file_path, "dest_path": dest,
            "flags": call_flags_text(name, cflags, oflags),
            "mode": f"{mode:04o}" if name in _MODE_SYSCALLS or (name in OPEN_SYSCALLS and oflags & 0o20000100)
            else "",
            "owner_uid": _signed(ouid) if chown else None, "owner_gid": _signed(ogid) if chown else None,
            "category": category, "exit_code": str(ret), "probe_error": flags & 0xF,
            "duration": duration, "ancestry": "[]", "ntime": str(ktime),
            "time": (ktime + self.clock.offset_ns) // 1_000_000_000,
            **dict(zip(CONTAINER_FIELDS, self.resolve_container(cgroup, pid)[0])),
            "pid_namespace": pid_ns, "mnt_namespace": mnt_ns, "net_namespace": net_ns,
        }
        return row, (pid, start, ppid, pstart, ktime, exec_id)

    def kernel_counters(self) -> dict:
        if self.program.bpf is None:
            return {}
        totals = [sum(per_cpu) for per_cpu in self.program.bpf["fim_counters"].values()]
        return {"kernel_checked": totals[bpf_abi.FIM_CHECKED], "kernel_matched": totals[bpf_abi.FIM_MATCHED]}

    def stats(self) -> dict:
        s = super().stats()
        s.update(self.kernel_counters())
        s["filtered_in_userspace"] = self.filtered_in_userspace
        s["rules"] = len(self._installed)
        return s

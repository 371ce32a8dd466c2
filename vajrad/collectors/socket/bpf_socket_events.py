"""Socket events through bpf/socket.bpf.c: rows of bpf_socket_events, each
attributed to its process (path and ancestry from the ProcessCache), and the
open-socket state behind vajra_open_sockets."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket as _socket
import threading
import time

from vajrad.kernel import abi as bpf_abi

from vajrad.collectors.socket import sockdiag
from vajrad.enrich.containers import CONTAINER_FIELDS, HOST
from vajrad.enrich.process_cache import ProcessCache
from vajrad.kernel.program import BpfProgram
from vajrad.kernel.environment import KernelEnv
from vajrad.collectors.bpf import AttributedCollector, MonotonicClock

log = logging.getLogger(__name__)

TABLE = "bpf_socket_events"
OPEN_TABLE = "vajra_open_sockets"
AF_UNIX, AF_INET, AF_INET6 = _socket.AF_UNIX, _socket.AF_INET, _socket.AF_INET6
PRUNE_EVERY = 60.0
_ntop = _socket.inet_ntop
_U16 = int.from_bytes


def inet_text(family: int, raw: bytes) -> str:
    """An address as text: dotted IPv4, canonical IPv6 (RFC 5952, so a
    v4-mapped address reads ::ffff:a.b.c.d)."""
    if family == AF_INET:
        return _ntop(AF_INET, raw[:4])
    if family == AF_INET6:
        return _ntop(AF_INET6, raw[:16])
    return ""


def user_sockaddr(raw: bytes, length: int) -> tuple[int, str, int]:
    """(family, address, port) of a sockaddr the caller passed."""
    if length < 2:
        return 0, "", 0
    family = _U16(raw[:2], "little")
    if family == AF_INET and length >= 8:
        return family, _ntop(AF_INET, raw[4:8]), _U16(raw[2:4], "big")
    if family == AF_INET6 and length >= 24:
        return family, _ntop(AF_INET6, raw[8:24]), _U16(raw[2:4], "big")
    if family == AF_UNIX:
        return family, sockdiag.unix_path_text(raw[2:length]), 0
    return family, "", 0


class OpenSockets:
    """Sockets known to be open, by inode: seeded from sock_diag and /proc
    when the collector starts, then kept by the events. A close reads what the
    kernel still holds; this fills in what it no longer does (a Unix peer that
    went first)."""

    def __init__(self):
        self.by_inode: dict[int, dict] = {}
        self.lock = threading.Lock()
        self.seeded = 0

    def seed(self) -> int:
        found = sockdiag.snapshot()
        for inode, owners in sockdiag.owners().items():
            if inode in found:
                found[inode]["owners"] = set(owners)
        for entry in found.values():
            entry.setdefault("owners", set())
        with self.lock:
            for inode, entry in found.items():
                self.by_inode.setdefault(inode, entry)
        self.seeded = len(found)
        return self.seeded

    def opened(self, inode: int, row: dict, state: str, pid: int, fd: int) -> None:
        entry = self.by_inode.get(inode)
        if entry is None:
            entry = self.by_inode[inode] = {"owners": set()}
        entry.update(family=row["family"], protocol=row["protocol"],
                     local_address=row["local_address"], local_port=row["local_port"],
                     remote_address=row["remote_address"], remote_port=row["remote_port"],
                     path=row["local_address"] if row["family"] == AF_UNIX else "",
                     state=state, net_namespace=row["net_namespace"])
        entry["owners"].add((pid, fd))

    def closed(self, inode: int, row: dict, pid: int, fd: int, last: bool) -> None:
        """A close: what the kernel has already released is filled in from
        what was tracked. A TCP socket that reached CLOSE (the peer's FIN, then
        its RST) has given its local port back (inet_put_port zeroes it); a
        Unix socket whose peer went first has no peer."""
        entry = self.by_inode.pop(inode, None) if last else self.by_inode.get(inode)
        if entry is None:
            return
        entry["owners"].discard((pid, fd))
        if not row["remote_address"] and entry.get("remote_address"):
            row["remote_address"] = entry["remote_address"]
            row["remote_port"] = entry["remote_port"]
        elif not row["remote_port"] and entry.get("remote_port") and row["remote_address"] == entry["remote_address"]:
            row["remote_port"] = entry["remote_port"]
        if entry.get("local_port") and not row["local_port"] and row["family"] != AF_UNIX:
            row["local_port"] = entry["local_port"]
            if not row["local_address"] or row["local_address"] in ("0.0.0.0", "::"):
                row["local_address"] = entry["local_address"]
        elif not row["local_address"] and entry.get("local_address"):
            row["local_address"] = entry["local_address"]

    def prune(self) -> None:
        """Drops owners that no longer hold the socket (an exit closes fds
        without close()), and sockets nobody holds."""
        with self.lock:
            items = list(self.by_inode.items())
        gone = []
        for inode, entry in items:
            link = f"socket:[{inode}]"
            for pid, fd in list(entry["owners"]):
                try:
                    held = os.readlink(f"/proc/{pid}/fd/{fd}") == link
                except OSError:
                    held = False
                if not held:
                    entry["owners"].discard((pid, fd))
            if not entry["owners"]:
                gone.append(inode)
        with self.lock:
            for inode in gone:
                if not self.by_inode.get(inode, {"owners": ()})["owners"]:
                    self.by_inode.pop(inode, None)

    def rows(self, cache: ProcessCache) -> list[dict]:
        """vajra_open_sockets: this namespace's sockets as sock_diag has them
        now, owners from /proc; other namespaces' sockets as the events left them."""
        self.prune()
        fresh = sockdiag.snapshot()
        holders = sockdiag.owners()
        here = sockdiag.net_namespace()
        with self.lock:
            elsewhere = {i: dict(e, owners=set(e["owners"])) for i, e in self.by_inode.items()
                         if e.get("net_namespace") != here}
        out = []
        for inode, entry in list(fresh.items()) + list(elsewhere.items()):
            owners = holders.get(inode) or sorted(entry.get("owners", ()))
            for pid, fd in owners:
                out.append({"pid": pid, "fd": fd, "socket": inode, "family": entry["family"],
                            "protocol": entry["protocol"], "local_address": entry["local_address"],
                            "remote_address": entry["remote_address"], "local_port": entry["local_port"],
                            "remote_port": entry["remote_port"], "path": entry["path"],
                            "state": entry["state"], "net_namespace": entry["net_namespace"]})
        ancestry = cache.ancestry_by_pid({r["pid"] for r in out})
        for r in out:
            r["ancestry"] = ancestry.get(r["pid"], "[]")
        out.sort(key=lambda r: (r["pid"], r["fd"]))
        return out


class SocketDecoder:
    def __init__(self, clock: MonotonicClock, open_sockets: OpenSockets, resolve_container=None):
        self.clock, self.open = clock, open_sockets
        self.resolve_container = resolve_container or (lambda cgroup_id, pid=0: (HOST, True))

    def row(self, buf, off: int, size: int) -> tuple[dict, tuple]:
        """The row, but for who (path, ancestry): that waits for attribute()."""
        (_, flags, ktime, start, pstart, pid, tid, ppid, uid, gid, _euid, _egid, _auid, _sid, exec_id, cgroup,
         _tty, pid_ns, mnt_ns, _task_net_ns, duration, inode, ret, fd, syscall, net_ns, family, stype, protocol, state, lport, rport,
         laddr, raddr, ualen, lplen, rplen, uaddr, lpath, rpath) = bpf_abi.SOCK_EVENT.unpack_from(buf, off)
        name = bpf_abi.SOCK_SYSCALLS[syscall]
        u_family, u_address, u_port = user_sockaddr(uaddr, ualen) if ualen else (0, "", 0)
        if not inode:                       # the fd held no socket: what the caller asked for
            family = u_family
        if family == AF_UNIX:
            local = sockdiag.unix_path_text(lpath[:lplen])
            remote = sockdiag.unix_path_text(rpath[:rplen])
            lport = rport = 0
        elif inode:
            local, remote = inet_text(family, laddr), inet_text(family, raddr)
        else:
            local = remote = ""
        if syscall == bpf_abi.SYS_CONNECT and ualen:
            remote, rport = u_address, u_port
        elif syscall == bpf_abi.SYS_BIND and (ret < 0 or not inode) and ualen:
            local, lport = u_address, u_port
        if ret >= 0:
            status = "succeeded"
        elif syscall == bpf_abi.SYS_CONNECT and ret == -errno.EINPROGRESS:
            status = "in_progress"
        else:
            status = "failed"
        if syscall == bpf_abi.SYS_CLOSE:
            duration = duration if flags & bpf_abi.SF_START_SEEN else None
        row = {
            "tid": tid, "pid": pid, "parent": ppid, "uid": uid, "gid": gid, "cid": cgroup,
            "exit_code": str(ret), "probe_error": flags & 0xF, "syscall": name,
            "path": "", "fd": fd, "family": family, "type": stype,
            "protocol": protocol, "local_address": local, "remote_address": remote,
            "local_port": lport, "remote_port": rport, "duration": duration, "status": status,
            "socket": remote if syscall == bpf_abi.SYS_CONNECT and family == AF_UNIX else
            (local if family == AF_UNIX else ""),
            "net_namespace": net_ns, "ancestry": "[]", "ntime": str(ktime),
            "time": (ktime + self.clock.offset_ns) // 1_000_000_000,
            **dict(zip(CONTAINER_FIELDS, self.resolve_container(cgroup, pid)[0])),
            "pid_namespace": pid_ns, "mnt_namespace": mnt_ns,
        }
        if inode:
            track = self.open
            with track.lock:
                if syscall == bpf_abi.SYS_CLOSE:
                    track.closed(inode, row, pid, fd, bool(flags & bpf_abi.SF_LAST_REF))
                elif ret >= 0 or status == "in_progress":
                    # A non-blocking connect (nc, curl, Go, Java) is open from
                    # its EINPROGRESS on, with its local end already bound.
                    held_as = ret if syscall in (bpf_abi.SYS_ACCEPT, bpf_abi.SYS_ACCEPT4) else fd
                    track.opened(inode, row, sockdiag.TCP_STATES.get(state, str(state)), pid, held_as)
        return row, (pid, start, ppid, pstart, ktime, exec_id)


class SocketCollector(AttributedCollector):
    name = "socket"
    tables = (TABLE,)
    table = TABLE

    def __init__(self, kenv: KernelEnv, output: str = "auto", cache: ProcessCache | None = None,
                 containers=None):
        super().__init__(BpfProgram("socket.bpf.c", kenv, output), cache)
        self.open_sockets = OpenSockets()
        self.use_containers(containers)
        self.decoder = SocketDecoder(self.clock, self.open_sockets, self.resolve_container)
        self._pruned = time.monotonic()

    def decode(self, buf, off: int, size: int) -> tuple[dict, tuple]:
        return self.decoder.row(buf, off, size)

    async def prepare(self) -> None:
        # After attaching: a socket opened in between is in both, which is harmless.
        try:
            seeded = await asyncio.to_thread(self.open_sockets.seed)
            log.info("socket state seeded with %d open sockets", seeded)
        except Exception as e:      # netlink refused (a restricted container): events still flow
            log.warning("socket state not seeded from sock_diag: %s", e)

    def _poll_once(self) -> None:
        super()._poll_once()
        if time.monotonic() - self._pruned > PRUNE_EVERY:
            self._pruned = time.monotonic()
            self.open_sockets.prune()

    def snapshots(self) -> dict:
        return {OPEN_TABLE: lambda: self.open_sockets.rows(self.cache)}

    def stats(self) -> dict:
        s = super().stats()
        s["open_sockets"] = len(self.open_sockets.by_inode)
        s["seeded"] = self.open_sockets.seeded
        return s

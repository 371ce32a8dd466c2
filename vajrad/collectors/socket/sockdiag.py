"""The sockets open right now, from the kernel's sock_diag (through
pyroute2) and /proc: what the socket collector knows about sockets older
than the daemon, and what vajra_open_sockets reads."""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

# TCP state numbers as the kernel has them (include/net/tcp_states.h); sock_diag
# reports AF_UNIX sockets in the same numbering.
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}
INET_QUERIES = ((socket.AF_INET, socket.IPPROTO_TCP), (socket.AF_INET6, socket.IPPROTO_TCP),
                (socket.AF_INET, socket.IPPROTO_UDP), (socket.AF_INET6, socket.IPPROTO_UDP))


def unix_path_text(raw: bytes) -> str:
    """sun_path bytes as text; an abstract name (leading NUL) as @name, as ss shows it."""
    if not raw:
        return ""
    if raw[0] == 0:
        return "@" + raw[1:].decode("utf-8", "backslashreplace")
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def net_namespace() -> int:
    """Inode of this process's network namespace: the one sock_diag sees."""
    return os.stat("/proc/self/ns/net").st_ino


def snapshot() -> dict[int, dict]:
    """Every TCP, UDP and Unix socket of this network namespace, by inode."""
    from pyroute2 import DiagSocket       # imported late: only the socket collector needs it
    found: dict[int, dict] = {}
    ns = net_namespace()
    with DiagSocket() as diag:
        diag.bind()
        for family, protocol in INET_QUERIES:
            for r in diag.get_sock_stats(family=family, protocol=protocol):
                inode = r["idiag_inode"]
                if not inode:           # TIME_WAIT and the like: no longer anybody's socket
                    continue
                found[inode] = {
                    "family": family, "protocol": protocol,
                    "local_address": r["idiag_src"], "local_port": r["idiag_sport"],
                    "remote_address": r["idiag_dst"], "remote_port": r["idiag_dport"],
                    "path": "", "state": TCP_STATES.get(r["idiag_state"], str(r["idiag_state"])),
                    "net_namespace": ns,
                }
        unix = diag.get_sock_stats(family=socket.AF_UNIX)
    names, peers = {}, {}
    for r in unix:
        attrs = dict((k, v) for k, v in r["attrs"])
        name = attrs.get("UNIX_DIAG_NAME", "")
        if isinstance(name, (bytes, bytearray)):
            name = unix_path_text(bytes(name))
        elif name.startswith("\0"):
            name = "@" + name[1:]
        names[r["udiag_ino"]] = name
        peers[r["udiag_ino"]] = attrs.get("UNIX_DIAG_PEER", 0)
        found[r["udiag_ino"]] = {
            "family": socket.AF_UNIX, "protocol": 0,
            "local_address": name, "local_port": 0, "remote_address": "", "remote_port": 0,
            "path": name, "state": TCP_STATES.get(r["udiag_state"], str(r["udiag_state"])),
            "net_namespace": ns,
        }
    for inode, peer in peers.items():
        if peer:
            found[inode]["remote_address"] = names.get(peer, "")
    return found


def owners(proc: str = "/proc") -> dict[int, list[tuple[int, int]]]:
    """Socket inode -> [(pid, fd)] for every process, from /proc/*/fd."""
    found: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        base = f"{proc}/{name}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        pid = int(name)
        for fd in fds:
            try:
                target = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found.setdefault(int(target[8:-1]), []).append((pid, int(fd)))
    return found

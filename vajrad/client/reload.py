"""`python3 -m vajrad.client.reload MAINPID`: the unit's ExecReload.

Sends vajrad SIGHUP and returns only once vajrad has finished the reload,
exit status 0 when the new configuration is in force and 1 when vajrad kept
the running one (the file was rejected; the reason is in vajrad's log and
printed here). Debian 12's systemd (252) predates Type=notify-reload, and a
bare `kill -HUP` would let `systemctl reload` return before anything was
re-read.

It asks the very process it signals: the API socket is found among that
process's own listening Unix sockets (/proc/PID/fd and /proc/net/unix), so a
non-default `api_socket` needs no configuration here.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from vajrad.client.connection import VajraClient
from vajrad.errors import VajraError

TIMEOUT = 120.0          # a reload that starts the file collector compiles BPF
POLL = 0.1
SO_ACCEPTCON = 1 << 16   # __SO_ACCEPTCON in /proc/net/unix's Flags: listening


def listening_sockets(pid: int) -> list[str]:
    """Paths of the Unix sockets process `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]
            if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & SO_ACCEPTCON \
                    and fields[7].startswith("/"):
                found.append(fields[7])
    return found


def reload(pid: int, timeout: float = TIMEOUT) -> tuple[bool, str]:
    sockets = listening_sockets(pid)
    if not sockets:
        return False, f"process {pid} listens on no Unix socket: is it vajrad?"
    with VajraClient(sockets[0], timeout=10).connect() as client:
        before = client.call("status")["reload"]["count"]
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            state = client.call("status")["reload"]
            if state["count"] > before:
                return state["result"] == "ok", state["result"]
            if time.monotonic() > deadline:
                return False, f"vajrad {pid} did not finish reloading within {timeout:.0f} s"
            time.sleep(POLL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python3 -m vajrad.client.reload MAINPID", file=sys.stderr)
        return 2
    try:
        ok, result = reload(int(argv[0]))
    except (OSError, VajraError, KeyError) as e:
        print(f"vajrad reload: {e}", file=sys.stderr)
        return 1
    print(f"vajrad reload: {result}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

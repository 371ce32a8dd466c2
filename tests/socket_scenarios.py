"""Real clients and servers for tests/test_socket_events.py, each run in a
process of its own so that its rows are told apart by pid. Prints what the
rows must show (ports, fds) as one JSON line."""
from __future__ import annotations

import json
import os
import socket
import sys


def fd(s: socket.socket) -> int:
    return s.fileno()


def tcp(family: int, host: str, listen_host: str | None = None) -> dict:
    srv = socket.socket(family)
    srv.bind((listen_host or host, 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.socket(socket.AF_INET if "." in host else socket.AF_INET6)
    cli.connect((host, port))
    conn, _ = srv.accept()
    out = {"pid": os.getpid(), "port": port, "client_port": cli.getsockname()[1],
           "srv": fd(srv), "cli": fd(cli), "conn": fd(conn)}
    cli.close()
    conn.close()
    srv.close()
    return out


def refused() -> dict:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]       # bound, never listening: a connect is refused
    cli = socket.socket()
    out = {"pid": os.getpid(), "port": port, "cli": fd(cli), "errno": cli.connect_ex(("127.0.0.1", port))}
    cli.close()
    probe.close()
    return out


def nonblocking() -> dict:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.socket()
    cli.setblocking(False)
    out = {"pid": os.getpid(), "port": srv.getsockname()[1], "cli": fd(cli),
           "errno": cli.connect_ex(("127.0.0.1", srv.getsockname()[1]))}
    cli.close()
    srv.close()
    return out


def udp() -> dict:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.connect(("127.0.0.1", port))
    cli.send(b"connected")
    lone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lone.sendto(b"unconnected", ("127.0.0.1", port))
    out = {"pid": os.getpid(), "port": port, "srv": fd(srv), "cli": fd(cli), "lone": fd(lone),
           "client_port": cli.getsockname()[1], "lone_port": lone.getsockname()[1]}
    srv.recv(64), srv.recv(64)
    cli.close()
    lone.close()
    srv.close()
    return out


def unix(path: str) -> dict:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    cli = socket.socket(socket.AF_UNIX)
    cli.connect(path)
    conn, _ = srv.accept()
    out = {"pid": os.getpid(), "srv": fd(srv), "cli": fd(cli), "conn": fd(conn)}
    cli.close()
    conn.close()
    srv.close()
    os.unlink(path)
    return out


def hold(ready_file: str) -> None:
    """A connection made before the daemon starts, closed when stdin says so."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    with open(ready_file + ".tmp", "w") as f:       # renamed into place: never read half-written
        json.dump({"pid": os.getpid(), "port": srv.getsockname()[1], "client_port": cli.getsockname()[1],
                   "cli": fd(cli), "conn": fd(conn), "srv": fd(srv)}, f)
    os.rename(ready_file + ".tmp", ready_file)
    sys.stdin.readline()
    cli.close()
    conn.close()
    srv.close()


def peer_first() -> dict:
    """Two clients whose peer closes first: one then closes in CLOSE_WAIT;
    the other writes into the closed connection, gets the peer's RST (the
    kernel then gives its local port back), and closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    out = {"pid": os.getpid(), "port": port, "srv": fd(srv)}
    for name in ("waiting", "reset"):
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        out[name], out[name + "_port"] = fd(cli), cli.getsockname()[1]
        conn.close()                            # the peer's FIN
        assert cli.recv(16) == b""
        if name == "reset":
            cli.send(b"x")                      # answered by an RST
            try:
                while True:
                    cli.send(b"x")
            except OSError as e:
                out["reset_errno"] = e.errno
        cli.close()
    srv.close()
    return out


def hold_connecting(ready_file: str, blackhole: str) -> None:
    """Non-blocking connects left in progress (to an address nobody answers)
    and one to a listener here, held until stdin gets a line."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    out = {"pid": os.getpid(), "port": srv.getsockname()[1], "srv": fd(srv), "pending": []}
    for _ in range(2):
        cli = socket.socket()
        cli.setblocking(False)
        out["pending"].append({"fd": fd(cli), "errno": cli.connect_ex((blackhole, 9)),
                               "local_port": cli.getsockname()[1]})
        out.setdefault("held", []).append(cli)
    cli = socket.socket()
    cli.setblocking(False)
    out["loop"] = {"fd": fd(cli), "errno": cli.connect_ex(("127.0.0.1", out["port"])),
                   "local_port": cli.getsockname()[1]}
    held = out.pop("held") + [cli]
    with open(ready_file + ".tmp", "w") as f:
        json.dump(out, f)
    os.rename(ready_file + ".tmp", ready_file)
    sys.stdin.readline()
    for s in held:
        s.close()
    srv.close()


def file_closes(path: str, count: int) -> dict:
    for _ in range(count):
        os.close(os.open(path, os.O_RDONLY))
    return {"pid": os.getpid()}


SCENARIOS = {
    "tcp4": lambda: tcp(socket.AF_INET, "127.0.0.1"),
    "tcp6": lambda: tcp(socket.AF_INET6, "::1"),
    "dual": lambda: tcp(socket.AF_INET6, "127.0.0.1", "::"),
    "refused": refused, "nonblocking": nonblocking, "udp": udp,
    "unix": lambda: unix(sys.argv[2]),
    "files": lambda: file_closes(sys.argv[2], int(sys.argv[3])),
    "peer_first": peer_first,
}

if __name__ == "__main__":
    if sys.argv[1] == "hold":
        hold(sys.argv[2])
    elif sys.argv[1] == "hold_connecting":
        hold_connecting(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps(SCENARIOS[sys.argv[1]]()), flush=True)

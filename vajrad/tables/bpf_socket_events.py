"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import (BIGINT, CALLER_COLUMNS, CONTAINER_COLUMNS, INTEGER,
                           PID_MNT_NAMESPACE_COLUMNS, TEXT, Column, Table)

TABLE = Table.events(
    "bpf_socket_events",
    "Socket activity, captured in the kernel by eBPF tracepoints: connect, accept, accept4, bind, "
    "listen and close of TCP, UDP and Unix sockets, each with both ends as the kernel held them.",
    (
        *CALLER_COLUMNS,
        Column("exit_code", TEXT, "The syscall's return value: 0, the new fd (accept), or -errno"),
        Column("probe_error", INTEGER, "8 when the kernel side could not read the socket"),
        Column("syscall", TEXT, "connect, accept, accept4, bind, listen or close"),
        Column("path", TEXT, "Path of the caller's executable"),
        Column("fd", BIGINT, "The fd the call was given (accept: the listening socket; the new "
                             "connection's fd is exit_code)"),
        Column("family", INTEGER, "Address family: 1 AF_UNIX, 2 AF_INET, 10 AF_INET6"),
        Column("type", INTEGER, "Socket type: 1 SOCK_STREAM, 2 SOCK_DGRAM, 5 SOCK_SEQPACKET"),
        Column("protocol", INTEGER, "Protocol: 6 TCP, 17 UDP, 0 for Unix sockets"),
        Column("local_address", TEXT, "Local address (IPv6 canonical, a v4-mapped address as "
                                      "::ffff:a.b.c.d); for Unix sockets, the socket's own path"),
        Column("remote_address", TEXT, "Remote address; for Unix sockets, the peer's path"),
        Column("local_port", INTEGER, "Local port"),
        Column("remote_port", INTEGER, "Remote port"),
        Column("duration", INTEGER, "ns spent in the syscall; for close, the socket's lifetime in ns "
                                    "(NULL when its creation was not seen)"),
        Column("status", TEXT, "succeeded, failed, or in_progress (a non-blocking connect)"),
        Column("socket", TEXT, "Unix sockets: the path connected to (connect) or bound (others); "
                               "an abstract name reads @name"),
        Column("net_namespace", BIGINT, "Inode of the socket's network namespace "
                                        "(compare with /proc/PID/ns/net)"),
        Column("ancestry", TEXT, "JSON array of the caller's ancestors, [0] the immediate parent "
                                 "(as in bpf_process_events)", shared=True),
        Column("ntime", TEXT, "Event timestamp in ns, from the kernel's monotonic clock"),
        *CONTAINER_COLUMNS,
        *PID_MNT_NAMESPACE_COLUMNS,
    ),
    notes={
        "connect": "at the syscall's exit. remote_* is the address the caller gave; local_* is what "
                   "the kernel bound. A non-blocking connect is in_progress (-115, EINPROGRESS).",
        "accept, accept4": "at the syscall's exit, describing the new connection: both ends. A "
                           "non-blocking accept that found nothing waiting (EAGAIN) is not a row.",
        "bind": "at the syscall's exit: the bound address (the requested one when bind failed).",
        "listen": "at the syscall's exit: the address and port the socket listens on.",
        "close": "at the syscall's entry, only for sockets (other closes are dropped in the kernel): "
                 "both ends and the socket's lifetime. Sockets closed by exit, exec or dup2 make no row.",
        "sendto, sendmsg": "not recorded: a UDP socket that sends without connect() shows up at "
                           "its close, with the local address the kernel chose and no remote end.",
    },
)

"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import BIGINT, INTEGER, TEXT, Column, Table

TABLE = Table(
    "vajra_open_sockets",
    "Sockets open now, one row per process and fd, modelled on osquery's process_open_sockets: "
    "this network namespace's TCP, UDP and Unix sockets from sock_diag, plus sockets in other "
    "namespaces that socket events showed. Live.",
    (
        Column("pid", INTEGER, "Process ID holding the socket"),
        Column("fd", BIGINT, "The fd it holds the socket as"),
        Column("socket", BIGINT, "The socket's inode"),
        Column("family", INTEGER, "Address family: 1 AF_UNIX, 2 AF_INET, 10 AF_INET6"),
        Column("protocol", INTEGER, "Protocol: 6 TCP, 17 UDP, 0 for Unix sockets"),
        Column("local_address", TEXT, "Local address; for Unix sockets, the bound path"),
        Column("remote_address", TEXT, "Remote address; for Unix sockets, the peer's path"),
        Column("local_port", INTEGER, "Local port"),
        Column("remote_port", INTEGER, "Remote port"),
        Column("path", TEXT, "Unix sockets: the bound path"),
        Column("state", TEXT, "TCP state (LISTEN, ESTABLISHED, ...); Unix sockets in the same terms"),
        Column("net_namespace", BIGINT, "Inode of the socket's network namespace"),
        Column("ancestry", TEXT, "JSON array of the holder's ancestors, [0] the immediate parent"),
    ),
    evented=False,
)

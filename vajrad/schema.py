"""Table declarations: the one source of truth for every surface.

Each table lives in its own module under vajrad/tables/, in the spirit of
osquery's specs/*.table files; `vajrad.tables.TABLES` collects them. This
module only defines what a declaration is made of, so a table module imports
it without a cycle. The store, the socket, D-Bus, vajractl and the
osquery shim all read these objects; none of them lists columns itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TEXT, INTEGER, BIGINT, UNSIGNED_BIGINT, DOUBLE = "TEXT", "INTEGER", "BIGINT", "UNSIGNED_BIGINT", "DOUBLE"
_SQLITE_AFFINITY = {TEXT: "TEXT", INTEGER: "INTEGER", BIGINT: "INTEGER",
                    UNSIGNED_BIGINT: "INTEGER", DOUBLE: "REAL"}
# osquery's ColumnOptions bits, as the extension protocol carries them.
OPT_INDEX, OPT_REQUIRED, OPT_ADDITIONAL, OPT_OPTIMIZED, OPT_HIDDEN = 1, 2, 4, 8, 16


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    index: bool = False
    additional: bool = False
    hidden: bool = False
    # Stored once per distinct value, in a side table the rows point into;
    # for large values that many rows repeat (ancestry).
    shared: bool = False

    def __post_init__(self):
        if self.type not in _SQLITE_AFFINITY:
            raise ValueError(f"column {self.name}: unknown type {self.type}")
        if self.shared and self.type != TEXT:
            raise ValueError(f"column {self.name}: only TEXT columns can be shared")

    @property
    def sqlite_type(self) -> str:
        return _SQLITE_AFFINITY[self.type]

    @property
    def is_integer(self) -> bool:
        return self.sqlite_type == "INTEGER"

    @property
    def options(self) -> int:
        return ((OPT_INDEX if self.index else 0) | (OPT_ADDITIONAL if self.additional else 0)
                | (OPT_HIDDEN if self.hidden else 0))

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "description": self.description,
                "hidden": self.hidden, "additional": self.additional, "index": self.index}


# osquery core has tables of its own under some of our names (file_events,
# process_events, and bpf_* ones in older builds) and refuses an extension
# table of the same name: the osquery shim registers every table as
# `vajra_<name>` (docs/osquery.md).
OSQUERY_PREFIX = "vajra_"

# Columns every event table carries, declared once.
EVENT_COLUMNS = (
    Column("host_identifier", TEXT, "Identifier of the host that recorded the event (--host_identifier)"),
    Column("is_open", INTEGER, "1 when the event awaits triage (an alert), 0 for plain telemetry"),
    Column("time", BIGINT, "Time of the event, unix seconds", additional=True),
    Column("eid", INTEGER, "Event ID, monotonic per table across restarts", hidden=True),
)
EVENT_COLUMN_NAMES = frozenset(c.name for c in EVENT_COLUMNS)

# Who made a call, for the tables of syscalls (sockets, files).
CALLER_COLUMNS = (
    Column("tid", BIGINT, "Thread ID of the caller"),
    Column("pid", BIGINT, "Process ID of the caller"),
    Column("parent", BIGINT, "Process ID of the caller's real parent"),
    Column("uid", BIGINT, "Real user ID of the caller"),
    Column("gid", BIGINT, "Real group ID of the caller"),
    Column("cid", INTEGER, "Cgroup ID of the caller"),
)

# The container (and Kubernetes pod) a row's process runs in, empty for the
# host's own processes (vajrad/enrich/containers.py); in this order.
CONTAINER_COLUMNS = (
    Column("container_id", TEXT, "Container ID (full, 64 hex), from the process's cgroup; empty on the host",
           index=True),
    Column("container_name", TEXT, "Container name, from the runtime; empty when the runtime did not answer "
                                   "in time (status: fill_timeouts)"),
    Column("container_image", TEXT, "Image the container runs, as the runtime names it"),
    Column("container_runtime", TEXT, "podman, docker, containerd, cri-o, or cri (a kubelet pod whose "
                                      "runtime the cgroup path does not name)"),
    Column("pod_name", TEXT, "Kubernetes pod name (label io.kubernetes.pod.name), or the podman pod's name"),
    Column("pod_namespace", TEXT, "Kubernetes namespace (label io.kubernetes.pod.namespace)"),
    Column("pod_uid", TEXT, "Kubernetes pod UID (label, or the kubepods cgroup path), or the podman pod's ID"),
)
PID_MNT_NAMESPACE_COLUMNS = (
    Column("pid_namespace", BIGINT, "Inode of the process's pid namespace (as /proc/PID/ns/pid)"),
    Column("mnt_namespace", BIGINT, "Inode of the process's mount namespace; 0 where the kernel has no BTF"),
)
NET_NAMESPACE_COLUMN = Column("net_namespace", BIGINT, "Inode of the process's network namespace")


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    columns: tuple[Column, ...]
    evented: bool = True
    # Column notes per event kind, for the docs: {"exec": "...", ...}
    notes: dict = field(default_factory=dict, hash=False, compare=False)
    # Other names SQL users query this table by (osquery's, where ours differs
    # by a prefix), offered by `vajractl query`.
    aliases: tuple[str, ...] = ()
    # Columns `vajractl events` shows on one line; empty: every non-hidden column.
    summary: tuple[str, ...] = ()

    def __post_init__(self):
        names = [c.name for c in self.columns]
        if len(names) != len(set(names)):
            raise ValueError(f"table {self.name}: duplicate column")
        for name in self.summary:
            if name not in names:
                raise ValueError(f"table {self.name}: summary column {name} is not a column")

    @classmethod
    def events(cls, name: str, description: str, columns, notes=None, **facts) -> "Table":
        """An event table: its own columns, then the common event columns."""
        own = tuple(c for c in columns if c.name not in EVENT_COLUMN_NAMES)
        return cls(name, description, own + EVENT_COLUMNS, True, notes or {}, **facts)

    @property
    def osquery_name(self) -> str:
        """The name this table has in osquery (see OSQUERY_PREFIX)."""
        return self.name if self.name.startswith(OSQUERY_PREFIX) else OSQUERY_PREFIX + self.name

    def row(self, **values) -> dict:
        """A row of this table as a dict: every column, None where not given.
        An unknown name is a KeyError naming it and the table."""
        unknown = values.keys() - set(self.column_names)
        if unknown:
            raise KeyError(f"{self.name} has no column {', '.join(sorted(unknown))}")
        return {name: values.get(name) for name in self.column_names}

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "evented": self.evented,
                "columns": [c.to_dict() for c in self.columns]}

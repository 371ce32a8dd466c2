"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import (BIGINT, CALLER_COLUMNS, CONTAINER_COLUMNS, INTEGER, NET_NAMESPACE_COLUMN,
                           PID_MNT_NAMESPACE_COLUMNS, TEXT, Column, Table)

TABLE = Table.events(
    "bpf_file_events",
    "Changes to watched files (file_paths), captured in the kernel by eBPF tracepoints: who "
    "(process, ancestry), what (the absolute path) and how (the syscall and its arguments). "
    "Paths outside file_paths are dropped in the kernel.",
    (
        *CALLER_COLUMNS,
        Column("syscall", TEXT, "open, openat, openat2, creat, truncate, ftruncate, unlink, unlinkat, "
                                "rmdir, mkdir, mkdirat, rename, renameat, renameat2, chmod, fchmod, "
                                "fchmodat, fchmodat2, chown, lchown, fchown, fchownat, link, linkat, "
                                "symlink, symlinkat, setxattr, lsetxattr, fsetxattr or setxattrat"),
        Column("path", TEXT, "Path of the caller's executable"),
        Column("cmdline", TEXT, "Command line of the caller"),
        Column("file_path", TEXT, "Absolute path of the file acted on: relative paths and *at dirfds "
                                  "resolved in the kernel; for an open that succeeded, the path the "
                                  "kernel opened (symlinks resolved)"),
        Column("dest_path", TEXT, "rename, link: the new path (absolute); symlink: the link's target "
                                  "as given; empty otherwise"),
        Column("flags", TEXT, "open*: the open flags, symbolic (O_WRONLY|O_CREAT|O_TRUNC); unlinkat, "
                              "renameat2, linkat, fchownat, fchmodat2: that call's flags"),
        Column("mode", TEXT, "open* with O_CREAT, mkdir*, chmod*: the mode argument, octal"),
        Column("owner_uid", BIGINT, "chown*: the requested owner (-1 leaves it unchanged)"),
        Column("owner_gid", BIGINT, "chown*: the requested group (-1 leaves it unchanged)"),
        Column("category", TEXT, "The file_paths category that watches file_path (or dest_path)"),
        Column("exit_code", TEXT, "The syscall's return value: 0, the new fd (open*), or -errno"),
        Column("probe_error", INTEGER, "Bits: 1 the path argument was cut, 2 a resolved directory "
                                       "was cut, 8 a kernel read failed"),
        Column("duration", INTEGER, "ns spent in the syscall"),
        Column("ancestry", TEXT, "JSON array of the caller's ancestors, [0] the immediate parent "
                                 "(as in bpf_process_events)", shared=True),
        Column("ntime", TEXT, "Event timestamp in ns, from the kernel's monotonic clock"),
        *CONTAINER_COLUMNS,
        *PID_MNT_NAMESPACE_COLUMNS,
        NET_NAMESPACE_COLUMN,
    ),
    notes={
        "open, openat, openat2, creat": "at the exit, when opened for writing (O_WRONLY, O_RDWR, "
                                        "O_CREAT or O_TRUNC), or for reading under a file_accesses "
                                        "category. file_path is the opened file's path.",
        "rename*, link*": "a row when either path is watched: a move into or out of a tree counts.",
        "symlink*": "file_path is the new link, dest_path the text it points to.",
        "paths": "a path the caller passed is made absolute against its cwd or dirfd in the kernel, "
                 "then normalised (. and ..) before it is stored. Symlinks inside such a path are "
                 "not followed (only an open's result is the kernel's own path).",
    },
)

from vajrad.schema import BIGINT, INTEGER, TEXT, Column, Table

TABLE = Table.events(
    "bpf_process_events",
    "Process executions, captured in the kernel by eBPF tracepoints.",
    (
        Column("tid", BIGINT, "Thread ID of the event"),
        Column("pid", BIGINT, "Process ID (thread group ID)"),
        Column("parent", BIGINT, "Process ID of the real parent, read from the kernel"),
        Column("uid", BIGINT, "User ID"),
        Column("gid", BIGINT, "Group ID"),
        Column("cid", INTEGER, "Cgroup ID"),
        Column("exit_code", TEXT, "Result of the syscall: 0 for a successful exec"),
        Column("probe_error", INTEGER,
               "Bitmask of what the kernel side could not read in full: 1 argv cut at the "
               "byte limit, 2 cwd cut, 4 executable path cut, 8 a read failed"),
        Column("syscall", TEXT, "Event kind: exec"),
        Column("path", TEXT, "Absolute path of the executed binary, resolved in the kernel"),
        Column("cwd", TEXT, "Current working directory, resolved in the kernel"),
        Column("cmdline", TEXT, "Command line arguments, space separated"),
        Column("duration", INTEGER, "Time spent in the exec syscall, in ns"),
        Column("json_cmdline", TEXT, "Command line arguments as a JSON array", hidden=True),
        Column("ntime", TEXT, "Event timestamp in ns, from the kernel's monotonic clock"),
    ),
    notes={"exec": "One row per successful execve/execveat, emitted at sched_process_exec."},
)

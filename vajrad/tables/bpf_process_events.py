from vajrad.schema import (BIGINT, CONTAINER_COLUMNS, INTEGER, NET_NAMESPACE_COLUMN, PID_MNT_NAMESPACE_COLUMNS, TEXT,
                           Column, Table)

TABLE = Table.events(
    "bpf_process_events",
    "Process auditing, captured in the kernel by eBPF tracepoints: every fork, "
    "exec (including failed ones) and exit, with credentials and full ancestry.",
    (
        Column("tid", BIGINT, "Thread ID: the thread that ran exec, the new process's thread, "
                              "or the last thread to exit"),
        Column("pid", BIGINT, "Process ID (thread group ID); for fork rows, the new process"),
        Column("parent", BIGINT, "Process ID of the real parent, read from the kernel"),
        Column("uid", BIGINT, "Real user ID"),
        Column("gid", BIGINT, "Real group ID"),
        Column("euid", BIGINT, "Effective user ID (differs from uid after a setuid exec)"),
        Column("egid", BIGINT, "Effective group ID"),
        Column("auid", BIGINT, "Audit (login) user ID; 4294967295 when unset"),
        Column("sid", BIGINT, "Session ID"),
        Column("tty", TEXT, "Controlling terminal, e.g. pts/0; empty without one"),
        Column("cid", INTEGER, "Cgroup ID"),
        Column("exit_code", TEXT, "exec: 0, or -errno of a failed exec; exit: the exit status, "
                                  "or -N when killed by signal N; fork: 0"),
        Column("probe_error", INTEGER,
               "Bitmask of what the kernel side could not read in full: 1 argv cut at the "
               "byte limit (--process_cmdline_max_bytes), 2 cwd cut, 4 executable path cut, 8 a read failed"),
        Column("partial", INTEGER, "1 when path or cmdline could not be known at the event "
                                   "(a fork or exit of a process the daemon never saw)"),
        Column("syscall", TEXT, "exec, fork, vfork, clone or exit"),
        Column("path", TEXT, "exec: the executed binary, resolved in the kernel (the path as given "
                             "when the exec failed); fork and exit: the process's image"),
        Column("cwd", TEXT, "exec: current working directory, resolved in the kernel; empty otherwise"),
        Column("cmdline", TEXT, "Command line arguments, space separated"),
        Column("duration", INTEGER, "exec: ns spent in the exec syscall; exit: the process's lifetime "
                                    "in ns; fork: 0"),
        Column("json_cmdline", TEXT, "Command line arguments as a JSON array", hidden=True),
        Column("ancestry", TEXT, "JSON array of the ancestors, [0] the immediate parent: exe_name, pid, "
                                 "ppid, path, cmdline, proc_time, proc_time_hr, pproc_time_hr, "
                                 "container_id (empty on the host)",
               shared=True),
        Column("ntime", TEXT, "Event timestamp in ns, from the kernel's monotonic clock"),
        *CONTAINER_COLUMNS,
        *PID_MNT_NAMESPACE_COLUMNS,
        NET_NAMESPACE_COLUMN,
    ),
    notes={
        "exec": "a successful execve/execveat, at sched_process_exec. A failed one is a row too, "
                "at the syscall's exit, with -errno in exit_code and the path as given.",
        "fork, vfork, clone": "a new process (new threads are dropped in the kernel), at "
                              "sched_process_fork; pid is the child, the syscall names how it was made.",
        "exit": "the last thread of a process exiting, at sched_process_exit; a group leader that "
                "exits before its threads produces no row until the last one goes.",
    },
    aliases=("process_events",),
    summary=("pid", "parent", "uid", "syscall", "path", "cmdline"),
)

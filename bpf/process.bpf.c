/* Process collector: fork, exec (successful or failed) and exit, each read
 * entirely in the kernel at the event, so that short-lived processes are
 * complete. Loaded by BCC; kernel struct offsets arrive as -D flags (see
 * vajra.h). */
#include "common.bpf.h"

BPF_PERCPU_ARRAY(scratch, struct vajra_exec_event, 1);

/* --- fork ----------------------------------------------------------------- */

/* The creating syscall by thread, read when the child appears. LRU, so that
 * threads that die inside the syscall leave nothing behind. */
BPF_TABLE("lru_hash", u32, u32, fork_kind, 16384);
BPF_PERCPU_ARRAY(task_scratch, struct vajra_task_event, 1);

static __always_inline int fork_enter(u32 kind)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    fork_kind.update(&tid, &kind);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_fork) { return fork_enter(VAJRA_FORK_FORK); }
TRACEPOINT_PROBE(syscalls, sys_enter_vfork) { return fork_enter(VAJRA_FORK_VFORK); }
TRACEPOINT_PROBE(syscalls, sys_enter_clone) { return fork_enter(VAJRA_FORK_CLONE); }
TRACEPOINT_PROBE(syscalls, sys_enter_clone3) { return fork_enter(VAJRA_FORK_CLONE); }

RAW_TRACEPOINT_PROBE(sched_process_fork)
{
    void *child = (void *)ctx->args[1];
    /* New threads are not processes, and kernel threads are not audited:
     * both are dropped here, before the ring buffer. */
    if (read_u32(child, VAJRA_OFF_TASK_PID) != read_u32(child, VAJRA_OFF_TASK_TGID) ||
        is_kernel_thread(child))
        return 0;
    int zero = 0;
    struct vajra_task_event *e = task_scratch.lookup(&zero);
    if (!e)
        return 0;
    fill_hdr(&e->hdr, child, VAJRA_EV_FORK);
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u32 *kind = fork_kind.lookup(&tid);
    e->fork_kind = kind ? *kind : VAJRA_FORK_CLONE;
    e->duration_ns = 0;
    e->exit_code = 0;
    submit(ctx, e, sizeof(*e));
    return 0;
}

/* --- exit ----------------------------------------------------------------- */

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    void *task = (void *)bpf_get_current_task();
    /* One row per process: only when its last thread goes (signal->live
     * has already been decremented for this one). */
    void *signal = read_ptr(task, VAJRA_OFF_TASK_SIGNAL);
    if (read_u32(signal, VAJRA_OFF_SIGNAL_LIVE) != 0 || is_kernel_thread(task))
        return 0;
    int zero = 0;
    struct vajra_task_event *e = task_scratch.lookup(&zero);
    if (!e)
        return 0;
    fill_hdr(&e->hdr, task, VAJRA_EV_EXIT);
    e->exit_code = read_u32(task, VAJRA_OFF_TASK_EXIT_CODE);
    /* The process's lifetime: the last thread may be younger than the
     * process; the leader (a zombie until the group is gone) is as old. */
    void *leader = read_ptr(task, VAJRA_OFF_TASK_GROUP_LEADER);
    e->duration_ns = e->hdr.ktime_ns - read_u64(leader, VAJRA_OFF_TASK_START_TIME);
    e->fork_kind = 0;
    submit(args, e, sizeof(*e));
    return 0;
}

/* --- exec ----------------------------------------------------------------- */

struct exec_call {
    u64 start_ns;
    const char *filename;       /* user pointers, for a failed exec */
    const char *const *argv;
};
BPF_HASH(exec_calls, u32, struct exec_call, 16384);

static __always_inline int exec_enter(const char *filename, const char *const *argv)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct exec_call call = {.start_ns = bpf_ktime_get_ns(), .filename = filename, .argv = argv};
    exec_calls.update(&tid, &call);
    return 0;
}

/* cwd, then the executable, packed after argv at e->pos. */
static __always_inline void add_cwd(struct vajra_exec_event *e, void *task)
{
    void *fs = read_ptr(task, VAJRA_OFF_TASK_FS);
    walk_path(e->data, &e->pos, &e->cwd_len,
              read_ptr(fs, VAJRA_OFF_FS_PWD + VAJRA_OFF_PATH_MNT),
              read_ptr(fs, VAJRA_OFF_FS_PWD + VAJRA_OFF_PATH_DENTRY),
              &e->hdr.flags, VAJRA_F_CWD_TRUNCATED);
    e->pos += e->cwd_len;
}

static __always_inline void send_exec(void *ctx, struct vajra_exec_event *e)
{
    u32 size = offsetof(struct vajra_exec_event, data) + (e->pos & (VAJRA_DATA_SIZE - 1));
    submit(ctx, e, size);
}

/* A failed exec still has the caller's memory: argv and the path are read
 * from the syscall's own arguments. */
static __always_inline int exec_exit(void *ctx, long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct exec_call *call = exec_calls.lookup(&tid);
    if (!call)
        return 0;
    if (ret >= 0) {
        exec_calls.delete(&tid);
        return 0;
    }
    int zero = 0;
    struct vajra_exec_event *e = scratch.lookup(&zero);
    if (!e) {
        exec_calls.delete(&tid);
        return 0;
    }
    void *task = (void *)bpf_get_current_task();
    fill_hdr(&e->hdr, task, VAJRA_EV_EXEC);
    e->hdr.flags |= VAJRA_F_EXE_AS_GIVEN;
    e->exit_code = ret;
    e->old_tid = tid;
    e->duration_ns = e->hdr.ktime_ns - call->start_ns;

    e->args_len = 0;
    for (int i = 0; i < VAJRA_ARGV_MAX; i++) {
        const char *arg = 0;
        if (bpf_probe_read_user(&arg, sizeof(arg), &call->argv[i]) < 0 || !arg)
            break;
        u32 used = e->args_len;
        if (used > VAJRA_ARGS_LIMIT - VAJRA_NAME_MAX) {
            e->hdr.flags |= VAJRA_F_ARGS_TRUNCATED;
            break;
        }
        int n = bpf_probe_read_user_str(&e->data[used & (VAJRA_DATA_SIZE - 1)], VAJRA_NAME_MAX, arg);
        if (n <= 0)
            break;
        if (n == VAJRA_NAME_MAX)
            e->hdr.flags |= VAJRA_F_ARGS_TRUNCATED;   /* this argument was cut */
        e->args_len = used + n;
    }
    e->pos = e->args_len;
    add_cwd(e, task);
    int n = bpf_probe_read_user_str(&e->data[e->pos & (VAJRA_DATA_SIZE - 1)], VAJRA_NAME_MAX,
                                    call->filename);
    e->exe_len = n > 0 ? n : 0;
    e->pos += e->exe_len;
    exec_calls.delete(&tid);
    send_exec(ctx, e);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return exec_enter(args->filename, args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return exec_enter(args->filename, args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve) { return exec_exit(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { return exec_exit(args, args->ret); }

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    int zero = 0;
    struct vajra_exec_event *e = scratch.lookup(&zero);
    if (!e)
        return 0;

    void *task = (void *)bpf_get_current_task();
    fill_hdr(&e->hdr, task, VAJRA_EV_EXEC);
    e->exit_code = 0;

    u32 old_tid = args->old_pid;
    e->old_tid = old_tid;
    struct exec_call *call = exec_calls.lookup(&old_tid);
    e->duration_ns = call ? e->hdr.ktime_ns - call->start_ns : 0;
    if (call)
        exec_calls.delete(&old_tid);

    void *mm = read_ptr(task, VAJRA_OFF_TASK_MM);
    unsigned long arg_start = 0, arg_end = 0;
    bpf_probe_read_kernel(&arg_start, sizeof(arg_start), mm + VAJRA_OFF_MM_ARG_START);
    bpf_probe_read_kernel(&arg_end, sizeof(arg_end), mm + VAJRA_OFF_MM_ARG_END);
    u64 len = arg_end > arg_start ? arg_end - arg_start : 0;
    if (len > VAJRA_ARGS_LIMIT) {
        len = VAJRA_ARGS_LIMIT;
        e->hdr.flags |= VAJRA_F_ARGS_TRUNCATED;
    }
    len &= (2 * VAJRA_ARGS_MAX - 1);
    if (len && bpf_probe_read_user(e->data, len, (void *)arg_start) < 0) {
        e->hdr.flags |= VAJRA_F_READ_FAILED;
        len = 0;
    }
    e->args_len = len;

    /* The running offset is kept in e->pos for the reason walk_path gives. */
    e->pos = e->args_len;
    add_cwd(e, task);
    void *exe = read_ptr(mm, VAJRA_OFF_MM_EXE_FILE);
    walk_path(e->data, &e->pos, &e->exe_len,
              read_ptr(exe, VAJRA_OFF_FILE_F_PATH + VAJRA_OFF_PATH_MNT),
              read_ptr(exe, VAJRA_OFF_FILE_F_PATH + VAJRA_OFF_PATH_DENTRY),
              &e->hdr.flags, VAJRA_F_EXE_TRUNCATED);
    e->pos += e->exe_len;
    send_exec(args, e);
    return 0;
}

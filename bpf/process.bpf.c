/* Process collector: exec events, read entirely in the kernel at the event
 * so that short-lived processes are complete. Loaded by BCC; kernel struct
 * offsets arrive as -D flags (see vajra.h). */
#include "vajra.h"

#ifdef VAJRA_RINGBUF
BPF_RINGBUF_OUTPUT(events, VAJRA_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);  /* kernels before 5.8 have no ring buffer */
#endif

BPF_PERCPU_ARRAY(scratch, struct vajra_exec_event, 1);
BPF_PERCPU_ARRAY(lost, u64, 1);
BPF_PERCPU_ARRAY(since_wakeup, u64, 1);
/* exec syscall entry time by calling thread, for the duration column */
BPF_HASH(exec_start, u32, u64, 16384);

static __always_inline void *read_ptr(void *base, u64 off)
{
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), base + off);
    return p;
}

/* A full buffer drops the event; the drop is counted for `status`.
 * The consumer is woken only every VAJRA_WAKEUP_EVERY events per CPU and
 * otherwise drains on its own timer: a wakeup per event costs userspace far
 * more than the event itself. */
static __always_inline void submit(void *ctx, void *ev, u32 size)
{
#ifdef VAJRA_RINGBUF
    int zero = 0;
    u64 flags = BPF_RB_NO_WAKEUP;
    u64 *pending = since_wakeup.lookup(&zero);
    if (pending && ++(*pending) >= VAJRA_WAKEUP_EVERY) {
        *pending = 0;
        flags = BPF_RB_FORCE_WAKEUP;
    }
    int err = events.ringbuf_output(ev, size, flags);
#else
    int err = events.perf_submit(ctx, ev, size);
#endif
    if (err < 0) {
        int idx = 0;
        u64 *n = lost.lookup(&idx);
        if (n)
            (*n)++;
    }
}

/* Writes the components of (vfsmnt, dentry) leaf first, each NUL-terminated,
 * at data[base...] and their byte count to *len; userspace reverses them.
 * Mount points are crossed through struct mount, so the result is absolute in
 * the task's mount namespace.
 *
 * base and *len live in map memory on purpose: the verifier then sees them as
 * unknown scalars, so loop iterations that reach the loop head by different
 * branches compare equal and are pruned, instead of exploding. */
static __always_inline void walk_path(char *data, u32 *base, u32 *len, void *vfsmnt,
                                      void *dentry, u32 *flags, u32 trunc_flag)
{
    int i;

    *len = 0;
    for (i = 0; i < VAJRA_PATH_DEPTH; i++) {
        void *parent = read_ptr(dentry, VAJRA_OFF_DENTRY_D_PARENT);
        void *mnt_root = read_ptr(vfsmnt, VAJRA_OFF_VFSMOUNT_MNT_ROOT);

        if (dentry == mnt_root || dentry == parent) {
#ifdef VAJRA_HAVE_MOUNT_LAYOUT
            void *mnt = vfsmnt - VAJRA_OFF_MOUNT_MNT;
            void *mnt_parent = read_ptr(mnt, VAJRA_OFF_MOUNT_MNT_PARENT);
            if (dentry != mnt_root || !mnt_parent || mnt_parent == mnt)
                return;
            dentry = read_ptr(mnt, VAJRA_OFF_MOUNT_MNT_MOUNTPOINT);
            vfsmnt = mnt_parent + VAJRA_OFF_MOUNT_MNT;
            continue;
#else
            /* Without struct mount's layout the walk stops at the first
             * mount point; flag the path as cut unless it is the real root. */
            if (dentry != parent)
                *flags |= trunc_flag;
            return;
#endif
        }
        u32 used = *len;
        if (used > VAJRA_PATH_MAX - VAJRA_NAME_MAX) {
            *flags |= trunc_flag;
            return;
        }
        void *name = read_ptr(dentry, VAJRA_OFF_DENTRY_D_NAME + VAJRA_OFF_QSTR_NAME);
        u32 at = (*base + used) & (VAJRA_DATA_SIZE - 1);
        int n = bpf_probe_read_kernel_str(&data[at], VAJRA_NAME_MAX, name);
        if (n <= 0) {
            *flags |= VAJRA_F_READ_FAILED;
            return;
        }
        *len = used + n;
        dentry = parent;
    }
    *flags |= trunc_flag;
}

static __always_inline void fill_hdr(struct vajra_proc_hdr *h, void *task, u32 type)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 ugid = bpf_get_current_uid_gid();
    void *real_parent = read_ptr(task, VAJRA_OFF_TASK_REAL_PARENT);

    h->type = type;
    h->flags = 0;
    h->ktime_ns = bpf_ktime_get_ns();
    h->pid = id >> 32;
    h->tid = (u32)id;
    h->ppid = 0;
    bpf_probe_read_kernel(&h->ppid, sizeof(h->ppid), real_parent + VAJRA_OFF_TASK_TGID);
    h->uid = (u32)ugid;
    h->gid = ugid >> 32;
    h->cgroup_id = bpf_get_current_cgroup_id();
}

static __always_inline int exec_enter(void)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 ts = bpf_ktime_get_ns();
    exec_start.update(&tid, &ts);
    return 0;
}

static __always_inline int exec_exit(void)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    exec_start.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) { return exec_enter(); }
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { return exec_enter(); }
TRACEPOINT_PROBE(syscalls, sys_exit_execve) { return exec_exit(); }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { return exec_exit(); }

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    int zero = 0;
    struct vajra_exec_event *e = scratch.lookup(&zero);
    if (!e)
        return 0;

    void *task = (void *)bpf_get_current_task();
    fill_hdr(&e->hdr, task, VAJRA_EV_EXEC);

    u32 old_tid = args->old_pid;
    e->old_tid = old_tid;
    u64 *start = exec_start.lookup(&old_tid);
    e->duration_ns = start ? e->hdr.ktime_ns - *start : 0;
    if (start)
        exec_start.delete(&old_tid);

    void *mm = read_ptr(task, VAJRA_OFF_TASK_MM);
    unsigned long arg_start = 0, arg_end = 0;
    bpf_probe_read_kernel(&arg_start, sizeof(arg_start), mm + VAJRA_OFF_MM_ARG_START);
    bpf_probe_read_kernel(&arg_end, sizeof(arg_end), mm + VAJRA_OFF_MM_ARG_END);
    u64 len = arg_end > arg_start ? arg_end - arg_start : 0;
    if (len > VAJRA_ARGS_MAX) {
        len = VAJRA_ARGS_MAX;
        e->hdr.flags |= VAJRA_F_ARGS_TRUNCATED;
    }
    len &= (2 * VAJRA_ARGS_MAX - 1);
    if (len && bpf_probe_read_user(e->data, len, (void *)arg_start) < 0) {
        e->hdr.flags |= VAJRA_F_READ_FAILED;
        len = 0;
    }
    e->args_len = len;

    /* cwd is packed after argv, the executable after cwd. The running
     * offset is kept in e->pos for the reason walk_path gives. */
    void *fs = read_ptr(task, VAJRA_OFF_TASK_FS);
    e->pos = e->args_len;
    walk_path(e->data, &e->pos, &e->cwd_len,
              read_ptr(fs, VAJRA_OFF_FS_PWD + VAJRA_OFF_PATH_MNT),
              read_ptr(fs, VAJRA_OFF_FS_PWD + VAJRA_OFF_PATH_DENTRY),
              &e->hdr.flags, VAJRA_F_CWD_TRUNCATED);
    e->pos += e->cwd_len;

    void *exe = read_ptr(mm, VAJRA_OFF_MM_EXE_FILE);
    walk_path(e->data, &e->pos, &e->exe_len,
              read_ptr(exe, VAJRA_OFF_FILE_F_PATH + VAJRA_OFF_PATH_MNT),
              read_ptr(exe, VAJRA_OFF_FILE_F_PATH + VAJRA_OFF_PATH_DENTRY),
              &e->hdr.flags, VAJRA_F_EXE_TRUNCATED);
    e->pos += e->exe_len;

    u32 size = offsetof(struct vajra_exec_event, data) + (e->pos & (VAJRA_DATA_SIZE - 1));
    submit(args, e, size);
    return 0;
}

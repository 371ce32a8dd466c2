/* What every Vajra BPF program shares: its output channel and drop counter,
 * safe reads of kernel memory at BTF offsets, the process header each event
 * starts with, and the path walk. Each program that includes this gets its own
 * instance of these maps. */
#ifndef VAJRA_COMMON_BPF_H
#define VAJRA_COMMON_BPF_H

#include "vajra.h"

#ifdef VAJRA_RINGBUF
BPF_RINGBUF_OUTPUT(events, VAJRA_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);  /* kernels before 5.8 have no ring buffer */
#endif

BPF_PERCPU_ARRAY(lost, u64, 1);
BPF_PERCPU_ARRAY(since_wakeup, u64, 1);
BPF_PERCPU_ARRAY(first_since_wakeup, u64, 1);    /* bpf_ktime_get_ns() of the oldest record not announced */

static __always_inline void *read_ptr(void *base, u64 off)
{
    void *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), base + off);
    return p;
}

/* A full buffer drops the event; the drop is counted for `status`.
 * The consumer is woken only every VAJRA_WAKEUP_BYTES bytes per CPU, or by
 * the first record to find the oldest unannounced one VAJRA_WAKEUP_AGE_MS
 * old, and otherwise drains on its own timer: a wakeup per event costs
 * userspace far more than the event itself, and the age bound keeps a busy
 * host's events from waiting for the timer (a quiet one's wait for it). */
static __always_inline void submit(void *ctx, void *ev, u64 size)
{
#ifdef VAJRA_RINGBUF
    int zero = 0;
    u64 flags = BPF_RB_NO_WAKEUP;
    u64 *pending = since_wakeup.lookup(&zero);
    u64 *first = first_since_wakeup.lookup(&zero);
    if (pending && first) {
        u64 now = bpf_ktime_get_ns();
        if (*pending == 0)
            *first = now;
        *pending += size;
        if (*pending >= VAJRA_WAKEUP_BYTES
#if VAJRA_WAKEUP_AGE_MS > 0
            || now - *first >= VAJRA_WAKEUP_AGE_MS * 1000000ULL
#endif
            ) {
            *pending = 0;
            flags = BPF_RB_FORCE_WAKEUP;
        }
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

/* One step of a path walk towards the root, shared by walk_path and
 * path_before. WALK_NAME: *dentry has a name to record, and *parent is where
 * the walk goes next. WALK_CROSSED: a mount point was crossed, so (*vfsmnt,
 * *dentry) moved and there is nothing to record. WALK_END: the root. Mount
 * points are crossed through struct mount, so the result is absolute in the
 * task's mount namespace. */
enum { WALK_END, WALK_NAME, WALK_CROSSED };

static __always_inline int walk_step(void **vfsmnt, void **dentry, void **parent, u32 *flags,
                                     u32 trunc_flag)
{
    *parent = read_ptr(*dentry, VAJRA_OFF_DENTRY_D_PARENT);
    void *mnt_root = read_ptr(*vfsmnt, VAJRA_OFF_VFSMOUNT_MNT_ROOT);

    if (*dentry != mnt_root && *dentry != *parent)
        return WALK_NAME;
#ifdef VAJRA_HAVE_MOUNT_LAYOUT
    void *mnt = *vfsmnt - VAJRA_OFF_MOUNT_MNT;
    void *mnt_parent = read_ptr(mnt, VAJRA_OFF_MOUNT_MNT_PARENT);
    if (*dentry != mnt_root || !mnt_parent || mnt_parent == mnt)
        return WALK_END;
    *dentry = read_ptr(mnt, VAJRA_OFF_MOUNT_MNT_MOUNTPOINT);
    *vfsmnt = mnt_parent + VAJRA_OFF_MOUNT_MNT;
    return WALK_CROSSED;
#else
    /* Without struct mount's layout the walk stops at the first mount
     * point; flag the path as cut unless it is the real root. */
    if (*dentry != *parent)
        *flags |= trunc_flag;
    return WALK_END;
#endif
}

/* Writes the components of (vfsmnt, dentry) leaf first, each NUL-terminated,
 * at data[base...] and their byte count to *len; userspace reverses them.
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
        void *parent;
        int step = walk_step(&vfsmnt, &dentry, &parent, flags, trunc_flag);
        if (step == WALK_END)
            return;
        if (step == WALK_CROSSED)
            continue;
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

static __always_inline u8 read_u8(void *base, u64 off)
{
    u8 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), base + off);
    return v;
}

static __always_inline u16 read_u16(void *base, u64 off)
{
    u16 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), base + off);
    return v;
}

static __always_inline u32 read_u32(void *base, u64 off)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), base + off);
    return v;
}

static __always_inline u64 read_u64(void *base, u64 off)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), base + off);
    return v;
}

/* The struct file behind one of the current task's fds, or 0. */
static __always_inline void *fd_file(int fd)
{
    if (fd < 0)
        return 0;
    void *task = (void *)bpf_get_current_task();
    void *files = read_ptr(task, VAJRA_OFF_TASK_FILES);
    void *fdt = read_ptr(files, VAJRA_OFF_FILES_FDT);
    if (!fdt || (u32)fd >= read_u32(fdt, VAJRA_OFF_FDTABLE_MAX_FDS))
        return 0;
    void *fds = read_ptr(fdt, VAJRA_OFF_FDTABLE_FD);
    return read_ptr(fds, (u64)fd * sizeof(void *));
}

/* Writes the path of (vfsmnt, dentry) root first so that it ends just before
 * data[end], and returns where it starts (end itself for the root). Names are
 * copied by their d_name.len, which is what lets the walk go backwards.
 * The position lives in map memory (*pos) for the same reason as in walk_path. */
static __always_inline u32 path_before(char *data, u32 end, u32 *pos, void *vfsmnt,
                                       void *dentry, u32 *flags, u32 trunc_flag)
{
    int i;

    /* Every way out is a break to the one return below, which reads the
     * position back from map memory: the callers then continue from a single
     * verifier state instead of one per exit and iteration. */
    *pos = end;
    for (i = 0; i < VAJRA_PATH_DEPTH; i++) {
        void *parent;
        int step = walk_step(&vfsmnt, &dentry, &parent, flags, trunc_flag);
        if (step == WALK_END)
            break;
        if (step == WALK_CROSSED)
            continue;
        u32 len = read_u32(dentry, VAJRA_OFF_DENTRY_D_NAME + VAJRA_OFF_QSTR_LEN);
        u32 at = *pos;
        if (len > VAJRA_NAME_MAX - 1 || len + 1 > at) {
            *flags |= trunc_flag;
            break;
        }
        at -= len + 1;
        data[at & (VAJRA_FILE_HALF - 1)] = '/';
        void *name = read_ptr(dentry, VAJRA_OFF_DENTRY_D_NAME + VAJRA_OFF_QSTR_NAME);
        if (bpf_probe_read_kernel(&data[(at + 1) & (VAJRA_FILE_HALF - 1)], len & (VAJRA_NAME_MAX - 1), name) < 0) {
            *flags |= VAJRA_F_READ_FAILED;
            break;
        }
        *pos = at;
        dentry = parent;
        if (i == VAJRA_PATH_DEPTH - 1)
            *flags |= trunc_flag;
    }
    return *pos;
}

/* The task's pid, mount and network namespace inodes, which with the cgroup
 * id place it in a container. The pid namespace is the one the task's pid
 * lives in (task_active_pid_ns), not nsproxy's pid_ns_for_children. */
static __always_inline void fill_namespaces(struct vajra_proc_hdr *h, void *task)
{
    void *nsproxy = read_ptr(task, VAJRA_OFF_TASK_NSPROXY);
    void *pid = read_ptr(task, VAJRA_OFF_TASK_THREAD_PID);
    u32 level = read_u32(pid, VAJRA_OFF_PID_LEVEL);
    void *pid_ns = pid ? read_ptr(pid, VAJRA_OFF_PID_NUMBERS + (u64)(level & 31) * VAJRA_SIZEOF_UPID
                                       + VAJRA_OFF_UPID_NS) : 0;
    void *mnt_ns = nsproxy ? read_ptr(nsproxy, VAJRA_OFF_NSPROXY_MNT_NS) : 0;
    void *net_ns = nsproxy ? read_ptr(nsproxy, VAJRA_OFF_NSPROXY_NET_NS) : 0;
    h->pid_ns = pid_ns ? read_u32(pid_ns, VAJRA_OFF_PIDNS_INUM) : 0;
#ifdef VAJRA_HAVE_MOUNT_LAYOUT
    h->mnt_ns = mnt_ns ? read_u32(mnt_ns, VAJRA_OFF_MNTNS_INUM) : 0;
#else
    h->mnt_ns = 0;      /* struct mnt_namespace is known only from BTF */
#endif
    h->net_ns = net_ns ? read_u32(net_ns, VAJRA_OFF_NET_NS_INUM) : 0;
    h->_ns_pad = 0;
}

/* Everything about who: from the task itself, so that a fork event
 * describes the child and not the parent that runs the probe.
 *
 * A process is known by its pid and its start time, and userspace (the
 * process cache, /proc's starttime) has the start time of the process, which
 * is its thread-group leader's. Any thread may act, and the real parent is
 * the thread that forked, which need not be a leader either: both start times
 * are read through group_leader, or a thread born after its process would name
 * a process nobody knows. After an exec from a non-leader thread the kernel
 * has made that thread the leader with the old leader's start time. */
static __always_inline void fill_hdr(struct vajra_proc_hdr *h, void *task, u32 type)
{
    void *real_parent = read_ptr(task, VAJRA_OFF_TASK_REAL_PARENT);
    void *leader = read_ptr(task, VAJRA_OFF_TASK_GROUP_LEADER);
    void *parent_leader = read_ptr(real_parent, VAJRA_OFF_TASK_GROUP_LEADER);
    void *cred = read_ptr(task, VAJRA_OFF_TASK_CRED);
    void *signal = read_ptr(task, VAJRA_OFF_TASK_SIGNAL);

    h->type = type;
    h->flags = 0;
    h->ktime_ns = bpf_ktime_get_ns();
    h->start_ns = read_u64(leader ? leader : task, VAJRA_OFF_TASK_START_BOOTTIME);
    h->parent_start_ns = read_u64(parent_leader ? parent_leader : real_parent,
                                  VAJRA_OFF_TASK_START_BOOTTIME);
    h->pid = read_u32(task, VAJRA_OFF_TASK_TGID);
    h->tid = read_u32(task, VAJRA_OFF_TASK_PID);
    h->ppid = read_u32(real_parent, VAJRA_OFF_TASK_TGID);
    h->uid = read_u32(cred, VAJRA_OFF_CRED_UID);
    h->gid = read_u32(cred, VAJRA_OFF_CRED_GID);
    h->euid = read_u32(cred, VAJRA_OFF_CRED_EUID);
    h->egid = read_u32(cred, VAJRA_OFF_CRED_EGID);
    h->auid = read_u32(task, VAJRA_OFF_TASK_LOGINUID);
    void *sid_pid = read_ptr(signal, VAJRA_OFF_SIGNAL_PIDS + VAJRA_PIDTYPE_SID * sizeof(void *));
    h->sid = sid_pid ? read_u32(sid_pid, VAJRA_OFF_PID_NUMBERS + VAJRA_OFF_UPID_NR) : 0;
    /* Every thread of a process has the same value: exec leaves one thread,
     * and threads are cloned from it. */
    h->exec_id = (u32)read_u64(task, VAJRA_OFF_TASK_SELF_EXEC_ID);
    h->cgroup_id = bpf_get_current_cgroup_id();
    fill_namespaces(h, task);
    h->tty[0] = 0;
    void *tty = read_ptr(signal, VAJRA_OFF_SIGNAL_TTY);
    if (tty)
        bpf_probe_read_kernel_str(h->tty, sizeof(h->tty), tty + VAJRA_OFF_TTY_NAME);
}

static __always_inline int is_kernel_thread(void *task)
{
    return read_u32(task, VAJRA_OFF_TASK_FLAGS) & VAJRA_PF_KTHREAD;
}

#endif

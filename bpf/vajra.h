/* Structures shared by the BPF programs and vajrad/bpf_abi.py, which mirrors
 * them with ctypes. Any change here must be made there too; the size checks at
 * the bottom fail the build when the two disagree. */
#ifndef VAJRA_H
#define VAJRA_H

#define VAJRA_ARGS_MAX 4096      /* argv bytes read per exec (power of two) */
#define VAJRA_PATH_MAX 4096      /* bytes of one resolved path */
#define VAJRA_NAME_MAX 256       /* bytes of one path component, with its NUL */
#define VAJRA_PATH_DEPTH 64      /* path components walked, mounts included */
#define VAJRA_DATA_SIZE 16384    /* args | cwd | exe, packed (power of two) */
#define VAJRA_WAKEUP_EVERY 64    /* events per CPU between consumer wakeups */

enum vajra_event_type {
    VAJRA_EV_EXEC = 1,
};

/* probe_error bits: what the kernel side could not read in full. */
enum vajra_probe_flags {
    VAJRA_F_ARGS_TRUNCATED = 1 << 0,
    VAJRA_F_CWD_TRUNCATED  = 1 << 1,
    VAJRA_F_EXE_TRUNCATED  = 1 << 2,
    VAJRA_F_READ_FAILED    = 1 << 3,
};

struct vajra_proc_hdr {
    u32 type;
    u32 flags;
    u64 ktime_ns;       /* bpf_ktime_get_ns() at the event */
    u32 pid;            /* tgid */
    u32 tid;
    u32 ppid;           /* real_parent->tgid */
    u32 uid;
    u32 gid;
    u32 _pad;
    u64 cgroup_id;
};

struct vajra_exec_event {
    struct vajra_proc_hdr hdr;
    u64 duration_ns;    /* sys_enter_execve to sched_process_exec */
    u32 old_tid;        /* the thread that called exec */
    u32 args_len;       /* argv bytes, NUL-separated */
    u32 cwd_len;        /* cwd components, leaf first, NUL-terminated each */
    u32 exe_len;        /* executable path components, likewise */
    u32 pos;            /* bytes of data used; scratch for the kernel side */
    char data[VAJRA_DATA_SIZE + VAJRA_NAME_MAX];
};

/* Kernel struct offsets come as -DVAJRA_OFF_*=N, read from the running
 * kernel's BTF by vajrad/kernel.py. Without BTF, headers that match the
 * running kernel give them through offsetof(). */
#ifndef VAJRA_OFF_TASK_REAL_PARENT
#include <linux/sched.h>
#include <linux/fs_struct.h>
#include <linux/mount.h>
#include <linux/dcache.h>
#include <linux/mm_types.h>
#define VAJRA_OFF_TASK_REAL_PARENT offsetof(struct task_struct, real_parent)
#define VAJRA_OFF_TASK_TGID offsetof(struct task_struct, tgid)
#define VAJRA_OFF_TASK_MM offsetof(struct task_struct, mm)
#define VAJRA_OFF_TASK_FS offsetof(struct task_struct, fs)
#define VAJRA_OFF_MM_ARG_START offsetof(struct mm_struct, arg_start)
#define VAJRA_OFF_MM_ARG_END offsetof(struct mm_struct, arg_end)
#define VAJRA_OFF_MM_EXE_FILE offsetof(struct mm_struct, exe_file)
#define VAJRA_OFF_FILE_F_PATH offsetof(struct file, f_path)
#define VAJRA_OFF_FS_PWD offsetof(struct fs_struct, pwd)
#define VAJRA_OFF_PATH_MNT offsetof(struct path, mnt)
#define VAJRA_OFF_PATH_DENTRY offsetof(struct path, dentry)
#define VAJRA_OFF_DENTRY_D_PARENT offsetof(struct dentry, d_parent)
#define VAJRA_OFF_DENTRY_D_NAME offsetof(struct dentry, d_name)
#define VAJRA_OFF_QSTR_NAME offsetof(struct qstr, name)
#define VAJRA_OFF_VFSMOUNT_MNT_ROOT offsetof(struct vfsmount, mnt_root)
#endif

#if defined(VAJRA_EXPECT_EXEC_EVENT_SIZE)
_Static_assert(sizeof(struct vajra_exec_event) == VAJRA_EXPECT_EXEC_EVENT_SIZE &&
               VAJRA_ARGS_MAX == VAJRA_EXPECT_ARGS_MAX && VAJRA_PATH_MAX == VAJRA_EXPECT_PATH_MAX &&
               VAJRA_NAME_MAX == VAJRA_EXPECT_NAME_MAX && VAJRA_DATA_SIZE == VAJRA_EXPECT_DATA_SIZE &&
               VAJRA_WAKEUP_EVERY == VAJRA_EXPECT_WAKEUP_EVERY,
               "bpf/vajra.h differs from vajrad/bpf_abi.py");
#endif

#endif

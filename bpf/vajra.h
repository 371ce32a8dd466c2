/* Structures shared by the BPF programs and vajrad/kernel/abi.py, which mirrors
 * them with ctypes. Any change here must be made there too; the size checks at
 * the bottom fail the build when the two disagree. */
#ifndef VAJRA_H
#define VAJRA_H

#define VAJRA_ARGS_MAX 8192      /* room for argv per exec (power of two); the limit is below */
#define VAJRA_PATH_MAX 4096      /* bytes of one resolved path */
#ifndef VAJRA_ARGS_LIMIT           /* --process_cmdline_max_bytes */
#define VAJRA_ARGS_LIMIT 4096
#endif
/* args + cwd + exe must stay below VAJRA_DATA_SIZE, which sizes are masked by */
_Static_assert(VAJRA_ARGS_LIMIT >= 256 && VAJRA_ARGS_LIMIT <= VAJRA_ARGS_MAX - 256, "argv limit out of range");
#define VAJRA_NAME_MAX 256       /* bytes of one path component, with its NUL */
#define VAJRA_PATH_DEPTH 64      /* path components walked, mounts included */
#define VAJRA_DATA_SIZE 16384    /* args | cwd | exe, packed (power of two) */
#define VAJRA_WAKEUP_BYTES (128 * 1024)  /* ring buffer bytes per CPU between consumer wakeups */
#ifndef VAJRA_WAKEUP_AGE_MS
/* or sooner: the record that finds the oldest unannounced one this old wakes
 * the consumer; 0: only bytes and the consumer's timer (--bpf_wakeup_ms) */
#define VAJRA_WAKEUP_AGE_MS 100
#endif
#define VAJRA_ARGV_MAX 64        /* arguments read from a failed exec's argv */

enum vajra_event_type {
    VAJRA_EV_EXEC = 1,      /* struct vajra_exec_event; failed when exit_code < 0 */
    VAJRA_EV_FORK = 2,      /* struct vajra_task_event: a new process (not a thread) */
    VAJRA_EV_EXIT = 3,      /* struct vajra_task_event: the last thread of a process exited */
    VAJRA_EV_SOCKET = 4,    /* struct vajra_sock_event */
    VAJRA_EV_FILE = 5,      /* struct vajra_file_event */
};

/* The syscall that created a process, for fork events. */
enum vajra_fork_kind {
    VAJRA_FORK_CLONE = 0,   /* clone, clone3, or a kernel-internal fork */
    VAJRA_FORK_FORK = 1,
    VAJRA_FORK_VFORK = 2,
};

/* probe_error bits: what the kernel side could not read in full. */
enum vajra_probe_flags {
    VAJRA_F_ARGS_TRUNCATED = 1 << 0,
    VAJRA_F_CWD_TRUNCATED  = 1 << 1,
    VAJRA_F_EXE_TRUNCATED  = 1 << 2,
    VAJRA_F_READ_FAILED    = 1 << 3,
    VAJRA_F_EXE_AS_GIVEN   = 1 << 4,  /* exe holds the path passed to a failed exec */
};

#define VAJRA_TTY_MAX 32

/* Who: read from one task_struct (current, or the child of a fork). */
struct vajra_proc_hdr {
    u32 type;
    u32 flags;
    u64 ktime_ns;        /* bpf_ktime_get_ns() at the event */
    u64 start_ns;        /* the thread-group leader's start_boottime: with pid, the
                          * process's identity, whichever thread acts */
    u64 parent_start_ns; /* the same of real_parent's thread-group leader */
    u32 pid;             /* tgid */
    u32 tid;
    u32 ppid;            /* real_parent->tgid */
    u32 uid;
    u32 gid;
    u32 euid;
    u32 egid;
    u32 auid;            /* loginuid; 4294967295 when unset */
    u32 sid;             /* session id, in the initial pid namespace */
    u32 exec_id;         /* the image: task->self_exec_id, which every exec
                          * increments and fork and clone copy (low 32 bits) */
    u64 cgroup_id;
    char tty[VAJRA_TTY_MAX];
    /* Namespace inodes, as /proc/PID/ns/ names them; 0 when unreadable (a
     * task past exit_task_namespaces). pid: the task's own (active) one. */
    u32 pid_ns;
    u32 mnt_ns;
    u32 net_ns;
    u32 _ns_pad;
};

struct vajra_task_event {
    struct vajra_proc_hdr hdr;
    u64 duration_ns;     /* exit: the process's lifetime */
    s32 exit_code;       /* exit: the wait status (code << 8 | signal) */
    u32 fork_kind;       /* fork: enum vajra_fork_kind */
};

struct vajra_exec_event {
    struct vajra_proc_hdr hdr;
    u64 duration_ns;    /* sys_enter_execve to sched_process_exec (or to the failure) */
    s32 exit_code;      /* 0, or -errno of a failed exec */
    u32 old_tid;        /* the thread that called exec */
    u32 args_len;       /* argv bytes, NUL-separated */
    u32 cwd_len;        /* cwd components, leaf first, NUL-terminated each */
    u32 exe_len;        /* executable path components, likewise */
    u32 pos;            /* bytes of data used; scratch for the kernel side */
    char data[VAJRA_DATA_SIZE + VAJRA_NAME_MAX];
};

/* --- sockets ------------------------------------------------------------ */

enum vajra_sock_syscall {
    VAJRA_SYS_CONNECT = 1,
    VAJRA_SYS_ACCEPT = 2,
    VAJRA_SYS_ACCEPT4 = 3,
    VAJRA_SYS_BIND = 4,
    VAJRA_SYS_LISTEN = 5,
    VAJRA_SYS_CLOSE = 6,
};

/* hdr.flags above the probe_error bits */
enum vajra_sock_flags {
    VAJRA_SF_LAST_REF   = 1 << 8,   /* close: this fd held the last reference to the socket */
    VAJRA_SF_START_SEEN = 1 << 9,   /* close: duration_ns is the socket's lifetime */
};

#define VAJRA_SOCKADDR_ROOM 128   /* a sockaddr_un (110 bytes) fits */
#define VAJRA_SUN_PATH_ROOM 128   /* sun_path is 108 bytes */

struct vajra_sock_event {
    struct vajra_proc_hdr hdr;
    u64 duration_ns;     /* in the syscall; for close, the socket's lifetime (VAJRA_SF_START_SEEN) */
    u64 inode;           /* the socket's inode; 0 when the fd held no socket */
    s64 ret;             /* the syscall's return value: 0, a new fd, or -errno */
    s32 fd;              /* the fd argument */
    u32 syscall;         /* enum vajra_sock_syscall */
    u32 net_ns;          /* inode of the socket's network namespace */
    u16 family;          /* read from the socket */
    u16 type;
    u16 protocol;
    u16 state;           /* TCP state numbering, as sock_diag reports it */
    u16 local_port;      /* host order */
    u16 remote_port;
    u8 local_addr[16];   /* 4 bytes for AF_INET */
    u8 remote_addr[16];
    u32 user_addr_len;   /* bytes of the caller's sockaddr copied to user_addr (connect, bind) */
    u16 local_path_len;  /* AF_UNIX: sun_path bytes of the socket's own address */
    u16 remote_path_len; /* AF_UNIX: sun_path bytes of the peer's address */
    u8 user_addr[VAJRA_SOCKADDR_ROOM];
    char local_path[VAJRA_SUN_PATH_ROOM];
    char remote_path[VAJRA_SUN_PATH_ROOM];
};

/* --- files ------------------------------------------------------------- */

enum vajra_file_syscall {
    VAJRA_FS_OPEN = 1, VAJRA_FS_OPENAT, VAJRA_FS_OPENAT2, VAJRA_FS_CREAT,
    VAJRA_FS_TRUNCATE, VAJRA_FS_FTRUNCATE,
    VAJRA_FS_UNLINK, VAJRA_FS_UNLINKAT, VAJRA_FS_RMDIR,
    VAJRA_FS_MKDIR, VAJRA_FS_MKDIRAT,
    VAJRA_FS_RENAME, VAJRA_FS_RENAMEAT, VAJRA_FS_RENAMEAT2,
    VAJRA_FS_CHMOD, VAJRA_FS_FCHMOD, VAJRA_FS_FCHMODAT, VAJRA_FS_FCHMODAT2,
    VAJRA_FS_CHOWN, VAJRA_FS_LCHOWN, VAJRA_FS_FCHOWN, VAJRA_FS_FCHOWNAT,
    VAJRA_FS_LINK, VAJRA_FS_LINKAT, VAJRA_FS_SYMLINK, VAJRA_FS_SYMLINKAT,
    VAJRA_FS_SETXATTR, VAJRA_FS_LSETXATTR, VAJRA_FS_FSETXATTR, VAJRA_FS_SETXATTRAT,
};

/* One resolved path is built in a region of 2 * VAJRA_FILE_HALF bytes: the
 * directory it is relative to ends at VAJRA_FILE_HALF, written backwards from
 * the dentries, and what the caller passed follows it. The slack lets the
 * verifier accept reads of VAJRA_FIM_KEY_MAX bytes from any masked offset. */
#define VAJRA_FILE_HALF 4096
#define VAJRA_FILE_REGION (2 * VAJRA_FILE_HALF + 256)
#define VAJRA_FIM_KEY_MAX 256     /* bytes of a path the watch rules compare (LPM trie key) */

enum vajra_fim_rule_kind {
    VAJRA_FIM_TREE = 1,       /* the prefix and everything below it (%%) */
    VAJRA_FIM_LEVEL = 2,      /* entries directly below the prefix (%, or a plain directory) */
    VAJRA_FIM_EXACT = 3,      /* this path only; the key includes its NUL */
    VAJRA_FIM_EXCLUDE = 4,    /* exclude_paths: nothing at or below the prefix */
};

/* settings array slots, written by vajrad */
enum vajra_fim_setting {
    VAJRA_FIM_ENABLED = 0,     /* any rule at all */
    VAJRA_FIM_ACCESS_ANY = 1,  /* some rule records read access (file_accesses) */
    VAJRA_FIM_SELF_TGID = 2,   /* vajrad's own activity is never recorded */
    VAJRA_FIM_SETTINGS = 3,
};

/* counters slots */
enum vajra_fim_counter {
    VAJRA_FIM_CHECKED = 0,     /* calls whose path was compared with the rules */
    VAJRA_FIM_MATCHED = 1,     /* ... and matched: handed to userspace */
    VAJRA_FIM_COUNTERS = 2,
};

struct vajra_fim_key {
    u32 prefixlen;            /* bits */
    char data[VAJRA_FIM_KEY_MAX];
};

struct vajra_fim_rule {
    u32 kind;                 /* enum vajra_fim_rule_kind */
    u32 len;                  /* bytes of the prefix */
    u32 access;               /* reads below it are recorded too */
    u32 _pad;
};

struct vajra_file_event {
    struct vajra_proc_hdr hdr;
    u64 duration_ns;     /* in the syscall */
    s64 ret;             /* the syscall's return value */
    u32 syscall;         /* enum vajra_file_syscall */
    u32 open_flags;      /* open*: the flags as passed */
    u32 mode;            /* open*, mkdir*, chmod*: the mode argument */
    u32 owner_uid;       /* chown*: the requested owner (-1: unchanged) */
    u32 owner_gid;
    s32 fd;              /* fd-based calls: the fd; open*: -1 (the new fd is ret) */
    u32 call_flags;      /* unlinkat, renameat2, linkat, fchownat, fchmodat2: the flags argument */
    u32 matched;         /* 1: the path matched a rule, 2: dest_path did */
    u32 path_start, path_end;   /* file_path: data[path_start, path_end) */
    u32 dest_start, dest_end;   /* dest_path, in the second region; empty when start == end */
    u32 pos;             /* scratch for the kernel side */
    u32 _pad;
    char data[2 * VAJRA_FILE_REGION];
};

/* Kernel struct offsets come as -DVAJRA_OFF_*=N, read from the running
 * kernel's BTF by vajrad/kernel/environment.py. Without BTF, headers that match the
 * running kernel give them through offsetof(). */
#ifndef VAJRA_OFF_TASK_REAL_PARENT
#include <linux/sched.h>
#include <linux/fs_struct.h>
#include <linux/mount.h>
#include <linux/dcache.h>
#include <linux/mm_types.h>
#include <linux/cred.h>
#include <linux/tty.h>
#include <linux/pid.h>
#define VAJRA_OFF_TASK_REAL_PARENT offsetof(struct task_struct, real_parent)
#define VAJRA_OFF_TASK_GROUP_LEADER offsetof(struct task_struct, group_leader)
#define VAJRA_OFF_TASK_SELF_EXEC_ID offsetof(struct task_struct, self_exec_id)
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
#define VAJRA_OFF_QSTR_LEN offsetof(struct qstr, len)
#define VAJRA_OFF_VFSMOUNT_MNT_ROOT offsetof(struct vfsmount, mnt_root)
#define VAJRA_OFF_TASK_PID offsetof(struct task_struct, pid)
#define VAJRA_OFF_TASK_FLAGS offsetof(struct task_struct, flags)
#define VAJRA_OFF_TASK_START_TIME offsetof(struct task_struct, start_time)
#define VAJRA_OFF_TASK_GROUP_LEADER offsetof(struct task_struct, group_leader)
#define VAJRA_OFF_TASK_START_BOOTTIME offsetof(struct task_struct, start_boottime)
#define VAJRA_OFF_TASK_EXIT_CODE offsetof(struct task_struct, exit_code)
#define VAJRA_OFF_TASK_CRED offsetof(struct task_struct, cred)
#define VAJRA_OFF_TASK_LOGINUID offsetof(struct task_struct, loginuid)
#define VAJRA_OFF_TASK_SIGNAL offsetof(struct task_struct, signal)
#define VAJRA_OFF_CRED_UID offsetof(struct cred, uid)
#define VAJRA_OFF_CRED_GID offsetof(struct cred, gid)
#define VAJRA_OFF_CRED_EUID offsetof(struct cred, euid)
#define VAJRA_OFF_CRED_EGID offsetof(struct cred, egid)
#define VAJRA_OFF_SIGNAL_LIVE offsetof(struct signal_struct, live)
#define VAJRA_OFF_SIGNAL_PIDS offsetof(struct signal_struct, pids)
#define VAJRA_OFF_SIGNAL_TTY offsetof(struct signal_struct, tty)
#define VAJRA_OFF_TTY_NAME offsetof(struct tty_struct, name)
#define VAJRA_OFF_PID_NUMBERS offsetof(struct pid, numbers)
#define VAJRA_OFF_UPID_NR offsetof(struct upid, nr)
#include <linux/fdtable.h>
#include <linux/net.h>
#include <net/sock.h>
#include <net/af_unix.h>
#define VAJRA_OFF_TASK_FILES offsetof(struct task_struct, files)
#define VAJRA_OFF_FILES_FDT offsetof(struct files_struct, fdt)
#define VAJRA_OFF_FDTABLE_FD offsetof(struct fdtable, fd)
#define VAJRA_OFF_FDTABLE_MAX_FDS offsetof(struct fdtable, max_fds)
#define VAJRA_OFF_FILE_F_INODE offsetof(struct file, f_inode)
#define VAJRA_OFF_FILE_PRIVATE_DATA offsetof(struct file, private_data)
#define VAJRA_OFF_FILE_REFS offsetof(struct file, f_count)
#define VAJRA_FILE_ONE_REF 1
#define VAJRA_OFF_INODE_I_MODE offsetof(struct inode, i_mode)
#define VAJRA_OFF_INODE_I_INO offsetof(struct inode, i_ino)
#define VAJRA_OFF_SOCKET_SK offsetof(struct socket, sk)
#define VAJRA_OFF_SOCKET_TYPE offsetof(struct socket, type)
#define VAJRA_OFF_SKC_FAMILY offsetof(struct sock_common, skc_family)
#define VAJRA_OFF_SKC_STATE offsetof(struct sock_common, skc_state)
#define VAJRA_OFF_SKC_DADDR offsetof(struct sock_common, skc_daddr)
#define VAJRA_OFF_SKC_RCV_SADDR offsetof(struct sock_common, skc_rcv_saddr)
#define VAJRA_OFF_SKC_DPORT offsetof(struct sock_common, skc_dport)
#define VAJRA_OFF_SKC_NUM offsetof(struct sock_common, skc_num)
#define VAJRA_OFF_SKC_V6_DADDR offsetof(struct sock_common, skc_v6_daddr)
#define VAJRA_OFF_SKC_V6_RCV_SADDR offsetof(struct sock_common, skc_v6_rcv_saddr)
#define VAJRA_OFF_SKC_NET offsetof(struct sock_common, skc_net)
#define VAJRA_OFF_SK_PROTOCOL offsetof(struct sock, sk_protocol)
#define VAJRA_OFF_UNIX_ADDR offsetof(struct unix_sock, addr)
#define VAJRA_OFF_UNIX_PEER offsetof(struct unix_sock, peer)
#define VAJRA_OFF_UNIX_ADDRESS_LEN offsetof(struct unix_address, len)
#define VAJRA_OFF_UNIX_ADDRESS_NAME offsetof(struct unix_address, name)
#define VAJRA_OFF_NET_NS_INUM (offsetof(struct net, ns) + offsetof(struct ns_common, inum))
#include <linux/nsproxy.h>
#include <linux/pid_namespace.h>
#define VAJRA_OFF_TASK_NSPROXY offsetof(struct task_struct, nsproxy)
#define VAJRA_OFF_TASK_THREAD_PID offsetof(struct task_struct, thread_pid)
#define VAJRA_OFF_NSPROXY_MNT_NS offsetof(struct nsproxy, mnt_ns)
#define VAJRA_OFF_NSPROXY_NET_NS offsetof(struct nsproxy, net_ns)
#define VAJRA_OFF_PID_LEVEL offsetof(struct pid, level)
#define VAJRA_OFF_UPID_NS offsetof(struct upid, ns)
#define VAJRA_SIZEOF_UPID sizeof(struct upid)
#define VAJRA_OFF_PIDNS_INUM (offsetof(struct pid_namespace, ns) + offsetof(struct ns_common, inum))
#endif

#define VAJRA_PF_KTHREAD 0x00200000  /* task->flags of a kernel thread */
#define VAJRA_PIDTYPE_SID 3

#if defined(VAJRA_EXPECT_EXEC_EVENT_SIZE)
_Static_assert(sizeof(struct vajra_exec_event) == VAJRA_EXPECT_EXEC_EVENT_SIZE &&
               sizeof(struct vajra_task_event) == VAJRA_EXPECT_TASK_EVENT_SIZE &&
               sizeof(struct vajra_sock_event) == VAJRA_EXPECT_SOCK_EVENT_SIZE &&
               sizeof(struct vajra_file_event) == VAJRA_EXPECT_FILE_EVENT_SIZE &&
               VAJRA_FILE_HALF == VAJRA_EXPECT_FILE_HALF && VAJRA_FIM_KEY_MAX == VAJRA_EXPECT_FIM_KEY_MAX &&
               VAJRA_TTY_MAX == VAJRA_EXPECT_TTY_MAX &&
               VAJRA_ARGS_MAX == VAJRA_EXPECT_ARGS_MAX && VAJRA_PATH_MAX == VAJRA_EXPECT_PATH_MAX &&
               VAJRA_NAME_MAX == VAJRA_EXPECT_NAME_MAX && VAJRA_DATA_SIZE == VAJRA_EXPECT_DATA_SIZE &&
               VAJRA_WAKEUP_BYTES == VAJRA_EXPECT_WAKEUP_BYTES,
               "bpf/vajra.h differs from vajrad/kernel/abi.py");
#endif

#endif

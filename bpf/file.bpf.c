/* File integrity collector: the calls that change a file (or read one, for
 * file_accesses categories), each with the absolute path it touched. The
 * path is compared with the watch rules here, in an LPM trie keyed by path
 * bytes, and a call on an unwatched path leaves before any ring-buffer write.
 *
 * Each call is remembered at its entry (arguments only) and decided at its
 * exit, when the return value is known and, for a successful open, the new
 * fd gives the path as the kernel resolved it, symlinks and all.
 * Loaded by BCC with common.bpf.h spliced in; offsets come as -D flags. */
#include "common.bpf.h"

#define VAJRA_AT_FDCWD -100
#define VAJRA_O_WRITE_INTENT (01 | 02 | 0100 | 01000)   /* O_WRONLY O_RDWR O_CREAT O_TRUNC */
#define VAJRA_O_ACCMODE 03

BPF_PERCPU_ARRAY(file_scratch, struct vajra_file_event, 1);
BPF_PERCPU_ARRAY(key_scratch, struct vajra_fim_key, 1);
BPF_ARRAY(fim_settings, u32, VAJRA_FIM_SETTINGS);
BPF_PERCPU_ARRAY(fim_counters, u64, VAJRA_FIM_COUNTERS);
BPF_LPM_TRIE(fim_rules, struct vajra_fim_key, struct vajra_fim_rule, 16384);
/* Every exit hands over to one program, file_decide: verified once, instead
 * of once per syscall, which made loading take seconds. */
BPF_PROG_ARRAY(file_progs, 1);

enum call_shape {
    SHAPE_OPEN,     /* path; after success, the new fd's file */
    SHAPE_PATH,     /* one path argument */
    SHAPE_TWO,      /* path and dest (rename, link) */
    SHAPE_SYMLINK,  /* dest is the new link's path; path is its target, as given */
    SHAPE_FD,       /* the fd's file */
    SHAPE_OWNER,    /* chown family: a path, or the fd when there is none */
};

/* A call between its entry and its exit, by thread. */
struct file_call {
    u64 start_ns;
    s64 ret;                /* set at the exit */
    u32 shape;              /* enum call_shape */
    const char *path;       /* the caller's path argument */
    const char *dest;       /* rename, link: the new name; symlink: the link's path */
    s32 dirfd;
    s32 dest_dirfd;
    s32 fd;                 /* fd-based calls */
    u32 syscall;
    u32 open_flags;
    u32 mode;
    u32 owner_uid;
    u32 owner_gid;
    u32 call_flags;
};
BPF_HASH(file_calls, u32, struct file_call, 16384);

static __always_inline u32 setting(int slot)
{
    u32 *v = fim_settings.lookup(&slot);
    return v ? *v : 0;
}

static __always_inline void count(int slot)
{
    u64 *n = fim_counters.lookup(&slot);
    if (n)
        (*n)++;
}

static __always_inline int remember(struct file_call *c)
{
    if (!setting(VAJRA_FIM_ENABLED))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)(id >> 32) == setting(VAJRA_FIM_SELF_TGID))
        return 0;
    u32 tid = (u32)id;
    c->start_ns = bpf_ktime_get_ns();
    file_calls.update(&tid, c);
    return 0;
}

/* Opens are the hot calls: a read-only one leaves here unless some category
 * records reads. */
static __always_inline int remember_open(u32 syscall, int dirfd, const char *path, u32 flags, u32 mode)
{
    if (!(flags & VAJRA_O_WRITE_INTENT) && !setting(VAJRA_FIM_ACCESS_ANY))
        return 0;
    struct file_call c = {.shape = SHAPE_OPEN, .syscall = syscall, .path = path, .dirfd = dirfd, .fd = -1,
                          .open_flags = flags, .mode = mode, .dest_dirfd = VAJRA_AT_FDCWD};
    return remember(&c);
}

static __always_inline int remember_path(u32 syscall, int dirfd, const char *path, u32 mode,
                                         u32 call_flags)
{
    struct file_call c = {.shape = SHAPE_PATH, .syscall = syscall, .path = path, .dirfd = dirfd, .fd = -1,
                          .mode = mode, .call_flags = call_flags, .dest_dirfd = VAJRA_AT_FDCWD};
    return remember(&c);
}

static __always_inline int remember_two(u32 shape, u32 syscall, int dirfd, const char *path,
                                        int dest_dirfd, const char *dest, u32 call_flags)
{
    struct file_call c = {.shape = shape, .syscall = syscall, .path = path, .dirfd = dirfd, .fd = -1,
                          .dest = dest, .dest_dirfd = dest_dirfd, .call_flags = call_flags};
    return remember(&c);
}

static __always_inline int remember_fd(u32 syscall, int fd, u32 mode)
{
    struct file_call c = {.shape = SHAPE_FD, .syscall = syscall, .fd = fd, .mode = mode, .dirfd = VAJRA_AT_FDCWD,
                          .dest_dirfd = VAJRA_AT_FDCWD};
    return remember(&c);
}

static __always_inline int remember_owner(u32 syscall, int dirfd, const char *path, int fd,
                                          u32 uid, u32 gid, u32 call_flags)
{
    struct file_call c = {.shape = SHAPE_OWNER, .syscall = syscall, .path = path, .dirfd = dirfd, .fd = fd,
                          .owner_uid = uid, .owner_gid = gid, .call_flags = call_flags,
                          .dest_dirfd = VAJRA_AT_FDCWD};
    return remember(&c);
}

/* --- paths ----------------------------------------------------------------- */

/* The path of an open file into region[.., HALF], NUL at HALF. */
static __always_inline void file_path(struct vajra_file_event *e, char *region, void *file,
                                      u32 *start, u32 *end)
{
    u32 at = path_before(region, VAJRA_FILE_HALF, &e->pos,
                         read_ptr(file, VAJRA_OFF_FILE_F_PATH + VAJRA_OFF_PATH_MNT),
                         read_ptr(file, VAJRA_OFF_FILE_F_PATH + VAJRA_OFF_PATH_DENTRY),
                         &e->hdr.flags, VAJRA_F_CWD_TRUNCATED);
    if (at >= VAJRA_FILE_HALF) {                /* the root itself */
        region[VAJRA_FILE_HALF - 1] = '/';
        at = VAJRA_FILE_HALF - 1;
    }
    region[VAJRA_FILE_HALF] = 0;
    *start = at;
    *end = VAJRA_FILE_HALF;
}

/* A path the caller passed, made absolute against dirfd (or the cwd) as the
 * kernel's own lookup starts: the caller's bytes follow the directory's path. */
static __always_inline void user_path(struct vajra_file_event *e, char *region, const char *path,
                                      int dirfd, u32 *start, u32 *end)
{
    int n = bpf_probe_read_user_str(&region[VAJRA_FILE_HALF + 1], VAJRA_FILE_HALF - 1, path);
    if (n <= 0) {
        e->hdr.flags |= VAJRA_F_READ_FAILED;
        *start = *end = VAJRA_FILE_HALF;
        return;
    }
    if (n == VAJRA_FILE_HALF - 1)
        e->hdr.flags |= VAJRA_F_ARGS_TRUNCATED;
    *end = VAJRA_FILE_HALF + (u32)n;            /* n counts the NUL */
    if (region[VAJRA_FILE_HALF + 1] == '/') {
        *start = VAJRA_FILE_HALF + 1;
        return;
    }
    void *mnt, *dentry;
    if (dirfd == VAJRA_AT_FDCWD) {
        void *fs = read_ptr((void *)bpf_get_current_task(), VAJRA_OFF_TASK_FS);
        mnt = read_ptr(fs, VAJRA_OFF_FS_PWD + VAJRA_OFF_PATH_MNT);
        dentry = read_ptr(fs, VAJRA_OFF_FS_PWD + VAJRA_OFF_PATH_DENTRY);
    } else {
        void *dir = fd_file(dirfd);
        if (!dir) {                 /* a bad dirfd: the call failed; keep what was passed */
            *start = VAJRA_FILE_HALF + 1;
            return;
        }
        mnt = read_ptr(dir, VAJRA_OFF_FILE_F_PATH + VAJRA_OFF_PATH_MNT);
        dentry = read_ptr(dir, VAJRA_OFF_FILE_F_PATH + VAJRA_OFF_PATH_DENTRY);
    }
    region[VAJRA_FILE_HALF] = '/';
    *start = path_before(region, VAJRA_FILE_HALF, &e->pos, mnt, dentry, &e->hdr.flags,
                         VAJRA_F_CWD_TRUNCATED);
}

/* The rule that covers region[start, end), or 0: longest prefix first, so an
 * exclusion inside a watched tree wins, and a watched tree inside an
 * exclusion wins back. */
static __always_inline u32 watched(char *region, u32 *startp, u32 *endp, int read_only)
{
    int zero = 0;
    u32 start = *startp, end = *endp;
    struct vajra_fim_key *key = key_scratch.lookup(&zero);
    if (!key || end <= start)
        return 0;
    u32 len = end - start;
    u32 bytes = len + 1;                         /* with the NUL: exact rules end there */
    if (bytes > VAJRA_FIM_KEY_MAX)
        bytes = VAJRA_FIM_KEY_MAX;
    if (bpf_probe_read_kernel(key->data, VAJRA_FIM_KEY_MAX,
                              &region[start & (2 * VAJRA_FILE_HALF - 1)]) < 0)
        return 0;
    key->prefixlen = bytes * 8;
    struct vajra_fim_rule *rule = fim_rules.lookup(key);
    if (!rule || rule->kind == VAJRA_FIM_EXCLUDE)
        return 0;
    if (read_only && !rule->access)
        return 0;
    if (rule->kind == VAJRA_FIM_LEVEL) {
        /* i is tested against `from` and `len` only through temporaries:
         * refining their bounds on each branch would give the verifier a
         * state per byte. */
        u32 from = rule->len;
        int i;
#pragma clang loop unroll(disable)
        for (i = 0; i < VAJRA_FIM_KEY_MAX; i++) {
            if ((u32)(i - from) < (u32)(len - from) && key->data[i] == '/')
                return 0;
        }
    }
    return rule->kind;
}

/* --- exit ------------------------------------------------------------------ */


int file_decide(void *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct file_call *c = file_calls.lookup(&tid);
    if (!c)
        return 0;
    struct file_call call = *c;
    file_calls.delete(&tid);
    u32 shape = call.shape;

    int zero = 0;
    struct vajra_file_event *e = file_scratch.lookup(&zero);
    if (!e)
        return 0;
    /* Positions and the verdict stay in map memory, not in registers: what
     * the verifier learned about them on one branch then does not split
     * its states for the rest of the program. */
    e->hdr.flags = 0;
    e->matched = 0;
    e->path_start = e->path_end = e->dest_start = e->dest_end = 0;
    char *first = e->data;
    char *second = e->data + VAJRA_FILE_REGION;
    int read_only = shape == SHAPE_OPEN && !(call.open_flags & VAJRA_O_WRITE_INTENT);

    if (shape == SHAPE_OPEN && call.ret >= 0)
        file_path(e, first, fd_file((int)call.ret), &e->path_start, &e->path_end);
    else if (shape == SHAPE_FD || (shape == SHAPE_OWNER && !call.path))
        file_path(e, first, fd_file(call.fd), &e->path_start, &e->path_end);
    else
        user_path(e, first, shape == SHAPE_SYMLINK ? call.dest : call.path,
                  shape == SHAPE_SYMLINK ? call.dest_dirfd : call.dirfd, &e->path_start, &e->path_end);
    count(VAJRA_FIM_CHECKED);
    if (watched(first, &e->path_start, &e->path_end, read_only))
        e->matched |= 1;
    if (shape == SHAPE_TWO) {
        user_path(e, second, call.dest, call.dest_dirfd, &e->dest_start, &e->dest_end);
        if (watched(second, &e->dest_start, &e->dest_end, 0))
            e->matched |= 2;
    } else if (e->matched && shape == SHAPE_SYMLINK) {
        /* the target is text the link will hold, never resolved */
        int n = bpf_probe_read_user_str(&second[VAJRA_FILE_HALF + 1], VAJRA_FILE_HALF - 1, call.path);
        e->dest_start = VAJRA_FILE_HALF + 1;
        e->dest_end = n > 0 ? VAJRA_FILE_HALF + (u32)n : VAJRA_FILE_HALF + 1;
    }
    if (!e->matched)
        return 0;
    count(VAJRA_FIM_MATCHED);

    u32 flags = e->hdr.flags;
    fill_hdr(&e->hdr, (void *)bpf_get_current_task(), VAJRA_EV_FILE);
    e->hdr.flags = flags;
    e->duration_ns = e->hdr.ktime_ns - call.start_ns;
    e->ret = call.ret;
    e->syscall = call.syscall;
    e->open_flags = call.open_flags;
    e->mode = call.mode;
    e->owner_uid = call.owner_uid;
    e->owner_gid = call.owner_gid;
    e->fd = call.fd;
    e->call_flags = call.call_flags;
    /* Sent only as far as the last path: most of the second region is unused. */
    u32 last = e->path_end;
    if (e->dest_end > e->dest_start)
        last = VAJRA_FILE_REGION + e->dest_end;
    e->dest_start += VAJRA_FILE_REGION;
    e->dest_end += VAJRA_FILE_REGION;
    u64 size = offsetof(struct vajra_file_event, data) + (u64)last + 1;
    asm volatile("" : "+r"(size));      /* the bound below must be on the register passed on */
    if (size > sizeof(*e))
        size = sizeof(*e);
    submit(ctx, e, size);
    return 0;
}

static __always_inline int finish(void *ctx, s64 ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct file_call *c = file_calls.lookup(&tid);
    if (!c)
        return 0;
    c->ret = ret;
    file_progs.call(ctx, 0);
    file_calls.delete(&tid);        /* only when the tail call failed */
    return 0;
}

/* --- the calls ---------------------------------------------------------------- */

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    return remember_open(VAJRA_FS_OPENAT, args->dfd, args->filename, args->flags, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    return remember_open(VAJRA_FS_OPEN, VAJRA_AT_FDCWD, args->filename, args->flags, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
    return remember_open(VAJRA_FS_CREAT, VAJRA_AT_FDCWD, args->pathname, 01 | 0100 | 01000, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_creat) { return finish(args, args->ret); }

#ifdef VAJRA_HAVE_SYS_OPENAT2
TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    u64 how[2] = {0, 0};        /* struct open_how starts with flags, then mode */
    bpf_probe_read_user(how, sizeof(how), args->how);
    return remember_open(VAJRA_FS_OPENAT2, args->dfd, args->filename, (u32)how[0], (u32)how[1]);
}
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return finish(args, args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_truncate)
{
    return remember_path(VAJRA_FS_TRUNCATE, VAJRA_AT_FDCWD, args->path, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_truncate) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_ftruncate) { return remember_fd(VAJRA_FS_FTRUNCATE, args->fd, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_ftruncate) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_unlink)
{
    return remember_path(VAJRA_FS_UNLINK, VAJRA_AT_FDCWD, args->pathname, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_unlink) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_unlinkat)
{
    return remember_path(VAJRA_FS_UNLINKAT, args->dfd, args->pathname, 0, args->flag);
}
TRACEPOINT_PROBE(syscalls, sys_exit_unlinkat) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_rmdir)
{
    return remember_path(VAJRA_FS_RMDIR, VAJRA_AT_FDCWD, args->pathname, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_rmdir) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_mkdir)
{
    return remember_path(VAJRA_FS_MKDIR, VAJRA_AT_FDCWD, args->pathname, args->mode, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mkdir) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_mkdirat)
{
    return remember_path(VAJRA_FS_MKDIRAT, args->dfd, args->pathname, args->mode, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mkdirat) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_rename)
{
    return remember_two(SHAPE_TWO, VAJRA_FS_RENAME, VAJRA_AT_FDCWD, args->oldname, VAJRA_AT_FDCWD, args->newname, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_rename) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
    return remember_two(SHAPE_TWO, VAJRA_FS_RENAMEAT, args->olddfd, args->oldname, args->newdfd, args->newname, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_renameat) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
    return remember_two(SHAPE_TWO, VAJRA_FS_RENAMEAT2, args->olddfd, args->oldname, args->newdfd, args->newname,
                        args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_renameat2) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_chmod)
{
    return remember_path(VAJRA_FS_CHMOD, VAJRA_AT_FDCWD, args->filename, args->mode, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_chmod) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_fchmod) { return remember_fd(VAJRA_FS_FCHMOD, args->fd, args->mode); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchmod) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat)
{
    return remember_path(VAJRA_FS_FCHMODAT, args->dfd, args->filename, args->mode, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fchmodat) { return finish(args, args->ret); }

#ifdef VAJRA_HAVE_SYS_FCHMODAT2
TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat2)
{
    return remember_path(VAJRA_FS_FCHMODAT2, args->dfd, args->filename, args->mode, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fchmodat2) { return finish(args, args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_chown)
{
    return remember_owner(VAJRA_FS_CHOWN, VAJRA_AT_FDCWD, args->filename, -1, args->user, args->group, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_chown) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_lchown)
{
    return remember_owner(VAJRA_FS_LCHOWN, VAJRA_AT_FDCWD, args->filename, -1, args->user, args->group, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_lchown) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_fchown)
{
    return remember_owner(VAJRA_FS_FCHOWN, VAJRA_AT_FDCWD, 0, args->fd, args->user, args->group, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fchown) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_fchownat)
{
    return remember_owner(VAJRA_FS_FCHOWNAT, args->dfd, args->filename, -1, args->user, args->group,
                          args->flag);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fchownat) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_link)
{
    return remember_two(SHAPE_TWO, VAJRA_FS_LINK, VAJRA_AT_FDCWD, args->oldname, VAJRA_AT_FDCWD, args->newname, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_link) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_linkat)
{
    return remember_two(SHAPE_TWO, VAJRA_FS_LINKAT, args->olddfd, args->oldname, args->newdfd, args->newname,
                        args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_linkat) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_symlink)
{
    return remember_two(SHAPE_SYMLINK, VAJRA_FS_SYMLINK, VAJRA_AT_FDCWD, args->oldname, VAJRA_AT_FDCWD, args->newname, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_symlink) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_symlinkat)
{
    return remember_two(SHAPE_SYMLINK, VAJRA_FS_SYMLINKAT, VAJRA_AT_FDCWD, args->oldname, args->newdfd, args->newname, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_symlinkat) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_setxattr)
{
    return remember_path(VAJRA_FS_SETXATTR, VAJRA_AT_FDCWD, args->pathname, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_setxattr) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_lsetxattr)
{
    return remember_path(VAJRA_FS_LSETXATTR, VAJRA_AT_FDCWD, args->pathname, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_lsetxattr) { return finish(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_fsetxattr) { return remember_fd(VAJRA_FS_FSETXATTR, args->fd, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_fsetxattr) { return finish(args, args->ret); }

#ifdef VAJRA_HAVE_SYS_SETXATTRAT
TRACEPOINT_PROBE(syscalls, sys_enter_setxattrat)
{
    return remember_path(VAJRA_FS_SETXATTRAT, args->dfd, args->pathname, 0, args->at_flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_setxattrat) { return finish(args, args->ret); }
#endif

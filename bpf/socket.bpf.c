/* Socket collector: connect, accept, accept4, bind, listen and close of
 * sockets, each described from the kernel's socket at the call, so that a row
 * carries both ends whatever the process passed. close() is filtered here: a
 * close of anything but a socket returns before any map or buffer is touched.
 * Loaded by BCC with common.bpf.h spliced in; offsets come as -D flags. */
#include "common.bpf.h"

#define VAJRA_S_IFMT 00170000
#define VAJRA_S_IFSOCK 0140000
#define VAJRA_AF_UNIX 1
#define VAJRA_AF_INET 2
#define VAJRA_AF_INET6 10
#define VAJRA_EAGAIN 11

BPF_PERCPU_ARRAY(sock_scratch, struct vajra_sock_event, 1);

/* A call between its entry and its exit, by thread. */
struct sock_call {
    u64 start_ns;
    const void *user_addr;      /* connect, bind: the caller's sockaddr */
    u32 user_addr_len;
    s32 fd;
    u32 syscall;
};
BPF_HASH(sock_calls, u32, struct sock_call, 16384);

/* When each socket was created (socket, socketpair, accept), by inode, for
 * the lifetime a close reports. LRU: sockets that go without a close()
 * (at exit, or by dup2 over them) age out. */
BPF_TABLE("lru_hash", u64, u64, sock_starts, 65536);

/* socketpair's output array, between entry and exit. */
BPF_HASH(pair_calls, u32, int *, 1024);

static __always_inline u16 net_to_host16(u16 v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap16(v);
#else
    return v;
#endif
}

/* The struct socket of a file, or 0 when the file is not a socket: decided
 * by the inode's type, as the VFS itself does. */
static __always_inline void *file_socket(void *file, u64 *inode_nr)
{
    if (!file)
        return 0;
    void *inode = read_ptr(file, VAJRA_OFF_FILE_F_INODE);
    if ((read_u16(inode, VAJRA_OFF_INODE_I_MODE) & VAJRA_S_IFMT) != VAJRA_S_IFSOCK)
        return 0;
    *inode_nr = read_u64(inode, VAJRA_OFF_INODE_I_INO);
    return read_ptr(file, VAJRA_OFF_FILE_PRIVATE_DATA);
}

/* An AF_UNIX socket's own address (sun_path bytes), or nothing when unbound. */
static __always_inline u16 read_unix_path(void *sk, char *dst)
{
    void *addr = read_ptr(sk, VAJRA_OFF_UNIX_ADDR);
    if (!addr)
        return 0;
    u32 len = read_u32(addr, VAJRA_OFF_UNIX_ADDRESS_LEN);
    if (len <= 2)               /* sun_family alone: unbound or autobind pending */
        return 0;
    len = (len - 2) & (VAJRA_SUN_PATH_ROOM - 1);
    if (bpf_probe_read_kernel(dst, len, addr + VAJRA_OFF_UNIX_ADDRESS_NAME + 2) < 0)
        return 0;
    return len;
}

/* Both ends and the kind of socket, as the kernel holds them now. */
static __always_inline void describe_socket(struct vajra_sock_event *e, void *sock)
{
    e->type = read_u16(sock, VAJRA_OFF_SOCKET_TYPE);
    void *sk = read_ptr(sock, VAJRA_OFF_SOCKET_SK);
    if (!sk) {
        e->hdr.flags |= VAJRA_F_READ_FAILED;
        return;
    }
    u16 family = read_u16(sk, VAJRA_OFF_SKC_FAMILY);
    e->family = family;
    e->protocol = read_u16(sk, VAJRA_OFF_SK_PROTOCOL);
    e->state = read_u8(sk, VAJRA_OFF_SKC_STATE);
    void *net = read_ptr(sk, VAJRA_OFF_SKC_NET);
    e->net_ns = net ? read_u32(net, VAJRA_OFF_NET_NS_INUM) : 0;
    if (family == VAJRA_AF_INET) {
        bpf_probe_read_kernel(e->local_addr, 4, sk + VAJRA_OFF_SKC_RCV_SADDR);
        bpf_probe_read_kernel(e->remote_addr, 4, sk + VAJRA_OFF_SKC_DADDR);
    } else if (family == VAJRA_AF_INET6) {
        bpf_probe_read_kernel(e->local_addr, 16, sk + VAJRA_OFF_SKC_V6_RCV_SADDR);
        bpf_probe_read_kernel(e->remote_addr, 16, sk + VAJRA_OFF_SKC_V6_DADDR);
    } else if (family == VAJRA_AF_UNIX) {
        e->local_path_len = read_unix_path(sk, e->local_path);
        void *peer = read_ptr(sk, VAJRA_OFF_UNIX_PEER);
        if (peer)
            e->remote_path_len = read_unix_path(peer, e->remote_path);
        return;
    } else {
        return;
    }
    e->local_port = read_u16(sk, VAJRA_OFF_SKC_NUM);
    e->remote_port = net_to_host16(read_u16(sk, VAJRA_OFF_SKC_DPORT));
}

/* A fresh event for the current task: header filled, socket fields zeroed. */
static __always_inline struct vajra_sock_event *new_event(u32 syscall, s32 fd, s64 ret)
{
    int zero = 0;
    struct vajra_sock_event *e = sock_scratch.lookup(&zero);
    if (!e)
        return 0;
    fill_hdr(&e->hdr, (void *)bpf_get_current_task(), VAJRA_EV_SOCKET);
    e->syscall = syscall;
    e->fd = fd;
    e->ret = ret;
    e->duration_ns = 0;
    e->inode = 0;
    e->net_ns = 0;
    e->family = e->type = e->protocol = e->state = 0;
    e->local_port = e->remote_port = 0;
    __builtin_memset(e->local_addr, 0, sizeof(e->local_addr));
    __builtin_memset(e->remote_addr, 0, sizeof(e->remote_addr));
    e->user_addr_len = 0;
    e->local_path_len = e->remote_path_len = 0;
    return e;
}

static __always_inline void note_start(int fd)
{
    u64 inode = 0;
    if (file_socket(fd_file(fd), &inode) && inode) {
        u64 now = bpf_ktime_get_ns();
        sock_starts.update(&inode, &now);
    }
}

/* --- entry and exit -------------------------------------------------------- */

static __always_inline int call_enter(u32 syscall, s32 fd, const void *user_addr, u32 user_addr_len)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct sock_call call = {
        .start_ns = bpf_ktime_get_ns(), .user_addr = user_addr,
        .user_addr_len = user_addr_len, .fd = fd, .syscall = syscall,
    };
    sock_calls.update(&tid, &call);
    return 0;
}

static __always_inline int call_exit(void *ctx, s64 ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct sock_call *call = sock_calls.lookup(&tid);
    if (!call)
        return 0;
    u32 syscall = call->syscall;
    /* A non-blocking accept with nothing waiting: nothing happened. */
    if ((syscall == VAJRA_SYS_ACCEPT || syscall == VAJRA_SYS_ACCEPT4) && ret == -VAJRA_EAGAIN) {
        sock_calls.delete(&tid);
        return 0;
    }
    struct vajra_sock_event *e = new_event(syscall, call->fd, ret);
    if (!e) {
        sock_calls.delete(&tid);
        return 0;
    }
    e->duration_ns = e->hdr.ktime_ns - call->start_ns;
    u32 n = call->user_addr_len;
    if (n > VAJRA_SOCKADDR_ROOM - 1)
        n = VAJRA_SOCKADDR_ROOM - 1;
    n &= VAJRA_SOCKADDR_ROOM - 1;
    if (call->user_addr && n && bpf_probe_read_user(e->user_addr, n, call->user_addr) == 0)
        e->user_addr_len = n;
    sock_calls.delete(&tid);

    /* accept describes the new connection; the others, the fd they were given. */
    int fd = (syscall == VAJRA_SYS_ACCEPT || syscall == VAJRA_SYS_ACCEPT4) ? (ret >= 0 ? ret : -1) : e->fd;
    u64 inode = 0;
    void *sock = file_socket(fd_file(fd), &inode);
    if (sock) {
        e->inode = inode;
        describe_socket(e, sock);
        if (ret >= 0 && fd != e->fd) {          /* a socket born in accept */
            u64 now = e->hdr.ktime_ns;
            sock_starts.update(&inode, &now);
        }
    }
    submit(ctx, e, sizeof(*e));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    return call_enter(VAJRA_SYS_CONNECT, args->fd, args->uservaddr, args->addrlen);
}
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { return call_exit(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_bind)
{
    return call_enter(VAJRA_SYS_BIND, args->fd, args->umyaddr, args->addrlen);
}
TRACEPOINT_PROBE(syscalls, sys_exit_bind) { return call_exit(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_listen) { return call_enter(VAJRA_SYS_LISTEN, args->fd, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_listen) { return call_exit(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return call_enter(VAJRA_SYS_ACCEPT, args->fd, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return call_exit(args, args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return call_enter(VAJRA_SYS_ACCEPT4, args->fd, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return call_exit(args, args->ret); }

/* close() is the hot one: every process closes files all the time. Anything
 * that is not a socket leaves after a few reads, before any map or buffer. The
 * row is written at entry, while the socket still exists; close() on a valid
 * socket fd does not fail in a way that keeps it open. */
TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    int fd = args->fd;
    void *file = fd_file(fd);
    u64 inode = 0;
    void *sock = file_socket(file, &inode);
    if (!sock)
        return 0;
    struct vajra_sock_event *e = new_event(VAJRA_SYS_CLOSE, fd, 0);
    if (!e)
        return 0;
    e->inode = inode;
    describe_socket(e, sock);
    u64 *start = sock_starts.lookup(&inode);
    if (start) {
        e->duration_ns = e->hdr.ktime_ns - *start;
        e->hdr.flags |= VAJRA_SF_START_SEEN;
    }
    /* Other fds (dup, fork) may still hold the socket; only the last close ends it. */
    if (read_u64(file, VAJRA_OFF_FILE_REFS) == VAJRA_FILE_ONE_REF) {
        e->hdr.flags |= VAJRA_SF_LAST_REF;
        if (start)
            sock_starts.delete(&inode);
    }
    submit(args, e, sizeof(*e));
    return 0;
}

/* Creation times only: these make no rows. */
TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    if (args->ret >= 0)
        note_start(args->ret);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_socketpair)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    int *fds = args->usockvec;
    pair_calls.update(&tid, &fds);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socketpair)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    int **fds = pair_calls.lookup(&tid);
    if (!fds)
        return 0;
    int pair[2] = {-1, -1};
    if (args->ret == 0 && bpf_probe_read_user(pair, sizeof(pair), *fds) == 0) {
        note_start(pair[0]);
        note_start(pair[1]);
    }
    pair_calls.delete(&tid);
    return 0;
}

/* Security products: signals sent to the processes of watched products
 * (their pids are put in `watched` by vajrad/collectors/products), with the
 * sender, at signal:signal_generate. Everything else is dropped here: signals
 * to other processes, a product's signals to itself, and the signals that
 * mean nothing for its life (SIGCHLD, SIGWINCH, SIGURG, SIGALRM, SIGPIPE).
 * The record is this unit's own (products/signals.py mirrors it). */
#include "common.bpf.h"

struct vajra_signal_event {
    u64 ktime_ns;
    u32 sender_tgid;
    u32 sender_tid;
    u32 sender_uid;
    u32 target_pid;
    s32 sig;
    s32 code;
    s32 result;
    u32 pad;
    char sender_comm[16];
    char target_comm[16];
};
_Static_assert(sizeof(struct vajra_signal_event) == VAJRA_EXPECT_SIGNAL_EVENT_SIZE,
               "products/signals.py's SignalEvent differs from this struct");

BPF_HASH(watched, u32, u8, 4096);

TRACEPOINT_PROBE(signal, signal_generate)
{
    int sig = args->sig;
    if (sig == 17 || sig == 28 || sig == 23 || sig == 14 || sig == 13)
        return 0;
    u32 target = (u32)args->pid;
    if (!watched.lookup(&target))
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (tgid == target)
        return 0;
    struct vajra_signal_event e = {};
    e.ktime_ns = bpf_ktime_get_ns();
    e.sender_tgid = tgid;
    e.sender_tid = (u32)pid_tgid;
    e.sender_uid = (u32)bpf_get_current_uid_gid();
    e.target_pid = target;
    e.sig = sig;
    e.code = args->code;
    e.result = args->result;
    bpf_get_current_comm(&e.sender_comm, sizeof(e.sender_comm));
    bpf_probe_read_kernel(&e.target_comm, sizeof(e.target_comm), args->comm);
    submit(args, &e, sizeof(e));
    return 0;
}

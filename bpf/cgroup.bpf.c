/* cgroup v2 directories as they are made and removed: the map from cgroup id
 * (what bpf_get_current_cgroup_id() puts in every record) to its path, kept
 * by vajrad/collectors/containers. v1 hierarchies are left out in the kernel:
 * only the default hierarchy's ids are the ids our records carry. */
#include "common.bpf.h"

#define VAJRA_CGROUP_PATH_MAX 512

enum { VAJRA_CG_MKDIR = 1, VAJRA_CG_RMDIR = 2 };

struct vajra_cgroup_event {
    struct vajra_proc_hdr hdr;   /* who made or removed it (type: VAJRA_CG_MKDIR or _RMDIR): for a
                                  * container, the OCI runtime, whose lineage leads to who ran it */
    s32 level;           /* depth below the root */
    u32 path_len;        /* bytes of path, with its NUL */
    u64 id;              /* the cgroup's id: its directory's inode */
    char path[VAJRA_CGROUP_PATH_MAX];   /* relative to the hierarchy's root, from / */
};

#ifdef VAJRA_EXPECT_CGROUP_EVENT_SIZE
_Static_assert(sizeof(struct vajra_cgroup_event) == VAJRA_EXPECT_CGROUP_EVENT_SIZE,
               "bpf/cgroup.bpf.c differs from vajrad/collectors/containers/collector.py");
#endif

BPF_PERCPU_ARRAY(cgroup_scratch, struct vajra_cgroup_event, 1);

/* A cgroup is made just before a container's first process joins it: the
 * consumer is woken for each record, so that the map knows the cgroup before
 * the process collector's rows for it are resolved. These are rare. */
static __always_inline void emit(void *ctx, struct vajra_cgroup_event *ev)
{
#ifdef VAJRA_RINGBUF
    int err = events.ringbuf_output(ev, sizeof(*ev), BPF_RB_FORCE_WAKEUP);
#else
    int err = events.perf_submit(ctx, ev, sizeof(*ev));
#endif
    if (err < 0) {
        int idx = 0;
        u64 *n = lost.lookup(&idx);
        if (n)
            (*n)++;
    }
}

static __always_inline int record(void *ctx, u32 kind, int level, u64 id, const char *path)
{
    int zero = 0;
    struct vajra_cgroup_event *ev = cgroup_scratch.lookup(&zero);
    if (!ev)
        return 0;
    fill_hdr(&ev->hdr, (void *)bpf_get_current_task(), kind);
    ev->level = level;
    ev->id = id;
    int n = bpf_probe_read_kernel_str(ev->path, VAJRA_CGROUP_PATH_MAX, path);
    ev->path_len = n > 0 ? n : 0;
    emit(ctx, ev);
    return 0;
}

/* Hierarchy 0 is the default (v2) one; the path is a __data_loc string
 * (offset in the low 16 bits) inside the record. */
TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
    if (args->root != 0)
        return 0;
    return record(args, VAJRA_CG_MKDIR, args->level, args->id, (char *)args + (args->data_loc_path & 0xFFFF));
}

TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
    if (args->root != 0)
        return 0;
    return record(args, VAJRA_CG_RMDIR, args->level, args->id, (char *)args + (args->data_loc_path & 0xFFFF));
}

"""Process auditing unit: every fork, exec and exit from the kernel
(bpf/process.bpf.c), with ancestry; it keeps the ProcessCache that the other
units attribute their rows with."""
from vajrad.config import Option
from vajrad.units import Unit, UnitContext


def _build(ctx: UnitContext):
    from vajrad.collectors.process.bpf_process_events import ProcessCollector
    from vajrad.enrich.process_cache import ProcessCache
    cfg = ctx.config
    cache = ProcessCache(cfg.process_ancestry_cache_size, cfg.process_ancestry_max_depth,
                         cfg.process_ancestry_cache_ttl)
    collector = ProcessCollector(ctx.need("kernel"), cfg.bpf_output, cache, cfg.process_cmdline_max_bytes,
                                 ctx.want("container_resolver"))
    ctx.provide("process_cache", cache)
    ctx.provide("describe_process", cache.describe)
    return collector


UNIT = Unit(
    name="process",
    description="Process auditing with full ancestry (eBPF tracepoints).",
    tables=("bpf_process_events", "process_ancestry_cache_stats"),
    factory=_build,
    wanted=lambda cfg: cfg.enable_bpf_events and not cfg.disable_events,
    needs=("kernel",),
    provides=("process_cache", "describe_process"),
    optional=("container_resolver",),
    options=(
        Option("process_ancestry_cache_size", int, 1000,
               "Exited processes kept for ancestry (running ones are always kept); 0 disables ancestry "
               "(every row gets []).", minimum=0),
        Option("process_ancestry_max_depth", int, 32, "Ancestors listed per row, at most.", minimum=1),
        Option("process_ancestry_cache_ttl", int, 300,
               "Seconds an exited process stays in the ancestry cache.", minimum=0),
        Option("process_cmdline_max_bytes", int, 4096,
               "Bytes of argv read per exec; a longer command line is cut and flagged "
               "(probe_error bit 1).", minimum=256, maximum=7936),
    ),
)

"""Socket unit: connect, accept, bind, listen and close from the kernel
(bpf/socket.bpf.c), attributed through the process unit's cache, and the
open-socket state behind vajra_open_sockets."""
from vajrad.config import Option
from vajrad.units import Unit, UnitContext


def _build(ctx: UnitContext):
    from vajrad.collectors.socket.bpf_socket_events import SocketCollector
    return SocketCollector(ctx.need("kernel"), ctx.config.bpf_output, ctx.need("process_cache"),
                           ctx.want("container_resolver"))


UNIT = Unit(
    name="socket",
    description="Socket events and open sockets (eBPF tracepoints).",
    tables=("bpf_socket_events", "vajra_open_sockets"),
    factory=_build,
    wanted=lambda cfg: cfg.enable_bpf_events and cfg.enable_socket_events and not cfg.disable_events,
    needs=("kernel", "process_cache"),
    optional=("container_resolver",),
    options=(
        Option("enable_socket_events", bool, True,
               "Record connect, accept, bind, listen and close of sockets (bpf_socket_events) and serve "
               "vajra_open_sockets; needs enable_bpf_events."),
    ),
)

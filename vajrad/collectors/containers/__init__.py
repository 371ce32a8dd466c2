"""Containers unit: which container and Kubernetes pod each process is in
(cgroup id -> cgroup path -> container id, bpf/cgroup.bpf.c keeping the map),
metadata from podman's and Docker's APIs and from containerd and CRI-O
through CRI, the `containers` and
`container_events` tables, and the "container_resolver" service the process,
socket and file collectors fill their container columns from. It is built
before them (registry order)."""
from vajrad.config import Option
from vajrad.units import Unit, UnitContext


def _build(ctx: UnitContext):
    from vajrad.collectors.containers.collector import ContainersCollector
    from vajrad.enrich import runtimes
    from vajrad.enrich.containers import ContainerResolver
    cfg = ctx.config
    resolver = ContainerResolver(fill_wait_ms=cfg.container_fill_wait_ms)
    clients = [runtimes.Podman(cfg.podman_socket)] if cfg.podman_socket else []
    clients += [runtimes.Docker(cfg.docker_socket)] if cfg.docker_socket else []
    clients += [runtimes.Cri("containerd", cfg.containerd_socket)] if cfg.containerd_socket else []
    clients += [runtimes.Cri("cri-o", cfg.crio_socket)] if cfg.crio_socket else []
    collector = ContainersCollector(ctx.need("kernel"), cfg.bpf_output, resolver, clients,
                                    lambda: ctx.services.find("process_cache"))
    ctx.provide("container_resolver", resolver)
    return collector


UNIT = Unit(
    name="containers",
    description="Container and Kubernetes pod context for every event (cgroups; podman, Docker and CRI APIs).",
    tables=("containers", "container_events"),
    factory=_build,
    wanted=lambda cfg: cfg.enable_bpf_events and cfg.enable_containers and not cfg.disable_events,
    needs=("kernel",),
    provides=("container_resolver",),
    options=(
        Option("enable_containers", bool, True,
               "Container and pod columns on process, socket and file events, and the containers and "
               "container_events tables; needs enable_bpf_events."),
        Option("podman_socket", str, "/run/podman/podman.sock",
               "podman's API socket (podman system service); used whenever it exists, empty: never."),
        Option("docker_socket", str, "/run/docker.sock",
               "Docker Engine's API socket; used whenever it exists, empty: never."),
        Option("containerd_socket", str, "/run/containerd/containerd.sock",
               "containerd's socket, spoken to through its CRI plugin (gRPC, needs python3-grpcio); used "
               "whenever it exists, empty: never."),
        Option("crio_socket", str, "/run/crio/crio.sock",
               "CRI-O's CRI socket (gRPC, needs python3-grpcio); used whenever it exists, empty: never."),
        Option("container_fill_wait_ms", int, 2000,
               "How long a row of a container whose name and image the runtime has not told yet is held "
               "before it is stored with the container ID alone (counted as fill_timeouts in status).",
               minimum=0, maximum=60000),
    ),
)

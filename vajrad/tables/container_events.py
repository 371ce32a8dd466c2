"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import BIGINT, INTEGER, TEXT, Column, Table

TABLE = Table.events(
    "container_events",
    "Container lifecycle from the runtimes' event streams: create, start, stop, die and delete, with the "
    "process that made the container's cgroup (the OCI runtime) and its ancestry where process auditing "
    "knew it.",
    (
        Column("container_id", TEXT, "Container ID (64 hex)", index=True),
        Column("runtime", TEXT, "podman or docker"),
        Column("action", TEXT, "create, start, stop, die or delete"),
        Column("container_name", TEXT, "Container name"),
        Column("container_image", TEXT, "Image"),
        Column("pod_name", TEXT, "Kubernetes pod name, or the podman pod's name"),
        Column("pod_namespace", TEXT, "Kubernetes namespace"),
        Column("pod_uid", TEXT, "Kubernetes pod UID, or the podman pod's ID"),
        Column("exit_code", INTEGER, "die: the container's exit code; empty otherwise"),
        Column("pid", BIGINT, "The process that made the container's cgroup (runc, crun ...); empty when "
                              "vajrad did not see it (a container older than the daemon)"),
        Column("path", TEXT, "That process's executable"),
        Column("cmdline", TEXT, "That process's command line"),
        Column("ancestry", TEXT, "JSON array of that process's ancestors, [0] the immediate parent: the chain "
                                 "back to the `podman run` or daemon that asked for the container", shared=True),
    ),
    summary=("runtime", "action", "container_name", "container_image", "container_id"),
)

"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import BIGINT, INTEGER, TEXT, Column, Table

TABLE = Table(
    "containers",
    "Containers the runtimes (podman, Docker) reported or events showed, running and stopped; deleted ones "
    "stay 5 minutes. Live.",
    (
        Column("id", TEXT, "Container ID (64 hex)", index=True),
        Column("runtime", TEXT, "podman, docker, containerd, cri-o or cri"),
        Column("name", TEXT, "Container name"),
        Column("image", TEXT, "Image, as the runtime names it"),
        Column("image_id", TEXT, "Image ID"),
        Column("state", TEXT, "created, running, exited, removed ... as the runtime says"),
        Column("pid", BIGINT, "PID of the container's first process, while it runs"),
        Column("cgroup_id", BIGINT, "ID of the container's cgroup (the cid of its processes' events)"),
        Column("cgroup_path", TEXT, "Path of that cgroup below the cgroup v2 root"),
        Column("pod_name", TEXT, "Kubernetes pod name (label io.kubernetes.pod.name), or the podman pod's name"),
        Column("pod_namespace", TEXT, "Kubernetes namespace (label io.kubernetes.pod.namespace)"),
        Column("pod_uid", TEXT, "Kubernetes pod UID (label or cgroup path), or the podman pod's ID"),
        Column("labels", TEXT, "Labels, a JSON object"),
        Column("privileged", INTEGER, "1 for a privileged container"),
        Column("created", BIGINT, "Creation time, unix seconds"),
        Column("started", BIGINT, "Start time, unix seconds; 0 before it started"),
        Column("deleted", BIGINT, "Deletion time, unix seconds; 0 while it exists"),
        Column("first_seen", BIGINT, "When vajrad first knew of it, unix seconds"),
    ),
    evented=False,
)

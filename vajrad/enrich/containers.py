"""Which container (and Kubernetes pod) a process is in, from its cgroup.

The kernel gives every event the cgroup id of the task (the inode of its
cgroup v2 directory). Here:

- `parse_cgroup_path`: a cgroup path to (container id, runtime, pod uid), by
  an ordered table of the layouts runtimes use (LAYOUTS);
- `CgroupMap`: cgroup id -> path, from a walk of the cgroup2 mount at start
  and then the cgroup_mkdir/cgroup_rmdir tracepoints (bpf/cgroup.bpf.c);
  removed cgroups stay known for REMOVED_TTL_S so late events still resolve;
- `MetadataCache`: container id -> name, image, labels, ... as the runtimes
  (vajrad/enrich/runtimes.py) tell it; deleted containers stay REMOVED_TTL_S;
- `ContainerResolver`: both together, answering per event with a tuple of
  column values, cached per cgroup id so that a host process costs one dict
  lookup;
- `ContainerFill`: the bounded hold of rows whose container is known by id
  but whose metadata has not arrived yet (a container that lives 50 ms is
  gone before any runtime answers an inspect; its events and the runtime's
  event stream race).
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from cachetools import TTLCache

log = logging.getLogger(__name__)

REMOVED_TTL_S = 300.0          # deleted containers and removed cgroups stay resolvable this long
REMOVED_MAX = 65536            # ... at most this many of each
FILL_WAIT_MS = 2000            # default bound of the hold for late metadata

# Columns every table with container context carries, in this order (see
# vajrad/schema.py CONTAINER_COLUMNS).
CONTAINER_FIELDS = ("container_id", "container_name", "container_image", "container_runtime",
                    "pod_name", "pod_namespace", "pod_uid")
HOST = ("", "", "", "", "", "", "")

_HEX64 = r"([0-9a-f]{64})"
_UUID = r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"


@dataclass(frozen=True)
class Layout:
    """One way a runtime names a container's cgroup: a regex on one path
    component whose group 1 is the container id."""
    name: str
    runtime: str
    pattern: re.Pattern
    parent: str | None = None      # the component right above must be exactly this


# Ordered: the first layout matching a component wins. Components are tried
# from the leaf up, so the innermost container of a nested one is found, a
# runtime's sub-cgroup (podman's /container, a service inside a container)
# falls through to its container, and conmon's scopes (libpod-conmon-,
# crio-conmon-) and the runtimes' own services never match.
LAYOUTS: tuple[Layout, ...] = (
    Layout("docker-systemd", "docker", re.compile(r"docker-" + _HEX64 + r"\.scope")),
    Layout("docker-cgroupfs", "docker", re.compile(_HEX64), parent="docker"),
    # containerd with the cgroupfs driver and no cgroup parent (a CRI client
    # other than kubelet, nerdctl, ctr): /<namespace>/<id>; CRI's namespace is k8s.io.
    Layout("containerd-cgroupfs", "containerd", re.compile(_HEX64), parent="k8s.io"),
    Layout("cri-containerd-systemd", "containerd", re.compile(r"cri-containerd-" + _HEX64 + r"\.scope")),
    Layout("cri-containerd-slice", "containerd", re.compile(r".*:cri-containerd:" + _HEX64)),
    Layout("nerdctl", "containerd", re.compile(r"nerdctl-" + _HEX64 + r"\.scope")),
    Layout("crio", "cri-o", re.compile(r"crio-" + _HEX64 + r"(?:\.scope)?")),
    Layout("podman-payload", "podman", re.compile(r"libpod-payload-" + _HEX64)),
    Layout("podman", "podman", re.compile(r"libpod-" + _HEX64 + r"(?:\.scope)?")),
    # kubelet with the cgroupfs driver: /kubepods/<qos>/pod<uid>/<id>, the
    # runtime (containerd or CRI-O) unnamed by the path.
    Layout("kubepods-cgroupfs", "cri", re.compile(_HEX64), parent="pod"),
)
_POD = re.compile(r"(?:^|.*-)pod" + _UUID + r"(?:\.slice)?")


@dataclass(frozen=True)
class CgroupContainer:
    container_id: str
    runtime: str
    layout: str
    pod_uid: str = ""


def parse_cgroup_path(path: str) -> CgroupContainer | None:
    """The container a cgroup path belongs to, or None for the host's own
    cgroups (docker.service, containerd.service, user sessions ...)."""
    if not path or path == "/":
        return None
    parts = [p for p in path.split("/") if p]
    pod_uid = ""
    in_kubepods = False
    for p in parts:
        if p.startswith("kubepods"):
            in_kubepods = True
        if in_kubepods:
            m = _POD.fullmatch(p)
            if m:
                pod_uid = m.group(1).replace("_", "-")
    for i in range(len(parts) - 1, -1, -1):
        comp = parts[i]
        above = parts[i - 1] if i else ""
        for layout in LAYOUTS:
            if layout.parent is not None:
                if layout.parent == "pod":
                    if not (_POD.fullmatch(above) and in_kubepods):
                        continue
                elif above != layout.parent:
                    continue
            m = layout.pattern.fullmatch(comp)
            if m:
                return CgroupContainer(m.group(1), layout.runtime, layout.name, pod_uid)
    return None


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a hybrid host), or None on a v1-only host."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4]
    except OSError:
        return None
    return None


class CgroupMap:
    """cgroup id -> path (relative to the cgroup2 root, starting with /)."""

    def __init__(self, root: str | None = None):
        self.root = root if root is not None else cgroup2_mount()
        self.lock = threading.Lock()
        self.paths: dict[int, str] = {}
        self.removed: TTLCache = TTLCache(REMOVED_MAX, REMOVED_TTL_S)
        self.walked = 0
        # Set by the containers collector: waits (briefly) until its thread
        # has drained the cgroup records made so far.
        self.catch_up = lambda: None
        self.created = 0
        self.deleted = 0

    def walk(self) -> int:
        """Every cgroup that exists now; the tracepoints keep it current after."""
        if not self.root:
            return 0
        found: dict[int, str] = {}
        root = self.root.rstrip("/")
        for dirpath, dirnames, _ in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue        # removed while we walked
            found[ino] = dirpath[len(root):] or "/"
        with self.lock:
            for ino, path in found.items():
                self.paths.setdefault(ino, path)
        self.walked = len(found)
        return self.walked

    def mkdir(self, cgroup_id: int, path: str) -> None:
        with self.lock:
            self.paths[cgroup_id] = path
            self.created += 1

    def rmdir(self, cgroup_id: int, path: str) -> None:
        with self.lock:
            self.removed[cgroup_id] = self.paths.pop(cgroup_id, path)
            self.deleted += 1

    def path(self, cgroup_id: int) -> str | None:
        p = self.paths.get(cgroup_id)
        if p is None:
            with self.lock:
                p = self.removed.get(cgroup_id)
        return p

    def stats(self) -> dict:
        return {"cgroup_root": self.root or "", "cgroups_walked": self.walked, "cgroups": len(self.paths),
                "cgroups_created": self.created, "cgroups_removed": self.deleted}


@dataclass
class ContainerInfo:
    """What a runtime says about one container (the `containers` table)."""
    id: str
    runtime: str
    name: str = ""
    image: str = ""
    image_id: str = ""
    state: str = ""
    pid: int = 0
    labels: dict = field(default_factory=dict)
    privileged: int = 0
    created: int = 0
    started: int = 0
    deleted: int = 0
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    cgroup_id: int = 0
    cgroup_path: str = ""
    first_seen: int = 0
    complete: bool = False      # name and image known (from an inspect, a list or an event)
    asked_at: float = 0.0       # monotonic time a row first needed it

    def merge(self, other: "ContainerInfo") -> None:
        """What `other` knows, over what we knew; empty values never erase."""
        for k, v in other.__dict__.items():
            if k in ("id", "first_seen", "labels", "asked_at"):
                continue
            if v not in ("", 0, None, False):
                setattr(self, k, v)
        if other.labels:
            self.labels = {**self.labels, **other.labels}
        self.pod_labels()

    def pod_labels(self) -> None:
        """Kubernetes pod identity from the labels kubelet sets through CRI."""
        lab = self.labels
        self.pod_name = lab.get("io.kubernetes.pod.name", self.pod_name)
        self.pod_namespace = lab.get("io.kubernetes.pod.namespace", self.pod_namespace)
        self.pod_uid = lab.get("io.kubernetes.pod.uid", self.pod_uid)


class ContainerResolver:
    """cgroup id -> the container column values of a row.

    Runs on the collectors' polling threads (lookups) and on the event loop
    (metadata updates): `lock` guards `containers`; `_by_cgroup` is a cache
    of answers replaced whole, never mutated in place."""

    def __init__(self, cgroups: CgroupMap | None = None, fill_wait_ms: int = FILL_WAIT_MS):
        self.cgroups = cgroups or CgroupMap()
        self.fill_wait_ns = fill_wait_ms * 1_000_000
        self.lock = threading.Lock()
        self.containers: dict[str, ContainerInfo] = {}
        self.deleted: TTLCache = TTLCache(REMOVED_MAX, REMOVED_TTL_S)
        # cgroup id -> (values, complete); values as CONTAINER_FIELDS
        self._by_cgroup: dict[int, tuple[tuple, bool]] = {}
        # runtimes whose metadata source is (or was once) reachable: only
        # their containers are worth holding rows for.
        self.sources: dict[str, object] = {}
        self.wanted: callable | None = None      # (container_id, runtime): ask the runtime now
        self.v1_fallback = self.cgroups.root is None
        self.filled_late = 0
        self.fill_timeouts = 0
        self.unresolved_cgroups = 0
        self.fill_delays_ms: deque[float] = deque(maxlen=4096)
        # per container, from its first row's lookup to its name and image
        # being known (0 when they were known already)
        self.metadata_lags_ms: deque[float] = deque(maxlen=4096)

    # --- per event (polling threads) -------------------------------------
    def lookup(self, cgroup_id: int, pid: int = 0) -> tuple[tuple, bool]:
        """(values, complete): values as CONTAINER_FIELDS, HOST for a host
        process; complete False when the container's metadata is still due."""
        hit = self._by_cgroup.get(cgroup_id)
        if hit is not None and (hit[1] or hit[0] is HOST):
            return hit
        return self._resolve(cgroup_id, pid)

    def _resolve(self, cgroup_id: int, pid: int) -> tuple[tuple, bool]:
        if self.v1_fallback:
            path = self._v1_path(pid)
        else:
            path = self.cgroups.path(cgroup_id)
            if path is None:        # made a moment ago, and its record not drained yet?
                self.cgroups.catch_up()
                path = self.cgroups.path(cgroup_id)
        if path is None:
            # Not in the map even after a drain: a cgroup the walk could not
            # stat, or a v1 hierarchy's id. Counted, and taken as the host's.
            self.unresolved_cgroups += 1
            self._by_cgroup[cgroup_id] = (HOST, True)
            return HOST, True
        found = parse_cgroup_path(path)
        if found is None:
            answer = (HOST, True)
        else:
            with self.lock:
                info = self.containers.get(found.container_id) or self.deleted.get(found.container_id)
                if info is None:
                    info = self.containers[found.container_id] = ContainerInfo(
                        found.container_id, found.runtime, pod_uid=found.pod_uid, cgroup_id=cgroup_id,
                        cgroup_path=path, first_seen=int(time.time()), asked_at=time.monotonic())
                    ask = True
                else:
                    ask = False
                    if not info.cgroup_id:
                        info.cgroup_id, info.cgroup_path = cgroup_id, path
                    if not info.asked_at:
                        info.asked_at = time.monotonic()
                        if info.complete:
                            self.metadata_lags_ms.append(0.0)
                answer = self._values(info)
            if ask and self.wanted is not None:
                self.wanted(found.container_id, found.runtime)
        if not self.v1_fallback:
            if len(self._by_cgroup) > REMOVED_MAX:
                self._by_cgroup = {}
            self._by_cgroup[cgroup_id] = answer
        return answer

    def _values(self, info: ContainerInfo) -> tuple[tuple, bool]:
        values = (info.id, info.name, info.image, info.runtime, info.pod_name, info.pod_namespace,
                  info.pod_uid)
        # Nothing will ever come for a runtime we have no source for: the
        # id alone is all there is, and holding rows would only delay them.
        return values, info.complete or info.runtime not in self.sources

    @staticmethod
    def _v1_path(pid: int) -> str | None:
        """cgroup v1 only: the path from /proc/PID/cgroup (any hierarchy)."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                for line in f:
                    path = line.rstrip("\n").split(":", 2)[2]
                    if parse_cgroup_path(path):
                        return path
        except (OSError, IndexError):
            return None
        return "/"

    def by_pid(self, pid: int) -> tuple[tuple, bool]:
        """For a running process known only by pid (the logs unit's /proc
        fallback): its cgroup from /proc/PID/cgroup, then as lookup().
        HOST when the process is gone or its cgroup unknown."""
        if self.v1_fallback:
            return self.lookup(0, pid)
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                path = next((line[3:].rstrip("\n") for line in f if line.startswith("0::")), None)
            if path is None or not self.cgroups.root:
                return HOST, True
            cgroup_id = os.stat(self.cgroups.root.rstrip("/") + path).st_ino
        except OSError:
            return HOST, True
        return self.lookup(cgroup_id, pid)

    def known(self, container_id: str) -> ContainerInfo | None:
        """What the runtimes told of a container (live or deleted), or None."""
        with self.lock:
            return self.containers.get(container_id) or self.deleted.get(container_id)

    def by_id(self, container_id: str) -> tuple[tuple, bool] | None:
        with self.lock:
            info = self.containers.get(container_id) or self.deleted.get(container_id)
            return self._values(info) if info else None

    # --- from the runtimes (event loop) ----------------------------------
    def learn(self, info: ContainerInfo) -> ContainerInfo:
        """Metadata about a container from a list, inspect or event."""
        with self.lock:
            known = self.containers.get(info.id) or self.deleted.get(info.id)
            if known is None:
                info.first_seen = info.first_seen or int(time.time())
                info.pod_labels()
                known = info
                if not info.deleted:
                    self.containers[info.id] = info
                else:
                    self.deleted[info.id] = info
            else:
                was_complete = known.complete
                known.merge(info)
                if known.complete and not was_complete and known.asked_at:
                    self.metadata_lags_ms.append((time.monotonic() - known.asked_at) * 1000)
            if known.deleted and info.id in self.containers:
                self.deleted[info.id] = self.containers.pop(info.id)
            if known.cgroup_id:
                self._by_cgroup[known.cgroup_id] = self._values(known)
        return known

    def forget_answers(self) -> None:
        """After a source appears: answers given as complete for want of a
        source must be looked at again."""
        self._by_cgroup = {}

    def snapshot(self) -> list[ContainerInfo]:
        with self.lock:
            return list(self.containers.values()) + list(self.deleted.values())

    def stats(self) -> dict:
        return {**self.cgroups.stats(), "containers_known": len(self.containers),
                "containers_deleted": len(self.deleted), "rows_filled_late": self.filled_late,
                "fill_timeouts": self.fill_timeouts, "fill_p99_ms": _p99(self.fill_delays_ms),
                "metadata_lag_p99_ms": _p99(self.metadata_lags_ms),
                "unresolved_cgroups": self.unresolved_cgroups}


def namespaces_of(pid: int) -> tuple:
    """(pid, mnt, net) namespace inodes of a running process, None where
    /proc does not say (gone, or not ours to read)."""
    found = []
    for ns in ("pid", "mnt", "net"):
        try:
            found.append(os.stat(f"/proc/{pid}/ns/{ns}").st_ino)
        except OSError:
            found.append(None)
    return tuple(found)


def _p99(values) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1) if ordered else 0.0


class ContainerFill:
    """The hold between a collector's rows and their delivery: a row of a
    container whose name and image are not known yet waits until they are
    (then it is filled) or for at most the resolver's fill_wait; one that
    times out is delivered with the container id alone, and counted. Other
    rows never wait for it: a held row is stored when it goes, so its eid may
    come after those of later events (its time and ntime are its own). Runs
    on one collector's polling thread."""

    def __init__(self, resolver: ContainerResolver, columns: tuple[str, ...]):
        self.resolver = resolver
        self.first = columns.index("container_id")
        if columns[self.first:self.first + len(CONTAINER_FIELDS)] != CONTAINER_FIELDS:
            raise ValueError("container columns must follow each other in CONTAINER_FIELDS order")
        self._held: list[tuple[int, object]] = []

    def hold(self, rows: list, final: bool = False) -> list:
        """Takes a batch of rows (lists in column order, or dicts) and returns
        the rows that may go now: those not waiting, then those released."""
        first, resolver = self.first, self.resolver
        now = time.monotonic_ns()
        out = []
        for row in rows:
            if isinstance(row, list):
                cid, name = row[first], row[first + 1]
            else:
                cid, name = row.get("container_id"), row.get("container_name")
            if cid and not name:
                known = resolver.by_id(cid)
                if known is None or not known[1]:
                    self._held.append((now, row))
                    continue
                self._put(row, known[0])
            out.append(row)
        if self._held:
            out += self.release(final)
        return out

    def release(self, final: bool = False) -> list:
        if not self._held:
            return []
        now = time.monotonic_ns()
        wait = self.resolver.fill_wait_ns
        out, still = [], []
        for since, row in self._held:
            cid = row[self.first] if isinstance(row, list) else row["container_id"]
            known = self.resolver.by_id(cid)
            if known is not None and known[1]:
                self._put(row, known[0])
                self.resolver.filled_late += 1
                self.resolver.fill_delays_ms.append((now - since) / 1e6)
            elif final or now - since > wait:
                if known is not None:
                    self._put(row, known[0])
                self.resolver.fill_timeouts += 1
            else:
                still.append((since, row))
                continue
            out.append(row)
        self._held = still
        return out

    def _put(self, row, values: tuple) -> None:
        if isinstance(row, list):
            row[self.first:self.first + len(values)] = values
        else:
            row.update(zip(CONTAINER_FIELDS, values))

    @property
    def held(self) -> int:
        return len(self._held)

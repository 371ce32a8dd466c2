"""Cgroup path -> container id, one test per layout, on path strings as the
runtimes write them (no root, no runtime needed: these are the layouts of
runtimes that cannot run here as well as those that can)."""
from __future__ import annotations

import os

import pytest

from vajrad.enrich.containers import (HOST, CgroupMap, ContainerFill, ContainerInfo, ContainerResolver,
                                      parse_cgroup_path)

ID = "3f4e9a2b1c0d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f"
ID2 = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
UID = "0f2b3c1a-8e7d-4a5b-9c6d-1e2f3a4b5c6d"
UID_ = UID.replace("-", "_")

MATCHING = [
    # (layout, path, runtime, id, pod uid)
    ("docker-cgroupfs", f"/docker/{ID}", "docker", ID, ""),
    ("docker-systemd", f"/system.slice/docker-{ID}.scope", "docker", ID, ""),
    ("containerd-cgroupfs", f"/k8s.io/{ID}", "containerd", ID, ""),        # CRI without a cgroup parent
    ("cri-containerd-systemd", f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
                               f"cri-containerd-{ID}.scope", "containerd", ID, UID),
    ("cri-containerd-slice", f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
                             f"kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}", "containerd", ID, UID),
    ("nerdctl", f"/system.slice/nerdctl-{ID}.scope", "containerd", ID, ""),
    ("crio", f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope",
     "cri-o", ID, UID),
    ("crio", f"/kubepods/burstable/pod{UID}/crio-{ID}", "cri-o", ID, UID),
    ("podman", f"/machine.slice/libpod-{ID}.scope", "podman", ID, ""),
    ("podman", f"/libpod_parent/libpod-{ID}", "podman", ID, ""),             # --cgroup-manager=cgroupfs
    ("podman", f"/machine.slice/libpod-{ID}.scope/container", "podman", ID, ""),   # its /container sub-cgroup
    ("podman-payload", f"/machine.slice/libpod-payload-{ID}", "podman", ID, ""),
    ("podman", f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container",
     "podman", ID, ""),                                                     # rootless
    ("kubepods-cgroupfs", f"/kubepods/besteffort/pod{UID}/{ID}", "cri", ID, UID),
    ("kubepods-cgroupfs", f"/kubepods/pod{UID}/{ID}", "cri", ID, UID),     # guaranteed QoS
]


@pytest.mark.parametrize("layout,path,runtime,cid,pod_uid", MATCHING, ids=[f"{m[0]}:{i}" for i, m in enumerate(MATCHING)])
def test_layout(layout, path, runtime, cid, pod_uid):
    found = parse_cgroup_path(path)
    assert found is not None, path
    assert (found.layout, found.runtime, found.container_id, found.pod_uid) == (layout, runtime, cid, pod_uid)


def test_nested_container_is_the_innermost():
    assert parse_cgroup_path(f"/docker/{ID}/docker/{ID2}").container_id == ID2
    assert parse_cgroup_path(f"/system.slice/docker-{ID}.scope/machine.slice/libpod-{ID2}.scope/container"
                             ).container_id == ID2


def test_service_inside_a_container_is_that_container():
    found = parse_cgroup_path(f"/system.slice/docker-{ID}.scope/system.slice/nginx.service")
    assert (found.container_id, found.runtime) == (ID, "docker")


@pytest.mark.parametrize("path", [
    "/", "", "/system.slice/docker.service", "/system.slice/containerd.service", "/system.slice/crio.service",
    "/user.slice/user-0.slice/session-1.scope", "/libpod_parent/conmon", "/init.scope",
    f"/machine.slice/libpod-conmon-{ID}.scope", f"/system.slice/crio-conmon-{ID}.scope",
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice",   # the pod, no container
    f"/docker/{ID[:63]}",                     # not a full id
    f"/{ID}",                                 # a bare id under no runtime or pod
    f"/system.slice/docker-{ID.upper()}.scope",
])
def test_host_cgroups_do_not_match(path):
    assert parse_cgroup_path(path) is None


def test_cgroup_map_walks_a_real_tree(tmp_path):
    (tmp_path / "libpod_parent" / f"libpod-{ID}").mkdir(parents=True)
    cmap = CgroupMap(str(tmp_path))
    assert cmap.walk() == 3
    ino = os.stat(tmp_path / "libpod_parent" / f"libpod-{ID}").st_ino
    assert cmap.path(ino) == f"/libpod_parent/libpod-{ID}"
    assert cmap.path(os.stat(tmp_path).st_ino) == "/"
    cmap.rmdir(ino, f"/libpod_parent/libpod-{ID}")
    assert cmap.path(ino) == f"/libpod_parent/libpod-{ID}"      # late events still resolve
    assert ino not in cmap.paths


def test_resolver_and_late_fill():
    cmap = CgroupMap("")
    cmap.mkdir(77, f"/libpod_parent/libpod-{ID}")
    cmap.mkdir(78, "/system.slice/cron.service")
    resolver = ContainerResolver(cmap, fill_wait_ms=60_000)
    asked = []
    resolver.wanted = lambda cid, runtime: asked.append((cid, runtime))
    assert resolver.lookup(78) == (HOST, True)
    # No podman source: the id alone, nothing to wait for.
    values, complete = resolver.lookup(77)
    assert values[0] == ID and values[3] == "podman" and complete
    assert asked == [(ID, "podman")]
    resolver.sources["podman"] = object()
    resolver.forget_answers()
    values, complete = resolver.lookup(77)
    assert values[:2] == (ID, "") and not complete

    columns = ("pid", "container_id", "container_name", "container_image", "container_runtime", "pod_name",
               "pod_namespace", "pod_uid", "time")
    fill = ContainerFill(resolver, columns)
    host_row = [1, *HOST, 5]
    held_row = [2, *values, 6]
    dict_row = dict(zip(columns, [3, *values, 7]))
    assert fill.hold([held_row, host_row, dict_row]) == [host_row]    # the host's row never waits
    assert fill.held == 2
    resolver.learn(ContainerInfo(ID, "podman", name="web", image="localhost/img:1", complete=True,
                                 labels={"io.kubernetes.pod.name": "p", "io.kubernetes.pod.namespace": "ns",
                                         "io.kubernetes.pod.uid": UID}))
    out = fill.release()
    assert [r[0] if isinstance(r, list) else r["pid"] for r in out] == [2, 3]
    assert held_row[1:8] == [ID, "web", "localhost/img:1", "podman", "p", "ns", UID]
    assert dict_row["container_name"] == "web" and dict_row["pod_uid"] == UID
    assert host_row[1:8] == list(HOST)
    assert resolver.filled_late == 2 and resolver.fill_timeouts == 0
    stats = resolver.stats()
    # looked up before it was known: a lag, though status may round it to 0.0 ms
    assert stats["fill_p99_ms"] >= 0 and len(resolver.metadata_lags_ms) == 1 and resolver.metadata_lags_ms[0] > 0
    assert resolver.lookup(77) == ((ID, "web", "localhost/img:1", "podman", "p", "ns", UID), True)


def test_fill_times_out_with_the_id_alone():
    cmap = CgroupMap("")
    cmap.mkdir(90, f"/system.slice/docker-{ID}.scope")
    resolver = ContainerResolver(cmap, fill_wait_ms=0)
    resolver.sources["docker"] = object()
    values, complete = resolver.lookup(90)
    fill = ContainerFill(resolver, ("container_id", "container_name", "container_image", "container_runtime",
                                    "pod_name", "pod_namespace", "pod_uid"))
    row = list(values)
    assert not complete
    out = fill.hold([row])
    out += fill.release(final=True)
    assert out == [[ID, "", "", "docker", "", "", ""]]
    assert resolver.fill_timeouts == 1

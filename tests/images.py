"""Container images built here from a static busybox (no registry is
reachable from the test machines): the rootfs, the tarball `podman import`
takes, and a docker-archive (`docker save` layout) that `ctr images import`
and `docker load` take."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "true", "sleep", "cat", "nc", "echo", "touch")


def busybox_rootfs(root: str, applets=APPLETS) -> str:
    """A minimal root filesystem at `root`: busybox and its applets in /bin."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        os.makedirs(os.path.join(root, d))
    shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
    for applet in applets:
        os.symlink("busybox", os.path.join(root, "bin", applet))
    return root


def rootfs_tar(root: str, tar: str) -> str:
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    return tar


def docker_archive(root: str, tar: str, tag: str, cmd: list[str]) -> str:
    """`root` as a one-layer image tagged `tag` whose default command is
    `cmd`, in the docker-archive layout: manifest.json, the config named by
    its digest, the layer tar (its digest is the config's diff_id)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as t:
        t.add(root, arcname=".")
    layer_bytes = layer.getvalue()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]},
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(tar, "w") as t:
        for name, data in (("layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return tar

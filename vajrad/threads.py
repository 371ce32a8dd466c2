"""Kernel-visible names for vajrad's threads, so that `top -H`, `ps -L` and
/proc show which one (a collector's poller, the store's writer) is busy."""
from __future__ import annotations

import threading


def name_native_thread(name: str) -> None:
    """Names the calling thread (at most 15 bytes, the kernel's limit)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:          # no /proc: the name is only a convenience
        pass

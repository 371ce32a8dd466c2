"""`userns_exec.py WATCHES COMMAND...`: runs COMMAND in a user namespace of its
own, with user.max_inotify_watches lowered to WATCHES there and nowhere else.

A process cannot map more than its own id into a namespace it made, so the
test that started this one (root outside) writes the maps: ids 0-65535 inside
are the same ids outside, so files, the socket's group and the notify
socket keep their owners. This waits for that, then sets the limit and execs."""
import ctypes
import os
import sys
import time

CLONE_NEWUSER = 0x10000000


def main() -> int:
    watches, argv = sys.argv[1], sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        print(f"unshare(CLONE_NEWUSER): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + 30
    while not open("/proc/self/gid_map").read().strip():
        if time.monotonic() > deadline:
            print("nobody wrote this namespace's id maps", file=sys.stderr)
            return 1
        time.sleep(0.01)
    with open("/proc/sys/user/max_inotify_watches", "w") as f:
        f.write(watches)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main())

"""A Debian 12 system booted with systemd as PID 1, for tests that need the
real thing: systemd's service manager, the real system bus, apt.

The root is made once with debootstrap and cached under CACHE (this module
owns that directory; it is rebuilt when missing or when the recipe changes).
Each boot runs on an overlay of the cached root, so nothing a test does
reaches the cache, and apt's downloaded packages are kept in CACHE/archives
so repeat runs download nothing. The container shares the host's network
(apt reaches Debian's mirror) and kernel: BPF, tracefs and BTF are the host's,
which is what vajrad inside needs.

    with BootedSystem() as box:
        box.install_deb("/path/vajra_0.1.0_all.deb")
        box.run("systemctl", "is-active", "vajrad")
        box.journal("vajrad")

Run as a script to build (or check) the cached root: `python3 tests/booted.py`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("VAJRA_BOOTED_CACHE", "/var/cache/vajra-booted"))
SUITE = "bookworm"
# What the root holds beyond minbase: an init, a system bus, and the tools the
# tests drive it with (busctl and journalctl come with systemd).
INCLUDE = ("systemd", "systemd-sysv", "dbus", "libpam-systemd", "procps", "util-linux", "passwd",
           "ca-certificates")
RECIPE = f"{SUITE} minbase {' '.join(INCLUDE)} v1"


def mirror() -> str:
    """The mirror this machine's apt uses, so that the root is built from
    wherever this host can reach; Debian's CDN otherwise."""
    if env := os.environ.get("VAJRA_DEBIAN_MIRROR"):
        return env
    sources = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                for uri in words[1:]:
                    if "security" not in uri:
                        return uri
            elif words[:1] == ["deb"]:
                uri = next((w for w in words[1:] if "://" in w), "")
                if uri and "security" not in uri:
                    return uri
    return "http://deb.debian.org/debian"


def can_boot() -> tuple[bool, str]:
    """Whether this host can run the booted-system tests, and if not, why."""
    if os.geteuid() != 0:
        return False, "needs root to debootstrap and boot a container"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if not shutil.which(tool):
            return False, f"{tool} is not installed (apt-get install debootstrap systemd-container)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return False, "the kernel has no BTF at /sys/kernel/btf/vmlinux"
    return True, ""


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached_root() -> Path:
    """The debootstrapped root, built on first use. Built beside its final
    place and renamed in, so a run interrupted half-way leaves no half root;
    concurrent callers wait on a lock rather than build twice."""
    key = hashlib.sha256(RECIPE.encode()).hexdigest()[:12]
    root = CACHE / f"{SUITE}-{key}"
    with _locked(CACHE / "build.lock"):
        if (root / "usr/lib/systemd/systemd").exists():
            return root
        for stale in CACHE.glob(f"{SUITE}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix="building-", dir=CACHE))
        try:
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                            SUITE, str(building), mirror()],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except subprocess.CalledProcessError as e:
            shutil.rmtree(building, ignore_errors=True)
            raise RuntimeError(f"debootstrap from {mirror()} failed: {e.stderr[-2000:]}") from e
        # apt inside uses the same mirror; security updates too, so that what
        # the tests install is what an admin's fresh machine would get.
        m = mirror()
        (building / "etc/apt/sources.list").write_text(
            f"deb {m} {SUITE} main\ndeb {m} {SUITE}-updates main\n"
            f"deb {m.replace('/debian', '/debian-security')} {SUITE}-security main\n")
        (building / "etc/hostname").write_text("vajra-booted\n")
        # A console login prompt would only add noise to the journal.
        (building / "etc/systemd/system/console-getty.service").symlink_to("/dev/null")
        (building / "etc/machine-id").write_text("")     # systemd makes one per boot
        os.rename(building, root)
        return root


class CommandFailed(AssertionError):
    pass


class BootedSystem:
    """One boot of the cached root. A context manager; close() powers it off
    and removes the overlay."""

    def __init__(self, name: str = "vajra-booted"):
        self.name = name
        self.root = cached_root()
        self.work = Path(tempfile.mkdtemp(prefix="vajra-boot-"))
        self.merged = self.work / "merged"
        self.console = self.work / "console.log"
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self._mounted = False

    # --- lifecycle -------------------------------------------------------------
    def start(self, timeout: float = 120) -> "BootedSystem":
        for d in ("upper", "overlay-work", "merged"):
            (self.work / d).mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.root},upperdir={self.work}/upper,workdir={self.work}/overlay-work",
                        str(self.merged)], check=True)
        self._mounted = True
        archives = CACHE / "archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        self._console = open(self.console, "w")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.merged), "--boot", "--register=no", "--keep-unit",
             f"--machine={self.name}", "--capability=all",
             "--system-call-filter=bpf perf_event_open",
             f"--bind={archives}:/var/cache/apt/archives",
             "--bind=/sys/kernel/tracing", "--console=passive"],
            stdout=self._console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.leader = self._find_leader(timeout)
        # Until systemd is up, systemctl answers nothing or "starting".
        deadline = time.monotonic() + timeout
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the container did not boot ({state!r}): {self.console_text()}")
            time.sleep(0.2)
            state = self.run("systemctl", "is-system-running", check=False, timeout=timeout).stdout.strip()
        return self

    def _find_leader(self, timeout: float) -> int:
        """The container's PID 1, seen from the host: a descendant of
        systemd-nspawn whose PID in its own namespace is 1."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}: {self.console_text()}")
            for pid in _descendants(self.proc.pid):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
                # PID 1 is nspawn's own stub until it executes systemd.
                if len(nspid) > 1 and nspid[-1] == "1" and _comm(pid) == "systemd":
                    return pid
            time.sleep(0.1)
        raise RuntimeError(f"no container init within {timeout} s: {self.console_text()}")

    def console_text(self) -> str:
        try:
            return self.console.read_text()[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGRTMIN+4 asks systemd for poweroff; nspawn exits with the container.
            with contextlib.suppress(ProcessLookupError):
                if self.leader:
                    os.kill(self.leader, signal.SIGRTMIN + 4)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            self._console.close()
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.merged)], check=False)
            self._mounted = False
        shutil.rmtree(self.work, ignore_errors=True)
        self.proc = None

    def __enter__(self) -> "BootedSystem":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- inside ----------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 120, user: str | None = None,
            groups: str | None = None, input: str | None = None) -> subprocess.CompletedProcess:
        """argv inside the container (all its namespaces, its root), as root or
        as `user` with only the supplementary `groups` given."""
        prefix: list[str] = []
        if user:
            prefix = ["setpriv", f"--reuid={user}", f"--regid={user if user != 'nobody' else 'nogroup'}"]
            prefix += [f"--groups={groups}"] if groups else ["--clear-groups"]
        env = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]
        cmd = ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid",
               "--cgroup", f"--root=/proc/{self.leader}/root", f"--wd=/proc/{self.leader}/root",
               *env, *prefix, *argv]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and out.returncode != 0:
            raise CommandFailed(f"{shlex.join(argv)} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, **kw)

    def path(self, inside: str) -> Path:
        """A path inside the container, as the host reaches it."""
        return self.merged / inside.lstrip("/")

    def copy_in(self, host_path: str, inside: str) -> str:
        shutil.copy(host_path, self.path(inside))
        return inside

    def install_deb(self, deb: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """`apt install ./vajra_*.deb`: the package and everything it depends
        on (and recommends) come from Debian's archive."""
        inside = self.copy_in(deb, "/root/" + os.path.basename(deb))
        # Booted systems of concurrent runs share CACHE/archives, whose apt
        # lock fails at once when held ("held by process 0": another pid
        # namespace): they take turns on a lock of the host's.
        with _locked(CACHE / "archives.lock"):
            self.run("apt-get", "update", "-qq", timeout=timeout)
            return self.run("apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confdef",
                            "-o", "Dpkg::Options::=--force-confold",
                            inside, timeout=timeout)

    def journal(self, unit: str | None = None, since_cursor: str | None = None) -> str:
        args = ["journalctl", "--no-pager", "-o", "short-monotonic"]
        args += ["-u", unit] if unit else []
        args += [f"--after-cursor={since_cursor}"] if since_cursor else []
        return self.run(*args, check=False).stdout

    def cursor(self) -> str:
        """The journal's current end, to read only what comes after it."""
        out = self.run("journalctl", "-n", "0", "--show-cursor", "--no-pager", check=False).stdout
        return next((line.split("cursor: ", 1)[1] for line in out.splitlines() if "cursor: " in line), "")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s")
            time.sleep(0.2)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            found.append(c)
            todo.append(c)
    return found


if __name__ == "__main__":
    ok, why = can_boot()
    if not ok:
        raise SystemExit(why)
    print(cached_root())

"""Runs real vajrad processes for the tests: a NOTIFY_SOCKET listener stands in
for systemd, and a private dbus-daemon with the system bus's default policy
plus ours stands in for the system bus."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from osquery.extensions import Extension, ExtensionManager, ttypes
from thrift.protocol import TBinaryProtocol
from thrift.transport import TSocket, TTransport

from vajrad.client.connection import VajraClient
from vajrad.osquery import protocol as p

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "dbus" / "org.vajra.Vajra1.conf"
SERVICE_UNIT = REPO / "systemd" / "vajrad.service"

_runtime_dir: str | None = None


def runtime_directory() -> str:
    """The daemons' RUNTIME_DIRECTORY (where vajrad merges its kernel header
    tree), one for the whole run so the tree is built once, and never the
    host's /run/vajra. Removed when the run ends."""
    global _runtime_dir
    if _runtime_dir is None:
        _runtime_dir = tempfile.mkdtemp(prefix="vajra-test-run-")      # 0700
        atexit.register(shutil.rmtree, _runtime_dir, True)
    return _runtime_dir


def private_directory(prefix: str = "vajra-test-") -> str:
    """A temp directory others may traverse but not list (0711): unprivileged
    test clients reach a socket inside by its name, nobody browses it."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o711)
    return d


def shipped_watchdog_usec() -> int:
    """WATCHDOG_USEC as systemd sets it from the shipped unit's WatchdogSec."""
    for line in SERVICE_UNIT.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "WatchdogSec":
            value = value.strip()
            units = (("min", 60_000_000), ("ms", 1000), ("us", 1), ("s", 1_000_000))
            for suffix, scale in units:
                if value.endswith(suffix):
                    return int(float(value[:-len(suffix)]) * scale)
            return int(float(value) * 1_000_000)        # bare seconds
    raise AssertionError(f"no WatchdogSec in {SERVICE_UNIT}")


# Code run as another user (nobody, a vajra member) runs on the system Python
# from a world-readable copy of the package: the checkout and its venv may
# sit in /root (mode 0700), where such a user cannot read them.
SYSTEM_PYTHON = "/usr/bin/python3"
_shared_copy: str | None = None


def world_readable_package() -> str:
    """A directory any user can put on PYTHONPATH to import this checkout's
    vajrad; made once per test session, removed at exit."""
    global _shared_copy
    if _shared_copy is None:
        import atexit
        d = tempfile.mkdtemp(prefix="vajra-pkg-")
        shutil.copytree(REPO / "vajrad", os.path.join(d, "vajrad"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for root, dirs, files in os.walk(d):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        atexit.register(shutil.rmtree, d, True)
        _shared_copy = d
    return _shared_copy


def run_as(user: str, argv: list[str], groups: str | None = None, **kw) -> subprocess.CompletedProcess:
    """argv as `user` (group nogroup, only `groups` as supplementary ones),
    from /, with this checkout's vajrad importable by the system Python."""
    prefix = ["setpriv", f"--reuid={user}", "--regid=nogroup"]
    prefix += [f"--groups={groups}"] if groups else ["--clear-groups"]
    env = dict(os.environ, PYTHONPATH=world_readable_package())
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([*prefix, *argv], cwd="/", env=env, capture_output=True, text=True, **kw)


def can_bpf() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root to load BPF programs"
    if not os.path.exists("/sys/kernel/btf/vmlinux") and not os.path.isdir(
            f"/lib/modules/{os.uname().release}/build"):
        return False, "kernel has neither BTF nor matching headers"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False, "python3-bpfcc is not installed"
    from vajrad.kernel.environment import bpf_refusal
    if refusal := bpf_refusal():
        return False, refusal
    return True, ""


class NotifyListener:
    """A datagram socket playing systemd's end of sd_notify, read continuously
    on a thread as systemd would."""

    def __init__(self, directory: str, on_message=None):
        self.path = os.path.join(directory, "notify.sock")
        # Called on the reading thread with each message as it arrives, before
        # the next is read: what a test does there happens "right at" it.
        self.on_message = on_message
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.reading = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self.reading:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            message = data.decode()
            if self.on_message is not None:
                self.on_message(message)
            self.messages.append((time.monotonic(), message))

    def pause(self) -> None:
        """Stops reading, as a wedged receiver would."""
        self.reading = False
        self._thread.join()

    def states(self) -> list[str]:
        return [line for _, m in list(self.messages) for line in m.split("\n")]

    def mark(self) -> int:
        """A position in the messages, for wait_for(after=...)."""
        return len(self.messages)

    def lines_after(self, after: int) -> list[str]:
        return [line for _, m in list(self.messages)[after:] for line in m.split("\n")]

    def wait_for(self, key: str, timeout: float, proc: subprocess.Popen | None = None,
                 after: int = 0, count: int = 1) -> str:
        """The count-th message after position `after` with a line starting with key."""
        deadline = time.monotonic() + timeout
        while True:
            seen = 0
            for _, msg in list(self.messages)[after:]:
                if any(line.startswith(key) for line in msg.split("\n")):
                    seen += 1
                    if seen == count:
                        return msg
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"vajrad exited with {proc.returncode} before {key}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {key} within {timeout} s; got {self.states()}")
            time.sleep(0.02)

    def close(self) -> None:
        time.sleep(0.1)          # what was sent on the way down
        self.reading = False
        self._thread.join()
        self.sock.close()


class Daemon:
    def __init__(self, workdir: str, *flags: str, env: dict | None = None, prefix: list[str] | None = None,
                 database: str | None = None):
        self.workdir = workdir
        self.socket = os.path.join(workdir, "vajra.sock")
        self.database = database or os.path.join(workdir, "events.db")
        self.flags = [f"--api_socket={self.socket}", f"--database_path={self.database}",
                      "--dbus=none", *flags]
        # Detection rules run only in the tests that ask for them: the default
        # rules would otherwise mark other tests' events (programs copied to
        # /tmp) is_open, and cost CPU they do not measure.
        if not any(f.startswith(("--enable_alerts", "--noenable_alerts")) for f in flags):
            self.flags.append("--enable_alerts=false")
        if not any(f.startswith("--config_path") for f in flags):
            cfg = os.path.join(workdir, "vajra.conf")
            if not os.path.exists(cfg):
                # No row limit: on a busy host (other tests, benches) the
                # default 50,000 rows are trimmed within a minute, before a
                # test reads the rows it made (seen: 196,344 expired).
                Path(cfg).write_text('{"options": {"events_max": 0}}')
            self.flags.append(f"--config_path={cfg}")
        self.env = dict(os.environ, RUNTIME_DIRECTORY=runtime_directory(), **(env or {}))
        self.prefix = prefix or []
        self.proc: subprocess.Popen | None = None
        self.notify: NotifyListener | None = None
        self.stderr_path = os.path.join(workdir, f"vajrad-{time.monotonic_ns()}.log")
        self.ready_after: float | None = None
        self.on_notify = None           # NotifyListener.on_message for the next start()

    def start(self, wait_ready: bool = True, timeout: float = 30) -> "Daemon":
        self.notify = NotifyListener(tempfile.mkdtemp(dir=self.workdir), self.on_notify)
        env = dict(self.env, NOTIFY_SOCKET=self.notify.path, PYTHONUNBUFFERED="1")
        self._stderr = open(self.stderr_path, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "vajrad", *self.flags],
                                     env=env, stdout=self._stderr, stderr=subprocess.STDOUT,
                                     cwd=str(REPO))
        if wait_ready:
            self.notify.wait_for("READY=1", timeout, self.proc)
            self.ready_after = time.monotonic() - t0
        return self

    @property
    def log(self) -> str:
        return Path(self.stderr_path).read_text()

    def wait_log(self, text: str, timeout: float = 30) -> str:
        """The log, once it holds text."""
        deadline = time.monotonic() + timeout
        while text not in self.log:
            assert time.monotonic() < deadline, f"no {text!r} in the log within {timeout} s:\n{self.log}"
            assert self.proc is None or self.proc.poll() is None or text in self.log, self.log
            time.sleep(0.05)
        return self.log

    def client(self) -> VajraClient:
        return VajraClient(self.socket, timeout=10).connect()

    def call(self, method: str, params=None):
        with self.client() as c:
            return c.call(method, params)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.notify:
            self.notify.close()
        self._stderr.close()
        self.proc = None
        return rc

    def wait_events(self, predicate, table: str = "bpf_process_events", timeout: float = 30,
                    want: int = 1, since_time: int = 0, settle: float = 0.0) -> list[dict]:
        """The rows of `table` matching predicate, once there are `want` of them
        (or what there is at the timeout), plus any that come within `settle`
        seconds after. The table is read once from since_time, then only past
        the last eid seen: a busy table is not rescanned every poll."""
        deadline = time.monotonic() + timeout
        found: list[dict] = []
        flt: dict = {"start_time": since_time}
        with self.client() as c:
            while True:
                for e in c.iter_events(flt, table):
                    flt = {"start_eid": e["eid"] + 1}
                    if predicate(e):
                        found.append(e)
                if len(found) >= want and settle:
                    time.sleep(settle)          # what else comes: the only wait on absence
                    settle = 0.0
                    continue
                if len(found) >= want or time.monotonic() > deadline:
                    return found
                time.sleep(0.1)


def proc_ancestors(pid: int) -> list[int]:
    """pid's ancestors as /proc has them, parent first, up to pid 1."""
    out = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def unique_program(directory: str, name: str) -> str:
    """A copy of /bin/true under a name nobody else executes."""
    path = os.path.join(directory, name)
    shutil.copy("/bin/true", path)
    os.chmod(path, 0o755)
    return path


SYSTEM_LIKE_BUS = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <!-- the default policy of Debian's system bus (/usr/share/dbus-1/system.conf) -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


class PrivateBus:
    """A private dbus-daemon with the system bus's default policy plus ours.

    dbus-daemon resolves group names when it loads its config: a <policy
    group="vajra"> block whose group does not exist yet is dropped ("Unknown
    group") and stays dropped. So a test that creates the group calls
    ensure_group(), which reloads the bus's config once the group exists."""

    def __init__(self, policy: Path | str = POLICY):
        # World-traversable, so that the tests' unprivileged clients reach it.
        self.dir = tempfile.mkdtemp(prefix="vajra-bus-")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "bus")
        self.address = f"unix:path={self.path}"
        self.created_groups: list[str] = []
        conf = os.path.join(self.dir, "bus.conf")
        Path(conf).write_text(SYSTEM_LIKE_BUS.format(path=self.path, policy=policy))
        self.proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("dbus-daemon failed: " + self.proc.stderr.read())

    def reload_config(self) -> None:
        """ReloadConfig returns once the bus has re-read its config (and
        re-resolved group names), so the next call sees the new policy."""
        self.busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                    "ReloadConfig")

    def ensure_group(self, name: str = "vajra") -> int:
        """The group's id, creating the group if needed (removed again by
        close()), with the bus's policy reloaded so that it counts."""
        import grp
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            subprocess.run(["groupadd", "--system", name], check=True)
            self.created_groups.append(name)
            gid = grp.getgrnam(name).gr_gid
        self.reload_config()
        return gid

    def busctl(self, *args: str, user: str | None = None, groups: str | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
        prefix: list[str] = []
        if user:
            prefix = ["setpriv", f"--reuid={user}", "--regid=nogroup"]
            prefix += [f"--groups={groups}"] if groups else ["--clear-groups"]
        return subprocess.run([*prefix, "busctl", f"--address={self.address}", *args],
                              capture_output=True, text=True, check=check, timeout=20)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for name in self.created_groups:
            subprocess.run(["groupdel", name], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def jsonrpc_lines(sock_path: str, payload: bytes, replies: int, timeout: float = 10) -> list[dict]:
    """Sends raw bytes and reads `replies` response lines."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    s.sendall(payload)
    buf = b""
    out = []
    while len(out) < replies:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and len(out) < replies:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
    s.close()
    return out


# --- osquery core, played by osquery's official Thrift stubs (PyPI's osquery) ---

# osquery core's own tables on Linux (osquery 5.x specs/ and specs/linux/;
# /work/shared/reference/osquery-facts.md), evented ones first: an extension
# table of one of these names is refused by a real core, and so by this one.
OSQUERY_LINUX_TABLES = frozenset({
    "bpf_process_events", "bpf_socket_events", "file_events", "process_events", "process_file_events",
    "socket_events", "hardware_events", "selinux_events", "seccomp_events", "syslog_events",
    "user_events", "yara_events", "apparmor_events",
    "process_open_sockets", "processes", "process_envs", "process_memory_map", "process_namespaces",
    "process_open_files", "listening_ports", "users", "groups", "file", "hash", "mounts", "time",
    "uptime", "system_info", "os_version", "kernel_info", "kernel_modules", "deb_packages",
    "rpm_packages", "apt_sources", "crontab", "etc_hosts", "interface_addresses", "routes",
    "arp_cache", "iptables", "docker_containers", "logged_in_users", "last", "shadow", "sudoers",
    "authorized_keys", "memory_info", "cpu_time", "block_devices", "disk_encryption",
    "dns_resolvers", "shared_memory", "yara", "augeas", "osquery_info", "osquery_extensions",
    "osquery_flags", "osquery_registry", "osquery_schedule",
})
# The process-ancestry build of osquery 5.18.1 (osquery-ancestry-README.txt) adds this one.
OSQUERY_ANCESTRY_BUILD_TABLES = OSQUERY_LINUX_TABLES | {"process_ancestry_cache_stats"}
def osquery_context(table: str, constraints=(), select=None) -> str:
    """The query context osquery core sends with `generate`, as osquery 5.x
    builds it (TablePlugin::setRequestFromContext): constraints, colsUsed (the
    names of the columns SQLite marks used in xBestIndex's colUsed, which counts
    WHERE columns too) and colsUsedBitset (colUsed itself: bit i for column i
    of the registered routes, bit 63 for any column from the 64th on).
    `select` None is `SELECT *`, which leaves out HIDDEN columns; [] is
    `SELECT count(*)`, which uses none."""
    from vajrad.tables import TABLES
    columns = TABLES[table].columns
    if select is None:
        select = [c.name for c in columns if not c.hidden]
    used = set(select) | {c["name"] for c in constraints}
    bits = 0
    for i, c in enumerate(columns):
        if c.name in used:
            bits |= 1 << min(i, 63)
    names = [c.name for i, c in enumerate(columns) if bits >> min(i, 63) & 1]
    return json.dumps({"constraints": list(constraints), "colsUsed": names, "colsUsedBitset": bits})


class FakeCore:
    """osquery core's extension manager, as far as an extension can see it."""


class FakeCore:
    """osquery core's extension manager, as far as an extension can see it:
    by default with osquery's own Linux tables, which it refuses to let an
    extension register again."""

    def __init__(self, options=None, core_tables=OSQUERY_LINUX_TABLES, list_tables=True):
        self.opts = {"disable_events": "false", "enable_bpf_events": "true", **(options or {})}
        self.core_tables = set(core_tables)
        self.list_tables = list_tables
        self.registered = {}
        self.attempts = []
        self.uuid = 1000

    def ping(self):
        return ttypes.ExtensionStatus(code=0, message="OK")

    def call(self, registry, item, request):
        return ttypes.ExtensionResponse(status=ttypes.ExtensionStatus(code=1, message="core"), response=[])

    def shutdown(self):
        pass

    def extensions(self):
        return {u: info for u, (info, _) in self.registered.items()}

    def options(self):
        return {k: ttypes.InternalOptionInfo(value=v, default_value="", type="bool") for k, v in self.opts.items()}

    def registerExtension(self, info, registry):
        self.attempts.append(registry)
        if any(i.name == info.name for i, _ in self.registered.values()):
            return ttypes.ExtensionStatus(code=1, message="Duplicate extension registered")
        for name in registry.get("table", {}):
            if name in self.core_tables:
                return ttypes.ExtensionStatus(code=1, message=f"Failed adding registry: Duplicate registry item exists: {name}")
        self.uuid += 1
        self.registered[self.uuid] = (info, registry)
        return ttypes.ExtensionStatus(code=0, message="OK", uuid=self.uuid)

    def deregisterExtension(self, uuid):
        self.registered.pop(uuid, None)
        return ttypes.ExtensionStatus(code=0, message="OK")

    def query(self, sql):
        if "osquery_registry" in sql and self.list_tables:
            rows = [{"name": n} for n in sorted(self.core_tables)]
            return ttypes.ExtensionResponse(status=ttypes.ExtensionStatus(code=0, message="OK"), response=rows)
        return ttypes.ExtensionResponse(status=ttypes.ExtensionStatus(code=1, message="no such table"), response=[])

    def getQueryColumns(self, sql):
        return self.query(sql)


class OsqueryCore:
    def __init__(self, directory, **kw):
        self.path = os.path.join(directory, "osquery.em")
        self.handler = FakeCore(**kw)
        # osquery-python's generated processor, served on a Unix socket
        # osquery-python's stubs predate thrift's C codec: plain binary protocol for them
        self.server = p.UnixServer(self.path, ExtensionManager.Processor(self.handler),
                                   TBinaryProtocol.TBinaryProtocol).start()
        self.shim = None

    def start_shim(self, vajra_socket, *extra, wait=True):
        """Runs the extension the way osquery autoloads it."""
        self.shim = subprocess.Popen([sys.executable, "-m", "vajrad.osquery", "--socket", self.path,
                                      "--timeout", "5", "--interval", "0.5", "--verbose",
                                      "--vajra_socket", vajra_socket, *extra],
                                     stderr=subprocess.PIPE, text=True)
        if wait:
            deadline = time.monotonic() + 20
            while not self.handler.registered:
                assert self.shim.poll() is None, self.shim.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            uuid = next(iter(self.handler.registered))
            self.ext_path = f"{self.path}.{uuid}"
            while not os.path.exists(self.ext_path):
                time.sleep(0.05)
        return self.shim

    def client(self):
        transport = TTransport.TBufferedTransport(TSocket.TSocket(unix_socket=self.ext_path))
        transport.open()
        return Extension.Client(TBinaryProtocol.TBinaryProtocol(transport))

    def fast_client(self) -> p.Client:
        """The same calls through thrift's C codec: osquery core is C++, so
        timings should not include pure-Python decoding on the caller's side."""
        transport = TTransport.TBufferedTransport(TSocket.TSocket(unix_socket=self.ext_path))
        transport.open()
        return p.Client(p.binary_protocol(transport), p.EXTENSION_METHODS)

    def stop(self):
        if self.shim and self.shim.poll() is None:
            self.shim.kill()
            self.shim.wait()
        self.server.stop()


def private_runtime(problem, make, prefix: str, prepare=("start",)):
    """A test module's own container runtime (for a module-scoped fixture to
    `yield from`): skipped with problem()'s reason when it cannot run here,
    made in a temporary directory, prepared (prepare: its methods, in order),
    and cleaned up with the directory afterwards."""
    import pytest
    why = problem()
    if why:
        pytest.skip(why)
    workdir = tempfile.mkdtemp(prefix=prefix)
    runtime = make(workdir)
    try:
        for step in prepare:
            getattr(runtime, step)()
        yield runtime
    finally:
        runtime.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_runtime_connected(d, runtime: str, timeout: float = 30) -> dict:
    """The containers unit's status once it is connected to `runtime`."""
    deadline = time.monotonic() + timeout
    stats: dict = {}
    while time.monotonic() < deadline:
        stats = d.call("status")["collectors"]["containers"]
        if stats["runtimes"][runtime]["connected"]:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"never connected to {runtime}: {stats}")


def wait_unix_socket(path: str, alive=lambda: True, timeout: float = 30, what: str = "the service") -> None:
    """Returns once `path` accepts a connection; fails when alive() turns
    false (the server exited) or at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"{what} exited before its socket {path} answered")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not come up on {path}")


def remove_empty_dirs(top: str) -> None:
    """The empty directories under top, deepest first, and top itself if it
    ends up empty: what runtimes' shims leave; anything with content stays."""
    for d, _, _ in sorted(os.walk(top), key=lambda e: len(e[0]), reverse=True):
        try:
            os.rmdir(d)
        except OSError:
            pass


def pids_whose_cmdline(predicate) -> list[int]:
    """pids whose /proc/PID/cmdline (the raw bytes) satisfies predicate."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if predicate(f.read()):
                        found.append(int(entry))
            except OSError:
                pass
    return found

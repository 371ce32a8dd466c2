"""Runs real vajrad processes for the tests: a NOTIFY_SOCKET listener stands in
for systemd, and a private dbus-daemon with the system bus's default policy
plus ours stands in for the system bus."""
from __future__ import annotations

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
    return True, ""


class NotifyListener:
    """A datagram socket playing systemd's end of sd_notify, read continuously
    on a thread as systemd would."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "notify.sock")
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
            self.messages.append((time.monotonic(), data.decode()))

    def pause(self) -> None:
        """Stops reading, as a wedged receiver would."""
        self.reading = False
        self._thread.join()

    def states(self) -> list[str]:
        return [line for _, m in list(self.messages) for line in m.split("\n")]

    def wait_for(self, key: str, timeout: float, proc: subprocess.Popen | None = None) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for _, msg in list(self.messages):
                if any(line.startswith(key) for line in msg.split("\n")):
                    return msg
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"vajrad exited with {proc.returncode} before {key}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key} within {timeout} s; got {self.states()}")
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
                Path(cfg).write_text('{"options": {}}')
            self.flags.append(f"--config_path={cfg}")
        self.env = dict(os.environ, **(env or {}))
        self.prefix = prefix or []
        self.proc: subprocess.Popen | None = None
        self.notify: NotifyListener | None = None
        self.stderr_path = os.path.join(workdir, f"vajrad-{time.monotonic_ns()}.log")
        self.ready_after: float | None = None

    def start(self, wait_ready: bool = True, timeout: float = 30) -> "Daemon":
        self.notify = NotifyListener(tempfile.mkdtemp(dir=self.workdir))
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

    def wait_events(self, predicate, table: str = "bpf_process_events", timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        found: list[dict] = []
        with self.client() as c:
            while time.monotonic() < deadline:
                found = [e for e in c.iter_events({"start_time": 0}, table) if predicate(e)]
                if found:
                    return found
                time.sleep(0.1)
        return found


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
    def __init__(self):
        # World-traversable, so that the tests' unprivileged clients reach it.
        self.dir = tempfile.mkdtemp(prefix="vajra-bus-")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "bus")
        self.address = f"unix:path={self.path}"
        conf = os.path.join(self.dir, "bus.conf")
        Path(conf).write_text(SYSTEM_LIKE_BUS.format(path=self.path, policy=POLICY))
        self.proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("dbus-daemon failed: " + self.proc.stderr.read())

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

class FakeCore:
    """osquery core's extension manager, as far as an extension can see it."""

    def __init__(self, options=None, core_tables=(), list_tables=True):
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
            rows = [{"name": n} for n in sorted(self.core_tables | {"processes"})]
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

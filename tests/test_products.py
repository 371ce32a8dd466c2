"""Security products on the real machine: real Debian packages (installed
by a session fixture, with no service started), the real kernel's audit and
BPF state, and tamper scenarios run with the real tools (kill, cp, nft in a
network namespace the test makes, auditctl, service), each checked for the
new state and the process that did it."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BPF_OK, BPF_WHY
from harness import Daemon
from vajrad.collectors.products import catalogue, dpkg, health
from vajrad.collectors.products.catalogue import Health, Signatures
from vajrad.errors import ConfigError

# Real products from Debian the tests check rows against (package -> catalogue name).
DEBIAN_PRODUCTS = {"auditd": "auditd", "apparmor": "apparmor", "clamav-daemon": "clamd",
                   "clamav-freshclam": "freshclam", "fail2ban": "fail2ban", "aide": "aide",
                   "rkhunter": "rkhunter", "nftables": "nftables"}
APT_PACKAGES = ("auditd", "apparmor", "clamav", "clamav-daemon", "clamav-freshclam", "fail2ban", "aide",
                "rkhunter", "nftables")
REQUIRED = {"auditd", "apparmor", "selinux", "clamd", "freshclam", "osquery", "falco", "tetragon", "wazuh-agent",
            "crowdstrike-falcon", "sentinelone", "mdatp", "sophos", "trend-micro-deep-security", "fail2ban",
            "ufw", "nftables", "iptables", "aide", "rkhunter", "chkrootkit", "vajra"}
BASH = os.path.realpath(shutil.which("bash"))
SYSTEMD_PID1 = os.path.isdir("/run/systemd/system")


def dpkg_version(package: str) -> str | None:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package], capture_output=True, text=True)
    if out.returncode or not out.stdout.startswith("install ok installed"):
        return None
    return out.stdout.split("\t")[1]


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sh(script: str) -> int:
    """Runs a bash script that ends in `exec TOOL`; returns the pid the tool ran as."""
    out = subprocess.run([BASH, "-c", "echo $$; " + script], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


# --- the catalogue, health commands, signatures, dpkg: no daemon -----------------------
def test_catalogue_ships_every_product_of_the_issue():
    products = {p.name: p for p in catalogue.builtin()}
    assert REQUIRED <= products.keys()
    assert products["clamd"].signatures is not None
    assert products["crowdstrike-falcon"].health.parser == "falconctl_rfm"
    assert products["mdatp"].health.command == ("/usr/bin/mdatp", "health")


def test_catalogue_bad_entry_names_file_and_field(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps({"name": "x", "vendor": "v", "type": "av",
                               "health": {"command": ["true"], "timeout": -1, "parser": "exit_status"}}))
    with pytest.raises(ConfigError) as e:
        catalogue.load_file(str(bad))
    assert e.value.source == "broken.json" and e.value.key == "health.timeout"
    bad.write_text(json.dumps({"name": "x", "vendor": "v", "type": "antivirus"}))
    with pytest.raises(ConfigError, match="type: must be one of") as e:
        catalogue.load_file(str(bad))
    bad.write_text('{"name": ')
    with pytest.raises(ConfigError, match="broken.json: .*not valid JSON"):
        catalogue.load_file(str(bad))
    with pytest.raises(ConfigError) as e:
        catalogue.parse_section({"security_products": [{"name": "ok", "vendor": "v", "type": "av"},
                                                       {"name": "y", "vendor": "v", "type": "av",
                                                        "executables": ["relative/bin"]}]}, "/etc/vajra.conf")
    assert e.value.key == "security_products[1].executables[0]" and e.value.source == "/etc/vajra.conf"
    with pytest.raises(ConfigError, match=r"security_products\[0\].colour: unknown field"):
        catalogue.parse_section({"security_products": [{"name": "z", "vendor": "v", "type": "av", "colour": 1}]}, "c")


def test_config_entry_replaces_a_shipped_one():
    extra = catalogue.parse_section({"security_products": [
        {"name": "clamd", "vendor": "me", "type": "av", "executables": ["/opt/clamd"]}]}, "c")
    merged = {p.name: p for p in catalogue.merged(extra)}
    assert merged["clamd"].vendor == "me" and merged["clamd"].executables == ("/opt/clamd",)
    assert "auditd" in merged


def test_dpkg_reader_agrees_with_dpkg_query(debian_products):
    db = dpkg.DpkgDatabase()
    found = db.packages(set(DEBIAN_PRODUCTS) | {"surely-not-a-package"})
    for package in DEBIAN_PRODUCTS:
        assert found[package].installed and found[package].version == dpkg_version(package)
    assert "surely-not-a-package" not in found
    half = dpkg.parse("Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
                      "Package: a\nStatus: install ok installed\nDescription: x\n continued: y\nVersion: 2\n")
    assert not half["gone"].installed and half["a"].installed and half["a"].version == "2"


def test_health_command_that_hangs_fails_or_prints_garbage_is_unknown(tmp_path):
    t0 = time.monotonic()
    hung = asyncio.run(health.run(Health(("sleep", "60"), 0.5, "nft_ruleset")))
    assert hung.state == "unknown" and "timed out after 0.5 s" in hung.reason
    assert time.monotonic() - t0 < 10
    failed = asyncio.run(health.run(Health(("false",), 5, "nft_ruleset")))
    assert failed.state == "unknown" and "exited with 1" in failed.reason
    garbage = asyncio.run(health.run(Health(("echo", "hello"), 5, "nft_ruleset")))
    assert garbage.state == "unknown" and "unexpected output" in garbage.reason
    missing = asyncio.run(health.run(Health((str(tmp_path / "nope"),), 5, "exit_status")))
    assert missing.state == "unknown" and "cannot run" in missing.reason
    # a hung command's children die with it (its own session is killed)
    marker = f"vajra-health-{os.getpid()}"
    asyncio.run(health.run(Health(("sh", "-c", f"sleep 60 {marker} & wait"), 0.5, "exit_status")))
    time.sleep(0.2)
    assert marker not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_health_parsers_on_real_outputs():
    assert health.parse_output("mdatp", 0, 'healthy : true\nreal_time_protection_enabled : false\n').state \
        == "degraded"
    assert health.parse_output("falconctl_rfm", 0, "rfm-state=true.\n").state == "degraded"
    assert health.parse_output("falconctl_rfm", 0, "rfm-state=false.\n").state == "ok"
    real = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True)
    if real.returncode == 0:
        v = health.parse_output("nft_ruleset", 0, real.stdout)
        assert v.facts["rules"] == real.stdout.count('{"rule"')


def clamav_header_file(path: Path, built: int, version: int = 27000) -> None:
    stamp = time.strftime("%d %b %Y %H-%M +0000", time.gmtime(built))
    head = f"ClamAV-VDB:{stamp}:{version}:2070000:90:X:X:builder:{built}".encode()
    path.write_bytes(head.ljust(512, b" ") + b"body")


def test_clamav_signature_age_from_the_database_header(tmp_path):
    fresh, old = tmp_path / "daily.cld", tmp_path / "main.cvd"
    clamav_header_file(fresh, int(time.time()) - 3600, 27001)
    clamav_header_file(old, int(time.time()) - 10 * 86400, 62)
    info, problem = health.signatures(Signatures((str(fresh), str(old)), "clamav", 72))
    assert info["version"] == 27001 and info["up_to_date"] and problem == ""
    info, problem = health.signatures(Signatures((str(old),), "clamav", 72))
    assert not info["up_to_date"] and "240 h old" in problem
    (tmp_path / "junk.cvd").write_bytes(b"not a database")
    info, problem = health.signatures(Signatures((str(tmp_path / "junk.cvd"),), "clamav", 72))
    assert info is None and "no ClamAV-VDB header" in problem


# --- the daemon, with real products -----------------------------------------------------
class Products:
    """A daemon with the shipped catalogue plus test entries for a process,
    a binary and a firewall the test owns."""

    def __init__(self, root: str, extra_flags=()):
        self.root = root
        self.bin = os.path.join(root, "bin")
        os.makedirs(self.bin)
        self.sleeper = os.path.join(self.bin, "vajra-testd")
        shutil.copy("/bin/sleep", self.sleeper)
        self.tool = os.path.join(self.bin, "vajra-testtool")
        shutil.copy("/bin/true", self.tool)
        self.tool_conf = os.path.join(self.bin, "vajra-testtool.conf")
        Path(self.tool_conf).write_text("enabled = yes\n")
        self.netns = f"vajra-products-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.nft("add table inet vajra_test")
        self.nft("add chain inet vajra_test input { type filter hook input priority 0; }")
        self.nft("add rule inet vajra_test input tcp dport 22 accept")
        self.sigdir = os.path.join(root, "clamav")
        os.makedirs(self.sigdir)
        clamav_header_file(Path(self.sigdir, "daily.cld"), int(time.time()) - 3600)
        cfg = {"options": {}, "file_paths": {"products": [self.bin + "/%%"]}, "security_products": [
            {"name": "test-daemon", "vendor": "tests", "type": "edr", "executables": [self.sleeper],
             "needs_process": True},
            {"name": "test-binary", "vendor": "tests", "type": "hids", "binaries": [self.tool],
             "configs": [self.tool_conf]},
            {"name": "test-firewall", "vendor": "tests", "type": "firewall", "binaries": ["/usr/sbin/nft"],
             "health": {"command": ["ip", "netns", "exec", self.netns, "nft", "-j", "list", "ruleset"],
                        "timeout": 10, "parser": "nft_ruleset"}},
            {"name": "test-hang", "vendor": "tests", "type": "av", "binaries": ["/bin/sleep"],
             "health": {"command": ["sleep", "60"], "timeout": 1, "parser": "exit_status"}},
            {"name": "test-signatures", "vendor": "tests", "type": "av", "binaries": ["/bin/true"],
             "signatures": {"paths": [self.sigdir + "/daily.cld"], "format": "clamav", "max_age_hours": 24}},
        ]}
        Path(root, "vajra.conf").write_text(json.dumps(cfg))
        self.daemon = Daemon(root, f"--config_path={root}/vajra.conf", *extra_flags).start()

    def nft(self, command: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.netns, "nft", command], check=True)

    def rows(self) -> dict[str, dict]:
        return {r["name"]: r for r in self.daemon.call("table/read", {"table": "security_products"})["rows"]}

    def row_when(self, name: str, predicate, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            row = self.rows().get(name)
            if row is not None and predicate(row):
                return row
            time.sleep(0.1)
        raise AssertionError(f"{name}: condition not met, last row {row}")

    def events(self, predicate, want: int = 1, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        found: list[dict] = []
        while time.monotonic() < deadline:
            with self.daemon.client() as c:
                found = [e for e in c.iter_events({"start_time": 0}, "security_product_events") if predicate(e)]
            if len(found) >= want:
                return found
            time.sleep(0.1)
        raise AssertionError(f"wanted {want} events, found {found}")

    def close(self) -> None:
        self.daemon.stop()
        subprocess.run(["ip", "netns", "delete", self.netns], check=False)


@pytest.fixture(scope="session")
def debian_products():
    """The Debian products the tests check, installed when missing. Nothing
    may start: a policy-rc.d that refuses every start is put in place for
    the install (and systemd is not PID 1 here, so no unit starts either)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to install packages")
    missing = [p for p in APT_PACKAGES if dpkg_version(p) is None]
    if missing:
        policy = Path("/usr/sbin/policy-rc.d")
        own_policy = not policy.exists()
        if own_policy:
            policy.write_text("#!/bin/sh\n# vajra tests: start no service while installing\nexit 101\n")
            policy.chmod(0o755)
        try:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                "-o", "DPkg::Lock::Timeout=600", *missing], env=env, capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"apt-get could not install {' '.join(missing)}: {r.stderr[-300:]}")
        finally:
            if own_policy:
                policy.unlink()
    yield


@pytest.fixture(scope="module")
def products(debian_products):
    if not BPF_OK:
        pytest.skip(BPF_WHY)
    root = tempfile.mkdtemp(prefix="vajra-products-")
    os.chmod(root, 0o755)
    p = Products(root)
    yield p
    p.close()
    shutil.rmtree(root, ignore_errors=True)


def test_rows_of_real_debian_products(products):
    rows = products.rows()
    for package, name in DEBIAN_PRODUCTS.items():
        row = rows[name]
        assert row["installed"] == 1 and row["package"] == package, row
        assert row["version"] == dpkg_version(package)
        if row["install_path"]:
            assert row["binary_sha256"] == sha256(row["install_path"])
    for name in ("auditd", "clamd", "freshclam", "fail2ban"):
        running = subprocess.run(["pgrep", "-x", {"clamd": "clamd", "freshclam": "freshclam", "auditd": "auditd",
                                                  "fail2ban": "fail2ban-server"}[name]],
                                 capture_output=True).returncode == 0
        assert rows[name]["running"] == int(running)
        if not running:
            assert rows[name]["state"] == "stopped" and rows[name]["state_reason"] == "no process of it runs"
    assert rows["auditd"]["install_path"] == "/usr/sbin/auditd"
    assert rows["auditd"]["unit"] == "auditd.service"
    enabled = os.path.exists("/etc/systemd/system/multi-user.target.wants/auditd.service")
    assert rows["auditd"]["unit_file_state"] == ("enabled" if enabled else "disabled")
    aide_db = os.path.exists("/var/lib/aide/aide.db")
    assert rows["aide"]["state"] == ("protecting" if aide_db else "degraded")
    # clamd's signatures: Debian ships none and freshclam cannot reach the network here
    if not any(os.path.exists(f"/var/lib/clamav/daily.{x}") for x in ("cvd", "cld")):
        assert rows["clamd"]["signatures_version"] == "" and rows["clamd"]["signatures_up_to_date"] == 0
    for name in ("osquery", "falco", "mdatp", "crowdstrike-falcon"):
        assert rows[name]["installed"] == 0 and rows[name]["state"] == "not_installed"
    assert rows["vajra"]["running"] == 1 and rows["vajra"]["pid"] == products.daemon.proc.pid
    assert rows["vajra"]["state"] == "protecting", rows["vajra"]


def test_kernel_fact_rows(products):
    rows = products.rows()
    audit = json.loads(rows["kernel-audit"]["details"])
    status = subprocess.run(["auditctl", "-s"], capture_output=True, text=True, check=True).stdout
    told = dict(line.split(" ", 1) for line in status.splitlines() if " " in line)
    assert audit["enabled"] == int(told["enabled"]) and audit["backlog_limit"] == int(told["backlog_limit"])
    assert audit["failure"] == {"0": "silent", "1": "printk", "2": "panic"}[told["failure"]]
    rules = subprocess.run(["auditctl", "-l"], capture_output=True, text=True).stdout
    assert audit["rules"] == (0 if "No rules" in rules else len(rules.splitlines()))
    bpf = json.loads(rows["kernel-bpf"]["details"])
    perf = json.loads(subprocess.run(["bpftool", "-j", "perf", "show"], capture_output=True, check=True).stdout)
    ours = [p for p in perf if p.get("pid") == products.daemon.proc.pid]
    assert bpf["vajra_attached"] == len(ours) > 0
    assert bpf["vajra_expected"] == len(ours)
    lsm = rows["kernel-lsm"]
    if os.path.exists("/sys/kernel/security/lsm"):
        assert json.loads(lsm["details"])["lsms"] == Path("/sys/kernel/security/lsm").read_text().strip().split(",")
    else:
        assert lsm["state"] == "unknown" and "securityfs is not mounted" in lsm["state_reason"]
    apparmor = os.path.exists("/sys/module/apparmor/parameters/enabled")
    assert rows["kernel-apparmor"]["installed"] == int(apparmor)
    if not apparmor:
        assert rows["apparmor"]["state"] == "degraded" and "not active" in rows["apparmor"]["state_reason"]


def test_health_command_rows(products):
    hang = products.row_when("test-hang", lambda r: r["state"] == "unknown")
    assert "timed out after 1 s" in hang["state_reason"]
    sig = products.rows()["test-signatures"]
    assert sig["state"] == "protecting" and sig["signatures_up_to_date"] == 1
    fw = products.rows()["test-firewall"]
    assert fw["state"] == "protecting" and json.loads(fw["details"])["rules"] == 1


def test_kill_9_of_a_product_process_names_the_killer(products):
    proc = subprocess.Popen([products.sleeper, "1000"])
    try:
        products.row_when("test-daemon", lambda r: r["running"] == 1 and r["pid"] == proc.pid)
        killer = sh(f"exec /usr/bin/kill -9 {proc.pid}")
        proc.wait()
        ev = products.events(lambda e: e["name"] == "test-daemon" and e["change"] == "stopped"
                             and e["target_pid"] == proc.pid)[0]
        assert ev["old_state"] == "protecting" and ev["new_state"] == "stopped" and ev["severity"] == "high"
        assert ev["signal"] == 9 and "killed by signal 9" in ev["reason"]
        # the kernel's signal record names the sender; its exec row gives path and cmdline
        assert ev["actor_found"] == 1 and ev["actor_source"] == "signal"
        assert ev["pid"] == killer and ev["path"] == "/usr/bin/kill"
        assert ev["cmdline"] == f"/usr/bin/kill -9 {proc.pid}"
        assert any(a["pid"] == os.getpid() for a in json.loads(ev["ancestry"]))
    finally:
        proc.kill()
        proc.wait()


def test_kill_9_of_real_clamd_names_the_killer(products, tmp_path):
    """The real clamd from Debian, started by the test on a one-signature
    database of its own (Debian ships none and freshclam cannot reach the
    network here), killed with kill -9."""
    if subprocess.run(["pgrep", "-x", "clamd"], capture_output=True).returncode == 0:
        pytest.skip("a clamd already runs: the test does not kill one it did not start")
    os.chmod(tmp_path, 0o755)
    (tmp_path / "vajra.hdb").write_text("44d88612fea8a8f36de82e1278abb02f:68:Vajra.Test.EICAR\n")
    conf = tmp_path / "clamd.conf"
    conf.write_text(f"DatabaseDirectory {tmp_path}\nLocalSocket {tmp_path}/clamd.sock\nForeground yes\n"
                    f"LogFile {tmp_path}/clamd.log\nUser root\n")
    clamd = subprocess.Popen(["/usr/sbin/clamd", "-c", str(conf)])
    try:
        row = products.row_when("clamd", lambda r: r["running"] == 1 and r["pid"] == clamd.pid, timeout=60)
        signatures = any(os.path.exists(f"/var/lib/clamav/daily.{x}") for x in ("cvd", "cld"))
        if not signatures:       # running, but its signature databases are not where the catalogue says
            assert row["state"] == "degraded" and "no signature database" in row["state_reason"]
        killer = sh(f"exec /usr/bin/kill -9 {clamd.pid}")
        clamd.wait()
        ev = products.events(lambda e: e["name"] == "clamd" and e["change"] == "stopped"
                             and e["target_pid"] == clamd.pid)[0]
        assert ev["new_state"] == "stopped" and ev["signal"] == 9
        assert ev["actor_source"] == "signal" and ev["pid"] == killer and ev["path"] == "/usr/bin/kill"
    finally:
        if clamd.poll() is None:
            clamd.kill()
            clamd.wait()


def test_flapping_product_gives_both_events_in_order(products):
    first = subprocess.Popen([products.sleeper, "1000"])
    products.row_when("test-daemon", lambda r: r["pid"] == first.pid)
    products.events(lambda e: e["change"] == "started" and e["target_pid"] == first.pid)
    t0 = time.monotonic()
    first.terminate()
    first.wait()
    second = subprocess.Popen([products.sleeper, "1000"])
    assert time.monotonic() - t0 < 1
    try:
        events = products.events(lambda e: e["name"] == "test-daemon" and (
            (e["change"], e["target_pid"]) in (("stopped", first.pid), ("started", second.pid))), want=2)
        assert [(e["change"], e["target_pid"]) for e in events] == [("stopped", first.pid), ("started", second.pid)]
        assert events[0]["signal"] == 15 and events[0]["eid"] < events[1]["eid"]
        # no command ran: the kernel's signal record names this test as the sender
        assert events[0]["actor_source"] == "signal" and events[0]["pid"] == os.getpid()
        assert events[0]["path"] == os.path.realpath(sys.executable)
    finally:
        second.kill()
        second.wait()


def test_signals_to_a_product_are_recorded_with_the_sender(products):
    """A signal that ends nothing (SIGSTOP/SIGCONT freeze and thaw an agent)
    is a row too, from the kernel, with the sender."""
    import signal as signals
    proc = subprocess.Popen([products.sleeper, "1000"])
    try:
        products.row_when("test-daemon", lambda r: r["pid"] == proc.pid)
        time.sleep(0.3)          # the round that fills the kernel's watched map
        os.kill(proc.pid, signals.SIGSTOP)
        os.kill(proc.pid, signals.SIGCONT)
        rows = products.events(lambda e: e["change"] == "signal" and e["target_pid"] == proc.pid, want=2)
        assert [e["signal"] for e in rows] == [signals.SIGSTOP, signals.SIGCONT]
        assert all(e["actor_source"] == "signal" and e["pid"] == os.getpid() for e in rows)
        # a product's own signals, and SIGCHLD, never leave the kernel
        status = products.daemon.call("status")["collectors"]["products"]
        assert status["signals"].startswith("running")
    finally:
        proc.kill()
        proc.wait()


def test_overwrite_of_a_watched_binary_names_the_writer(products):
    before = products.row_when("test-binary", lambda r: r["binary_sha256"] == sha256(products.tool))
    writer = sh(f"exec /usr/bin/cp /bin/false {products.tool}")
    ev = products.events(lambda e: e["name"] == "test-binary" and e["change"] == "binary_replaced")[0]
    assert sha256(products.tool) == sha256("/bin/false") != before["binary_sha256"]
    assert ev["actor_source"] == "file" and ev["pid"] == writer and ev["path"] == "/usr/bin/cp"
    assert products.rows()["test-binary"]["binary_sha256"] == sha256("/bin/false")


def test_config_change_names_the_writer(products):
    products.row_when("test-binary", lambda r: products.tool_conf in r["details"])
    writer = sh(f"exec /usr/bin/cp /etc/hostname {products.tool_conf}")
    ev = products.events(lambda e: e["name"] == "test-binary" and e["change"] == "config_changed")[0]
    assert products.tool_conf in ev["reason"] and ev["severity"] == "medium"
    assert ev["actor_source"] == "file" and ev["pid"] == writer and ev["path"] == "/usr/bin/cp"


def test_signatures_going_out_of_date(products):
    products.row_when("test-signatures", lambda r: r["signatures_up_to_date"] == 1)
    old = int(time.time()) - 3 * 86400
    clamav_header_file(Path(products.sigdir, "daily.cld"), old, 26999)
    ev = products.events(lambda e: e["name"] == "test-signatures" and e["change"] == "signatures_out_of_date")[0]
    assert ev["old_state"] == "protecting" and ev["new_state"] == "degraded" and "h old" in ev["reason"]
    row = products.rows()["test-signatures"]
    assert (row["signatures_version"], row["signatures_time"], row["signatures_up_to_date"]) == ("26999", old, 0)


def test_nft_flush_ruleset_in_a_namespace_names_nft(products):
    products.row_when("test-firewall", lambda r: r["state"] == "protecting")
    flusher = sh(f"exec ip netns exec {products.netns} nft flush ruleset")
    ev = products.events(lambda e: e["name"] == "test-firewall" and e["change"] == "firewall_flushed")[0]
    assert ev["old_state"] == "protecting" and ev["new_state"] == "degraded"
    assert ev["pid"] == flusher and ev["path"] == "/usr/sbin/nft" and "flush ruleset" in ev["cmdline"]
    products.nft("add table inet vajra_test")      # put a rule back for the next run of this module
    products.nft("add chain inet vajra_test input { type filter hook input priority 0; }")
    products.nft("add rule inet vajra_test input tcp dport 22 accept")


@pytest.fixture
def auditd_running(products):
    """auditd started for the test, stopped after it, and the audit state as
    the brief demands: rules deleted, then `-a never,task`."""
    if subprocess.run(["pgrep", "-x", "auditd"], capture_output=True).returncode == 0:
        pytest.skip("an auditd already runs: the tests do not stop one they did not start")
    enabled_before = json.loads(products.rows()["kernel-audit"]["details"])["enabled"]
    subprocess.run(["/usr/sbin/auditd"], check=True)
    yield
    subprocess.run(["/usr/sbin/service", "auditd", "stop"], capture_output=True)
    subprocess.run(["pkill", "-x", "auditd"], capture_output=True)
    subprocess.run(["auditctl", "-D"], capture_output=True)
    if not enabled_before:
        subprocess.run(["auditctl", "-e", "0"], capture_output=True)
    subprocess.run(["auditctl", "-a", "never,task"], capture_output=True)


def test_auditctl_D_and_stopping_auditd_name_who_did_it(products, auditd_running, tmp_path):
    products.row_when("auditd", lambda r: r["running"] == 1 and r["state"] == "protecting")
    subprocess.run(["auditctl", "-w", str(tmp_path), "-p", "wa", "-k", "vajra-test"], check=True,
                   capture_output=True)
    products.row_when("kernel-audit", lambda r: json.loads(r["details"])["rules"] >= 1)
    flusher = sh("exec auditctl -D")
    ev = products.events(lambda e: e["name"] == "kernel-audit" and e["change"] == "audit_rules_flushed")[-1]
    assert ev["pid"] == flusher and ev["path"] == "/usr/sbin/auditctl" and ev["cmdline"] == "auditctl -D"
    auditd_pid = products.rows()["auditd"]["pid"]
    stopper = sh("exec /usr/sbin/service auditd stop")
    ev = products.events(lambda e: e["name"] == "auditd" and e["change"] == "stopped"
                         and e["target_pid"] == auditd_pid)[0]
    assert ev["new_state"] == "stopped" and ev["actor_found"] == 1
    # the service script stops it through start-stop-daemon, a child of the `service` we ran
    assert ev["path"] == "/usr/sbin/start-stop-daemon" and "auditd" in ev["cmdline"]
    assert any(a["pid"] == stopper for a in json.loads(ev["ancestry"]))


def test_bad_catalogue_entry_in_the_config_stops_the_daemon_with_the_field(tmp_path):
    os.chmod(tmp_path, 0o755)
    cfg = tmp_path / "vajra.conf"
    cfg.write_text(json.dumps({"options": {}, "security_products": [
        {"name": "x", "vendor": "v", "type": "edr", "health": {"command": [], "timeout": 1, "parser": "mdatp"}}]}))
    d = Daemon(str(tmp_path), f"--config_path={cfg}", "--enable_bpf_events=false")
    d.start(wait_ready=False)
    assert d.proc.wait(30) == 2
    d.stop()
    assert "security_products[0].health.command: must be a non-empty list" in d.log
    assert str(cfg) in d.log


# Masked, disabled, failed, stopped by systemctl and active with MainPID 0 need
# systemd as PID 1: tests/test_products_booted.py runs them in a booted Debian 12.


def test_actor_is_neither_a_read_only_command_nor_one_from_before_the_old_state():
    """Found under a real systemd (test_products_booted.py): `systemctl show X`
    right before X failed was named as the actor, and so was the
    `systemctl start X` that had started it, and a `masked` was blamed on the
    `systemctl disable X` before it when the mask's own exec row came later.
    A cause must be able to make the change, and come after the product
    entered the state the change ends."""
    from vajrad.collectors.products.collector import Change, ProductsCollector
    c = ProductsCollector([], 60, bpf_enabled=False, systemd_bus="none")

    def run(pid: int, cmdline: str) -> None:
        c.observe("bpf_process_events", [{"syscall": "exec", "pid": pid, "parent": 1, "path": "/usr/bin/systemctl",
                                          "cmdline": cmdline, "uid": 0, "ancestry": "[]", "eid": pid}])

    def change(kind: str, since: int) -> Change:
        return Change("fakeguard", "hids", kind, "protecting", "stopped", kind, words=frozenset({"fakeguard"}),
                      detected_ns=time.monotonic_ns(), state_since_ns=since)

    run(10, "systemctl start fakeguard.service")
    protecting_since = time.monotonic_ns()
    run(11, "systemctl stop fakeguard.service")
    run(12, "systemctl status fakeguard.service")
    run(13, "systemctl --no-pager show fakeguard.service --property=MainPID")
    assert c._find_actor(change("stopped", protecting_since))[1]["pid"] == 11
    later = time.monotonic_ns()
    run(14, "systemctl is-active fakeguard")
    assert c._find_actor(change("failed", later)) is None
    # without a known start of the old state, the window alone bounds the search
    assert c._find_actor(change("failed", 0))[1]["pid"] == 11
    # a verb that does not make this change is not its cause, though it names the unit
    run(15, "systemctl disable fakeguard.service")
    assert c._find_actor(change("masked", later)) is None
    assert c._find_actor(change("disabled", later))[1]["pid"] == 15
    run(16, "systemctl mask fakeguard.service")
    assert c._find_actor(change("masked", later))[1]["pid"] == 16


def test_surfaces_socket_dbus_vajractl_and_osquery_shim(debian_products, private_bus, workdir):
    """Without eBPF: both tables still fill (inotify and reconcile), with no
    actor; every surface serves them from the table declarations."""
    from harness import OsqueryCore
    tool = os.path.join(workdir, "watched-tool")
    shutil.copy("/bin/true", tool)
    cfg = Path(workdir, "vajra.conf")
    cfg.write_text(json.dumps({"options": {}, "security_products": [
        {"name": "test-binary", "vendor": "tests", "type": "hids", "binaries": [tool]}]}))
    d = Daemon(workdir, f"--config_path={cfg}", "--enable_bpf_events=false", f"--dbus={private_bus.address}")
    d.flags.remove("--dbus=none")
    d.start()
    core = None
    try:
        deadline = time.monotonic() + 10
        while d.call("status")["dbus"] != "running":
            assert time.monotonic() < deadline, d.log
            time.sleep(0.1)
        status = d.call("status")["collectors"]["products"]
        assert status["state"] == "running" and status["products"] >= len(REQUIRED) + 1
        if not SYSTEMD_PID1:
            assert "systemd is not running" in status["systemd"]
        shutil.copy("/bin/false", tool)
        deadline = time.monotonic() + 20
        while True:
            with d.client() as c:
                events = [e for e in c.iter_events({"start_time": 0}, "security_product_events")
                          if e["name"] == "test-binary" and e["change"] == "binary_replaced"]
            if events or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert events and events[0]["actor_found"] == 0 and events[0]["actor_source"] == "none"
        # D-Bus
        out = json.loads(private_bus.busctl("--json=short", "call", "org.vajra.Vajra1", "/org/vajra/Vajra1",
                                            "org.vajra.Vajra1", "ReadTable", "s", "security_products").stdout)
        by_name = {r["name"]["data"]: r for r in out["data"][0]}
        assert by_name["auditd"]["package"]["data"] == "auditd"
        assert by_name["test-binary"]["binary_sha256"]["data"] == sha256("/bin/false")
        # vajractl products, readable and JSON
        ctl = [sys.executable, "-m", "vajrad.client.ctl", "--socket", d.socket, "products"]
        text = subprocess.run(ctl, capture_output=True, text=True, check=True).stdout
        header, *lines = text.splitlines()
        assert header.split()[:3] == ["NAME", "TYPE", "INSTALLED"]
        assert any(line.split()[:3] == ["auditd", "audit", "1"] for line in lines)
        assert not any(line.startswith("falco ") for line in lines)
        everything = subprocess.run(ctl + ["--all", "--json"], capture_output=True, text=True, check=True).stdout
        rows = {r["name"]: r for r in map(json.loads, everything.splitlines())}
        assert rows["falco"]["state"] == "not_installed" and set(rows["falco"]) == \
            set(__import__("vajrad.tables", fromlist=["TABLES"]).TABLES["security_products"].column_names)
        # vajractl query over the live table and the evented one
        q = subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "--socket", d.socket, "query", "--json",
                            "SELECT p.name, e.change FROM security_products p JOIN security_product_events e "
                            "USING (name) WHERE p.name = 'test-binary'"],
                           capture_output=True, text=True, check=True).stdout
        assert {"name": "test-binary", "change": "binary_replaced"} in map(json.loads, q.splitlines())
        # the osquery shim
        core = OsqueryCore(workdir)
        core.start_shim(d.socket)
        client = core.client()
        # osquery knows our tables under their vajra_ names (docs/osquery.md)
        live = client.call("table", "vajra_security_products", {"action": "generate", "context": "{}"})
        assert live.status.code == 0
        assert {r["name"]: r["state"] for r in live.response}["falco"] == "not_installed"
        evented = client.call("table", "vajra_security_product_events", {"action": "generate", "context": "{}"})
        assert evented.status.code == 0 and any(r["change"] == "binary_replaced" for r in evented.response)
    finally:
        if core is not None:
            core.stop()
        d.stop()


def test_package_removal_names_dpkg(products):
    """dpkg --purge of a catalogue product the test installs (chkrootkit,
    small); a host that has it already is left alone."""
    if dpkg_version("chkrootkit") is not None:
        pytest.skip("chkrootkit is installed on this host: the test does not remove what it did not install")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600",
                        "chkrootkit"], env=env, capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"apt-get could not install chkrootkit: {r.stderr[-300:]}")
    try:
        # its files can be seen (binary present) before dpkg marks it installed: wait for both
        version = dpkg_version("chkrootkit")
        row = products.row_when("chkrootkit", lambda r: r["installed"] == 1 and r["version"] == version)
        assert row["package"] == "chkrootkit" and row["state"] == "protecting"
        products.events(lambda e: e["name"] == "chkrootkit" and e["change"] == "installed")
        remover = sh("exec dpkg --purge chkrootkit >/dev/null")
        ev = products.events(lambda e: e["name"] == "chkrootkit" and e["change"] == "uninstalled")[0]
        assert ev["old_state"] == "protecting" and ev["new_state"] == "not_installed"
        assert ev["pid"] == remover and ev["path"] == "/usr/bin/dpkg" and ev["cmdline"] == "dpkg --purge chkrootkit"
    finally:
        subprocess.run(["dpkg", "--purge", "chkrootkit"], capture_output=True)


def test_lsm_and_lockdown_rows_with_securityfs(debian_products, workdir):
    """securityfs is not mounted on this host: the daemon runs in a private
    mount namespace where it is, and its rows must say what the kernel says there."""
    mount = 'mount -t securityfs securityfs /sys/kernel/security && exec "$@"'
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"]
    seen = subprocess.run(prefix + ["sh", "-c", "cat /sys/kernel/security/lsm; echo; "
                                                "cat /sys/kernel/security/lockdown 2>/dev/null || echo absent"],
                          capture_output=True, text=True)
    if seen.returncode:
        pytest.skip(f"cannot mount securityfs in a mount namespace: {seen.stderr}")
    lsms, lockdown = seen.stdout.splitlines()[:2]
    d = Daemon(workdir, "--enable_bpf_events=false", prefix=prefix).start()
    try:
        rows = {r["name"]: r for r in d.call("table/read", {"table": "security_products"})["rows"]}
        assert json.loads(rows["kernel-lsm"]["details"])["lsms"] == lsms.split(",")
        enforcing = set(lsms.split(",")) & {"apparmor", "selinux", "smack", "tomoyo"}
        assert rows["kernel-lsm"]["state"] == ("protecting" if enforcing else "degraded")
        if lockdown == "absent":
            assert rows["kernel-lockdown"]["state"] == "unknown"
        else:
            mode = next(w.strip("[]") for w in lockdown.split() if w.startswith("["))
            assert json.loads(rows["kernel-lockdown"]["details"])["mode"] == mode
        apparmor = "apparmor" in lsms.split(",")
        assert (rows["apparmor"]["state"] == "degraded") == (not apparmor)
    finally:
        d.stop()


@pytest.mark.skipif(not os.path.exists("/sys/module/apparmor/parameters/enabled"),
                    reason="this kernel has no AppArmor (no /sys/module/apparmor): a profile cannot be put "
                           "in complain mode here")
def test_apparmor_profile_put_in_complain_mode_names_the_parser(products, tmp_path):
    name = f"vajra-test-{os.getpid()}"
    profile = tmp_path / name
    profile.write_text(f"profile {name} {products.sleeper} {{\n  /** r,\n}}\n")
    subprocess.run(["apparmor_parser", "-r", str(profile)], check=True)
    try:
        products.row_when("kernel-apparmor", lambda r: name in r["details"] or json.loads(r["details"])["enforce"])
        changer = sh(f"exec apparmor_parser -C -r {profile}")
        ev = products.events(lambda e: e["name"] == "kernel-apparmor" and e["change"] == "profile_complain")[-1]
        assert name in ev["reason"] and ev["pid"] == changer
        assert ev["path"] == os.path.realpath(shutil.which("apparmor_parser"))
    finally:
        subprocess.run(["apparmor_parser", "-R", str(profile)], capture_output=True)


# --- systemd over D-Bus -----------------------------------------------------------------
class _StandInUnit:
    """One unit object as systemd exports it (org.freedesktop.systemd1.Unit and .Service)."""

    def __init__(self):
        from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property

        class Unit(ServiceInterface):
            def __init__(self):
                super().__init__("org.freedesktop.systemd1.Unit")
                self.values = {"LoadState": "loaded", "ActiveState": "active", "SubState": "running",
                               "UnitFileState": "enabled"}

            @dbus_property(access=PropertyAccess.READ)
            def LoadState(self) -> "s":
                return self.values["LoadState"]

            @dbus_property(access=PropertyAccess.READ)
            def ActiveState(self) -> "s":
                return self.values["ActiveState"]

            @dbus_property(access=PropertyAccess.READ)
            def SubState(self) -> "s":
                return self.values["SubState"]

            @dbus_property(access=PropertyAccess.READ)
            def UnitFileState(self) -> "s":
                return self.values["UnitFileState"]

        class Service(ServiceInterface):
            def __init__(self):
                super().__init__("org.freedesktop.systemd1.Service")
                self.main_pid = 0

            @dbus_property(access=PropertyAccess.READ)
            def MainPID(self) -> "u":
                return self.main_pid

        self.unit, self.service = Unit(), Service()

    def set(self, main_pid: int | None = None, **values) -> None:
        """Changes properties and signals them as systemd does (PropertiesChanged)."""
        self.unit.values.update(values)
        if values:
            self.unit.emit_properties_changed(values)
        if main_pid is not None:
            self.service.main_pid = main_pid
            self.service.emit_properties_changed({"MainPID": main_pid})


@pytest.fixture
def session_bus():
    """A private dbus-daemon with the session policy (anyone may own names):
    the bus a stand-in for systemd's D-Bus API is served on."""
    proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address"],
                            stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()
    yield address
    proc.terminate()
    proc.wait()


def test_unit_states_from_systemd_over_dbus(session_bus, tmp_path):
    """The collector's systemd client (LoadUnit, GetAll, Subscribe, PropertiesChanged)
    against a stand-in for systemd on a private bus: systemd cannot be PID 1
    here, and this is the only part of it the client sees. Failed, masked and
    MainPID 0 while active each give the right state and row, in order."""
    from dbus_next.aio import MessageBus
    from dbus_next.service import ServiceInterface, method
    from vajrad.collectors.products.collector import ProductsCollector

    sleeper = str(tmp_path / "vajra-unitd")
    shutil.copy("/bin/sleep", sleeper)
    product = catalogue.parse_entry({"name": "test-unit", "vendor": "tests", "type": "edr",
                                     "units": ["vajra-test.service"], "executables": [sleeper],
                                     "needs_process": True}, "test")
    unit = _StandInUnit()
    calls = []

    class Manager(ServiceInterface):
        def __init__(self):
            super().__init__("org.freedesktop.systemd1.Manager")

        @method()
        def LoadUnit(self, name: "s") -> "o":
            calls.append(("LoadUnit", name))
            return "/org/freedesktop/systemd1/unit/vajra_2dtest_2eservice"

        @method()
        def Subscribe(self):
            calls.append(("Subscribe",))

    async def scenario():
        bus = await MessageBus(bus_address=session_bus).connect()
        bus.export("/org/freedesktop/systemd1", Manager())
        bus.export("/org/freedesktop/systemd1/unit/vajra_2dtest_2eservice", unit.unit)
        bus.export("/org/freedesktop/systemd1/unit/vajra_2dtest_2eservice", unit.service)
        await bus.request_name("org.freedesktop.systemd1")
        proc = subprocess.Popen([sleeper, "1000"])
        unit.service.main_pid = proc.pid
        c = ProductsCollector([product], 60, bpf_enabled=False, systemd_bus=session_bus)
        rows_out = []
        try:
            await c.start()
            assert c.systemd.startswith("systemd over D-Bus: 1 units")
            assert calls[:2] == [("Subscribe",), ("LoadUnit", "vajra-test.service")]
            row = c._rows["test-unit"]
            assert (row["active_state"], row["sub_state"], row["unit_file_state"], row["pid"], row["state"]) == \
                ("active", "running", "enabled", proc.pid, "protecting")
            events = c.events().__aiter__()

            async def next_row():
                table, [r] = await asyncio.wait_for(events.__anext__(), 10)
                rows_out.append(r)
                return r

            proc.kill()
            proc.wait()
            unit.set(main_pid=0, ActiveState="failed", SubState="failed")
            r = await next_row()
            assert (r["change"], r["new_state"], r["target_pid"]) == ("failed", "stopped", proc.pid)
            assert "vajra-test.service failed (failed)" in c._rows["test-unit"]["state_reason"]
            unit.set(LoadState="masked", UnitFileState="masked", ActiveState="inactive", SubState="dead")
            r = await next_row()
            assert r["change"] == "masked" and r["new_state"] == "stopped"
            unit.set(LoadState="loaded", UnitFileState="enabled", ActiveState="active", SubState="running")
            r = await next_row()
            assert r["change"] == "enabled" and r["new_state"] == "degraded"
            assert "MainPID 0" in c._rows["test-unit"]["state_reason"]
        finally:
            await c.stop()
            bus.disconnect()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return rows_out

    rows = asyncio.run(scenario())
    assert [r["change"] for r in rows] == ["failed", "masked", "enabled"]


def test_reload_adds_a_catalogue_entry_and_watches_its_directory(workdir):
    """SIGHUP with a new security_products entry: its row appears, and a change
    of its binary (in a directory nothing watched before) is seen at once."""
    import signal as signals
    cfg = Path(workdir, "vajra.conf")
    cfg.write_text(json.dumps({"options": {"security_products_reconcile_interval": 3600}}))
    d = Daemon(workdir, f"--config_path={cfg}", "--enable_bpf_events=false").start()
    try:
        rows = {r["name"] for r in d.call("table/read", {"table": "security_products"})["rows"]}
        assert "late-product" not in rows
        folder = tempfile.mkdtemp(dir=workdir)
        tool = os.path.join(folder, "late-tool")
        shutil.copy("/bin/true", tool)
        cfg.write_text(json.dumps({"options": {"security_products_reconcile_interval": 3600}, "security_products": [
            {"name": "late-product", "vendor": "tests", "type": "hids", "binaries": [tool]}]}))
        d.proc.send_signal(signals.SIGHUP)
        deadline = time.monotonic() + 20
        while True:
            rows = {r["name"]: r for r in d.call("table/read", {"table": "security_products"})["rows"]}
            if "late-product" in rows or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert rows["late-product"]["binary_sha256"] == sha256(tool)
        shutil.copy("/bin/false", tool)
        deadline = time.monotonic() + 20
        while rows["late-product"]["binary_sha256"] != sha256("/bin/false"):
            assert time.monotonic() < deadline, "the reconcile pass is an hour away: inotify must have seen it"
            time.sleep(0.1)
            rows = {r["name"]: r for r in d.call("table/read", {"table": "security_products"})["rows"]}
    finally:
        d.stop()


def test_a_change_found_just_before_stop_is_written(workdir):
    """SIGTERM while a change waits for its actor: the row is still stored."""
    tool = os.path.join(workdir, "stop-tool")
    shutil.copy("/bin/true", tool)
    cfg = Path(workdir, "vajra.conf")
    cfg.write_text(json.dumps({"options": {}, "security_products": [
        {"name": "stop-product", "vendor": "tests", "type": "hids", "binaries": [tool]}]}))
    d = Daemon(workdir, f"--config_path={cfg}", "--enable_bpf_events=false").start()
    try:
        deadline = time.monotonic() + 20
        while not any(r["name"] == "stop-product" and r["binary_sha256"]
                      for r in d.call("table/read", {"table": "security_products"})["rows"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        shutil.copy("/bin/false", tool)
        # the round that finds it runs within ~0.1 s; its row waits 1.5 s for an actor that never comes
        deadline = time.monotonic() + 20
        while d.call("status")["collectors"]["products"]["rounds"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert d.stop() == 0
    finally:
        d.stop()
    import sqlite3
    db = sqlite3.connect(d.database)
    rows = db.execute("SELECT name, change, actor_found FROM security_product_events").fetchall()
    assert ("stop-product", "binary_replaced", 0) in rows


def test_a_burst_of_product_execs_is_evaluated_in_few_rounds(products):
    """Each exec and exit of a watched executable asks for a round; a busy
    host must not buy one per event (collector.MIN_ROUND_INTERVAL_S)."""
    def rounds():
        return products.daemon.call("status")["collectors"]["products"]["rounds"]
    # a quiet moment first: no round pending from earlier tests
    before = rounds()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(1)
        now = rounds()
        if now == before:
            break
        before = now
    t0 = time.monotonic()
    for _ in range(40):                      # 40 starts and 40 exits of the product, in about a second
        subprocess.run([products.sleeper, "0.01"], check=True)
    burst = time.monotonic() - t0
    time.sleep(1.5)                          # the rounds the burst asked for are done
    done = rounds() - before
    elapsed = time.monotonic() - t0
    # The burst's 80 events reach the unit over the burst and the pipeline's
    # delay after it: rounds start at most once per MIN_ROUND_INTERVAL_S over
    # all that time (plus one already under way, and a reconcile at most),
    # where one per event would have been 80.
    from vajrad.collectors.products.collector import MIN_ROUND_INTERVAL_S
    assert 1 <= done <= elapsed / MIN_ROUND_INTERVAL_S + 2 and done < 40, (done, burst, elapsed)


def test_a_tamper_tool_counts_only_with_arguments_that_make_the_change():
    """`auditctl -w` or `nft add rule` run just before a flush is not who flushed."""
    from vajrad.collectors.products.collector import TOOL_ARGUMENTS
    flushes_audit = TOOL_ARGUMENTS[("auditctl", "audit_rules_flushed")]
    assert flushes_audit(["-D"]) and not flushes_audit(["-w", "/tmp/x", "-p", "wa"])
    disables = TOOL_ARGUMENTS[("auditctl", "audit_disabled")]
    assert disables(["-e", "0"]) and disables(["-e0"]) and not disables(["-e", "1"])
    nft = TOOL_ARGUMENTS[("nft", "firewall_flushed")]
    assert nft(["flush", "ruleset"]) and not nft(["add", "rule", "inet", "t", "c", "accept"])
    assert TOOL_ARGUMENTS[("iptables", "firewall_flushed")](["-F"])
    assert not TOOL_ARGUMENTS[("iptables", "firewall_flushed")](["-A", "INPUT", "-j", "ACCEPT"])

"""Security products under a real systemd (tests/booted.py): the states only
systemd as PID 1 gives — stopped by systemctl, disabled, masked, failed, and
active with no main process (MainPID 0) — each seen in security_products and
recorded in security_product_events with the process that caused it.

One Debian 12 container, booted with systemd-nspawn, serves the module; the
vajra .deb is built from this tree (scripts/build-deb) and installed with apt.
A small fake product is declared in the container's /etc/vajra/vajra.conf (a
copy of sleep under /opt, run by its own unit), so that nothing depends on a
real product's packaging. The tests run in file order, each from the state
the one before left; each reads only rows newer than those it saw at its
start.

The container shares the host's kernel: vajrad inside sees the host's execs
too, with the host's pids (the eBPF records carry them), while /proc and
systemd inside give the container's pids. Rows are therefore matched on the
product's name and the actor's path and command line; actor pids are not
compared with container pids.
"""
from __future__ import annotations

import json
import shlex

import pytest

from booted import BootedSystem, can_boot
from test_packaging_booted import build_deb, wait_active

BOOT_OK, BOOT_WHY = can_boot()
pytestmark = pytest.mark.skipif(not BOOT_OK, reason=BOOT_WHY)

PRODUCT, UNIT = "fakeguard", "fakeguard.service"
BINARY = "/opt/fakeguard/fakeguard"                 # a copy of sleep, run by fakeguard.service
ONESHOT, ONESHOT_UNIT = "fakeguard-oneshot", "fakeguard-oneshot.service"
ONESHOT_BINARY = "/opt/fakeguard/fakeguard-oneshot"  # a copy of true: the unit stays active with no process
CATALOGUE = [
    {"name": PRODUCT, "vendor": "vajra tests", "type": "hids", "units": [UNIT], "executables": [BINARY],
     "binaries": [BINARY], "needs_process": True},
    {"name": ONESHOT, "vendor": "vajra tests", "type": "hids", "units": [ONESHOT_UNIT],
     "binaries": [ONESHOT_BINARY], "needs_process": True},
]
UNIT_FILES = {
    UNIT: f"[Unit]\nDescription=vajra test product\n[Service]\nExecStart={BINARY} infinity\n"
          "[Install]\nWantedBy=multi-user.target\n",
    ONESHOT_UNIT: f"[Unit]\nDescription=vajra test product, oneshot\n[Service]\nType=oneshot\n"
                  f"RemainAfterExit=yes\nExecStart={ONESHOT_BINARY}\n[Install]\nWantedBy=multi-user.target\n",
}


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    deb = build_deb(tmp_path_factory.mktemp("debs"))
    system = BootedSystem(name="vajra-products")
    try:
        system.start()
        system.install_deb(deb)
        wait_active(system)
        install_fake_product(system)
        yield system
    finally:
        system.close()


def install_fake_product(box: BootedSystem) -> None:
    box.run("mkdir", "-p", "/opt/fakeguard")
    box.run("cp", "/usr/bin/sleep", BINARY)
    box.run("cp", "/usr/bin/true", ONESHOT_BINARY)
    for unit, text in UNIT_FILES.items():
        # where a package puts its units: /etc/systemd/system is the admin's (and mask's)
        box.path(f"/usr/lib/systemd/system/{unit}").write_text(text)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "enable", "--now", UNIT)
    conf = box.path("/etc/vajra/vajra.conf")
    doc = json.loads(conf.read_text())
    # vajrad inside records every exec of the host too: keep the rows these tests follow
    doc["options"]["events_max"] = 0
    doc["security_products"] = CATALOGUE
    conf.write_text(json.dumps(doc, indent=2))
    box.run("systemctl", "reload", "vajrad")


def rows(box: BootedSystem) -> dict[str, dict]:
    out = box.run("vajractl", "products", "--json", "--all").stdout
    return {r["name"]: r for r in map(json.loads, out.splitlines())}


def row_when(box: BootedSystem, name: str, predicate, what: str) -> dict:
    last: dict = {}

    def check():
        last["row"] = rows(box).get(name)
        return last["row"] if last["row"] is not None and predicate(last["row"]) else None
    try:
        return box.wait_for(check, timeout=30, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; last row: {last.get('row')}\n{box.journal('vajrad')[-3000:]}") from None


def events(box: BootedSystem, name: str, after_eid: int = 0) -> list[dict]:
    sql = (f"SELECT eid, name, change, old_state, new_state, reason, actor_found, actor_source, pid, path, "
           f"cmdline, target_pid, signal FROM security_product_events WHERE name = '{name}' "
           f"AND eid > {after_eid} ORDER BY eid")
    return [json.loads(line) for line in box.run("vajractl", "query", "--json", sql).stdout.splitlines()]


def last_eid(box: BootedSystem) -> int:
    out = box.run("vajractl", "query", "--json", "SELECT max(eid) AS m FROM security_product_events").stdout
    return int(json.loads(out.splitlines()[0])["m"] or 0) if out.strip() else 0


def event_when(box: BootedSystem, name: str, change: str, after_eid: int) -> dict:
    seen: dict = {}

    def check():
        seen["all"] = events(box, name, after_eid)
        return next((e for e in seen["all"] if e["change"] == change), None)
    try:
        return box.wait_for(check, timeout=30, what=f"a {change} row for {name}")
    except AssertionError as e:
        raise AssertionError(f"{e}; rows since eid {after_eid}: {seen.get('all')}\n"
                             f"{box.journal('vajrad')[-3000:]}") from None


def assert_actor(ev: dict, tool: str, *words: str) -> None:
    assert ev["actor_found"] == 1 and ev["actor_source"] == "exec", ev
    assert ev["path"].endswith("/" + tool), ev
    argv = shlex.split(ev["cmdline"])
    assert all(w in argv for w in words), json.dumps(ev)


def main_pid(box: BootedSystem, unit: str) -> int:
    return int(box.show(unit, "MainPID")["MainPID"])


def start_and_wait_protecting(box: BootedSystem) -> dict:
    box.run("systemctl", "start", UNIT)
    pid = main_pid(box, UNIT)
    return row_when(box, PRODUCT, lambda r: r["state"] == "protecting" and r["pid"] == pid,
                    f"{PRODUCT} protecting with pid {pid}")


def test_a_running_unit_is_protecting_with_systemds_view(box):
    status = json.loads(box.run("vajractl", "status", "--json").stdout)["collectors"]["products"]
    assert status["systemd"].startswith("systemd over D-Bus"), status
    row = start_and_wait_protecting(box)
    assert row["installed"] == 1 and row["unit"] == UNIT and row["install_path"] == BINARY, row
    assert (row["active_state"], row["sub_state"], row["unit_file_state"]) == ("active", "running", "enabled"), row
    assert row["running"] == 1 and row["pid"] == main_pid(box, UNIT), row


def test_systemctl_stop_is_stopped_by_systemctl(box):
    start_and_wait_protecting(box)
    since = last_eid(box)
    box.run("systemctl", "stop", UNIT)
    ev = event_when(box, PRODUCT, "stopped", since)
    assert (ev["old_state"], ev["new_state"]) == ("protecting", "stopped"), ev
    assert_actor(ev, "systemctl", "stop", UNIT)
    row = row_when(box, PRODUCT, lambda r: r["state"] == "stopped", f"{PRODUCT} stopped")
    assert (row["active_state"], row["sub_state"], row["pid"]) == ("inactive", "dead", 0), row


def test_systemctl_disable_is_disabled_by_systemctl(box):
    start_and_wait_protecting(box)
    since = last_eid(box)
    box.run("systemctl", "disable", UNIT)
    ev = event_when(box, PRODUCT, "disabled", since)
    # it still runs: disabled only means it will not start at the next boot
    assert ev["new_state"] == "protecting" and "is now disabled (was enabled)" in ev["reason"], ev
    assert_actor(ev, "systemctl", "disable", UNIT)
    row_when(box, PRODUCT, lambda r: r["unit_file_state"] == "disabled", f"{UNIT} disabled in the row")


def test_systemctl_mask_is_masked_by_systemctl(box):
    since = last_eid(box)
    box.run("systemctl", "mask", UNIT)
    try:
        ev = event_when(box, PRODUCT, "masked", since)
        assert ev["new_state"] == "stopped", ev
        assert_actor(ev, "systemctl", "mask", UNIT)
        row = row_when(box, PRODUCT, lambda r: r["unit_file_state"] == "masked", f"{UNIT} masked in the row")
        assert row["state"] == "stopped" and row["state_reason"] == f"{UNIT} is masked", row
    finally:
        box.run("systemctl", "unmask", UNIT)
    row_when(box, PRODUCT, lambda r: r["unit_file_state"] == "disabled" and r["state"] == "protecting",
             f"{UNIT} unmasked (disabled again, still running)")


def test_a_unit_whose_process_is_killed_is_failed(box):
    start_and_wait_protecting(box)
    pid = main_pid(box, UNIT)
    since = last_eid(box)
    box.run("kill", "-9", str(pid))
    box.wait_for(lambda: box.show(UNIT, "ActiveState")["ActiveState"] == "failed", what=f"{UNIT} failed")
    ev = event_when(box, PRODUCT, "failed", since)
    assert (ev["old_state"], ev["new_state"]) == ("protecting", "stopped"), ev
    assert ev["target_pid"] == pid, ev
    # On a host the kernel's signal record names the sender (actor_source
    # signal, test_products.py). Here the record carries the host's pids and
    # the product's pid is the container's, so the actor is the `kill` exec
    # that names the container pid: still the right process.
    assert_actor(ev, "kill", "-9", str(pid))
    row = row_when(box, PRODUCT, lambda r: r["active_state"] == "failed", f"{PRODUCT} failed in the row")
    assert row["state"] == "stopped" and row["state_reason"] == f"{UNIT} failed (failed)", row
    box.run("systemctl", "reset-failed", UNIT)


def test_active_with_no_main_process_is_degraded(box):
    before = row_when(box, ONESHOT, lambda r: r["state"] == "stopped", f"{ONESHOT} not started yet")
    assert before["installed"] == 1 and before["active_state"] == "inactive", before
    since = last_eid(box)
    box.run("systemctl", "start", ONESHOT_UNIT)
    shown = box.show(ONESHOT_UNIT, "ActiveState", "MainPID")
    assert shown == {"ActiveState": "active", "MainPID": "0"}, shown
    ev = event_when(box, ONESHOT, "degraded", since)
    assert (ev["old_state"], ev["new_state"]) == ("stopped", "degraded"), ev
    assert "active but has no main process (MainPID 0)" in ev["reason"], ev
    assert_actor(ev, "systemctl", "start", ONESHOT_UNIT)
    row = row_when(box, ONESHOT, lambda r: r["state"] == "degraded", f"{ONESHOT} degraded")
    assert (row["active_state"], row["pid"], row["running"]) == ("active", 0, 0), row


def test_enable_over_dbus_alone_is_seen_from_systemds_unit_files_changed(box):
    """No systemctl (whose exit would make vajrad look again): an enable over
    systemd's D-Bus API and a daemon-reload, with busctl. UnitFileState is
    not carried by PropertiesChanged; vajrad sees it from the manager's
    UnitFilesChanged and Reloading signals."""
    assert rows(box)[PRODUCT]["unit_file_state"] == "disabled"
    since = last_eid(box)
    manager = ("busctl", "--system", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
               "org.freedesktop.systemd1.Manager")
    box.run(*manager, "EnableUnitFiles", "asbb", "1", UNIT, "false", "false")
    box.run(*manager, "Reload")
    ev = event_when(box, PRODUCT, "enabled", since)
    assert "is now enabled (was disabled)" in ev["reason"], ev
    row_when(box, PRODUCT, lambda r: r["unit_file_state"] == "enabled", f"{UNIT} enabled in the row")

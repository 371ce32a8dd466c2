"""The alerts unit in a real vajrad: each default rule fires on a harmless
trigger and stays silent on a look-alike; triage over the socket and vajractl;
is_open on event/list; SIGHUP reloads rules; per-rule cost in status."""
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import BPF_OK, BPF_WHY
from harness import Daemon

pytestmark = pytest.mark.skipif(not BPF_OK, reason=BPF_WHY)
P, F, S = "bpf_process_events", "bpf_file_events", "bpf_socket_events"
TAG = f"vt{os.getpid()}"
UNIT_DIR = "/etc/systemd/system"


@pytest.fixture(scope="module")
def rig():
    # Not under /tmp: programs copied here must not fire vajra.exec_from_tmp
    # for every other rule's test.
    work = tempfile.mkdtemp(prefix="vajra-alerts-", dir="/var/lib")
    os.chmod(work, 0o755)
    bins = os.path.join(work, "bin")
    os.mkdir(bins)
    os.mkdir(os.path.join(work, "suid"))
    rules_d = os.path.join(work, "rules.d")
    os.mkdir(rules_d)
    conf = os.path.join(work, "vajra.conf")
    Path(conf).write_text(json.dumps({
        "options": {},
        "file_paths": {"persist": [UNIT_DIR + "/%%"], "shadow": ["/etc/shadow", "/etc/gshadow"],
                       "suid": [os.path.join(work, "suid") + "/%%"]},
        "file_accesses": ["persist", "shadow"]}))
    d = Daemon(work, f"--config_path={conf}", "--enable_alerts=true", f"--rules_path={rules_d}",
               "--alerts_interval_ms=50")
    d.start(timeout=60)
    d.bins, d.rules_d = bins, rules_d
    yield d
    d.stop()
    for name in os.listdir(UNIT_DIR):
        if name.startswith(TAG):
            os.unlink(os.path.join(UNIT_DIR, name))
    shutil.rmtree(work, ignore_errors=True)


def program(rig, name, source="/bin/true"):
    path = os.path.join(rig.bins, name)
    if not os.path.exists(path):
        shutil.copy(source, path)
        os.chmod(path, 0o755)
    return path


def find(rig, table, predicate, timeout=15, **flt):
    """Rows of table matching predicate, once there are some."""
    deadline = time.monotonic() + timeout
    with rig.client() as c:
        while True:
            rows = [e for e in c.iter_events({"start_time": 0, **flt}, table) if predicate(e)]
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


def fired_not(rig, rule_id, table, trigger, lookalike):
    """The trigger's row is counted by an open alert of rule_id (so marked
    is_open), and the look-alike's row, evaluated no later, is not."""
    hit = find(rig, table, lambda e: trigger(e) and e["is_open"])
    assert hit, f"{rule_id} did not fire; alerts: {find(rig, 'alerts', lambda a: True, timeout=0)}"
    alerts = find(rig, "alerts", lambda a: a["rule_id"] == rule_id and a["event_table"] == table)
    assert alerts and any(a["first_eid"] <= hit[0]["eid"] <= a["last_eid"] for a in alerts)
    status = rig.call("status")["collectors"]["alerts"]["rules"][rule_id]
    assert status["watermark"] >= hit[0]["eid"]
    near = find(rig, table, lookalike)
    assert near, "the look-alike left no row to judge"
    assert all(e["eid"] < hit[0]["eid"] for e in near)
    assert not any(e["is_open"] for e in near), f"{rule_id} fired on its look-alike: {near}"
    return alerts


def run(*argv, **kw):
    subprocess.run(list(argv), check=False, timeout=20, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def test_shell_spawned_by_a_network_service(rig):
    nginx = program(rig, "nginx", "/usr/bin/dash")
    run(nginx, "-c", f"/usr/bin/env true {TAG}-svc-env; true")                 # not a shell
    run(nginx, "-c", f"/bin/sh -c 'true {TAG}-svc-sh'; true")
    fired_not(rig, "vajra.shell_from_network_service", P,
              lambda e: e["syscall"] == "exec" and e["cmdline"] == f"/bin/sh -c true {TAG}-svc-sh",
              lambda e: e["syscall"] == "exec" and e["cmdline"] == f"/usr/bin/env true {TAG}-svc-env")


def test_exec_from_tmp_or_dev_shm(rig):
    run("/usr/bin/true", f"/tmp/{TAG}-tmp-look", cwd="/tmp")                    # /tmp only in its args and cwd
    shm = f"/dev/shm/{TAG}-shm"
    shutil.copy("/bin/true", shm)
    os.chmod(shm, 0o755)
    try:
        run(shm, "x")
    finally:
        os.unlink(shm)
    fired_not(rig, "vajra.exec_from_tmp", P,
              lambda e: e["syscall"] == "exec" and e["path"] == shm,
              lambda e: e["syscall"] == "exec" and e["cmdline"] == f"/usr/bin/true /tmp/{TAG}-tmp-look")


def test_setuid_bit_set(rig):
    plain, suid = (os.path.join(rig.workdir, "suid", f"{TAG}-{n}") for n in ("plain", "suid"))
    for path in (plain, suid):
        Path(path).write_text("x")
    os.chmod(plain, 0o2755)                     # setgid only: not this rule
    os.chmod(suid, 0o4755)
    fired_not(rig, "vajra.setuid_bit_set", F,
              lambda e: e["file_path"] == suid and "chmod" in e["syscall"],
              lambda e: e["file_path"] == plain and "chmod" in e["syscall"])


def test_write_to_systemd_unit_directory(rig):
    unit = os.path.join(UNIT_DIR, f"{TAG}.service")
    Path(unit).write_text("# vajra test: never loaded (removed at once)\n")
    try:
        Path(unit).read_text()          # the look-alikes: a read and the removal, after the write
    finally:
        os.unlink(unit)
    hit = find(rig, F, lambda e: e["file_path"] == unit and e["is_open"])
    assert hit and "O_WRONLY" in hit[0]["flags"]
    rows = find(rig, F, lambda e: e["file_path"] == unit and (e["flags"].startswith("O_RDONLY")
                                                               or e["syscall"].startswith("unlink")))
    assert len(rows) == 2
    deadline = time.monotonic() + 10
    while rig.call("status")["collectors"]["alerts"]["rules"]["vajra.persistence_cron_systemd"]["watermark"] \
            < max(e["eid"] for e in rows):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rows = find(rig, F, lambda e: e["eid"] in {r["eid"] for r in rows})
    assert not any(e["is_open"] for e in rows), rows


def test_read_of_etc_shadow_by_an_unusual_program(rig):
    run("/usr/bin/chage", "-l", "root")                                        # the usual tool
    cat = program(rig, f"{TAG}-cat", "/bin/cat")
    run(cat, "/etc/shadow")
    fired_not(rig, "vajra.shadow_read", F,
              lambda e: e["file_path"] == "/etc/shadow" and e["path"] == cat,
              lambda e: e["file_path"] == "/etc/shadow" and e["path"] == "/usr/bin/chage")


@pytest.mark.parametrize("name, rule, quiet, loud", [
    ("auditctl", "vajra.audit_rules_deleted", ["-l"], ["-D"]),
    ("setenforce", "vajra.selinux_permissive", ["1"], ["0"]),
    ("systemctl", "vajra.security_service_stopped", ["stop", "nginx"], ["stop", "auditd"]),
])
def test_defences_turned_off(rig, name, rule, quiet, loud):
    tool = program(rig, name)        # /bin/true under the tool's name: nothing is really turned off
    run(tool, *quiet, TAG)
    run(tool, *loud, TAG)
    fired_not(rig, rule, P,
              lambda e: e["syscall"] == "exec" and e["cmdline"] == " ".join([tool, *loud, TAG]),
              lambda e: e["syscall"] == "exec" and e["cmdline"] == " ".join([tool, *quiet, TAG]))


def test_reverse_shell_shaped_connect(rig):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port)).close()                   # python: not a shell
        run("/usr/bin/bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}; exec 3>&-")
        fired_not(rig, "vajra.reverse_shell_connect", S,
                  lambda e: e["syscall"] == "connect" and e["remote_port"] == port and e["path"] == "/usr/bin/bash",
                  lambda e: e["syscall"] == "connect" and e["remote_port"] == port and e["path"] != "/usr/bin/bash")
    finally:
        listener.close()


def shm_alert(rig, name):
    """An alert of vajra.exec_from_tmp of its own, and its event."""
    shm = f"/dev/shm/{TAG}-{name}"
    shutil.copy("/bin/true", shm)
    os.chmod(shm, 0o755)
    try:
        run(shm)
    finally:
        os.unlink(shm)
    (event,) = find(rig, P, lambda e: e["path"] == shm and e["is_open"])
    (alert,) = find(rig, "alerts", lambda a: json.loads(a["group_key"]) == [shm])
    return alert, event


def vajractl(rig, *args, user=None):
    prefix = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"] if user else []
    return subprocess.run([*prefix, sys.executable, "-m", "vajrad.client.ctl", "--socket", rig.socket, *args],
                          capture_output=True, text=True, timeout=30, cwd=str(Path(__file__).resolve().parent.parent))


def test_triage_over_the_socket_and_vajractl(rig):
    alert, event = shm_alert(rig, "triage")
    eid = alert["eid"]
    assert alert["is_open"] is True and alert["status"] == "open"
    # is_open on event/list: the alerts awaiting triage, and their events.
    with rig.client() as c:
        open_alerts = [a["eid"] for a in c.iter_events({"is_open": True}, "alerts")]
        assert eid in open_alerts
        assert all(a["status"] == "open" for a in c.iter_events({"is_open": True}, "alerts"))
        assert event["eid"] in [e["eid"] for e in c.iter_events({"is_open": True}, P)]
    out = vajractl(rig, "alerts", "--open", "--json")
    assert out.returncode == 0, out.stderr
    assert eid in [json.loads(line)["eid"] for line in out.stdout.splitlines()]
    out = vajractl(rig, "alert", "close", str(eid))
    assert out.returncode == 2 and "--reason is required" in out.stderr
    out = vajractl(rig, "alert", "ack", str(eid), "--comment", "mine")
    assert out.returncode == 0 and f"alert {eid} " in out.stdout and "acknowledged" in out.stdout, out.stderr
    out = vajractl(rig, "alert", "ack", str(eid))
    assert out.returncode == 1 and "already acknowledged" in out.stderr
    with rig.client() as c:
        assert eid not in [a["eid"] for a in c.iter_events({"is_open": True}, "alerts")]
        assert event["eid"] not in [e["eid"] for e in c.iter_events({"is_open": True}, P)]
        closed = c.call("alert/update", {"eid": eid, "status": "closed", "close_reason": "true_positive",
                                         "comment": "done"})
        assert (closed["status"], closed["close_reason"], closed["status_by"], closed["comment"]) == \
            ("closed", "true_positive", os.getuid(), "done")
        for params, field in [({"eid": eid, "status": "acknowledged"}, "status"),
                              ({"eid": eid, "status": "open", "close_reason": "other"}, "close_reason"),
                              ({"eid": eid, "status": "closed", "close_reason": "because"}, "close_reason"),
                              ({"eid": eid, "status": "finished"}, "status"),
                              ({"eid": "x", "status": "open"}, "eid"),
                              ({"eid": eid, "status": "open", "who": 0}, "who"),
                              ({"eid": 10 ** 9, "status": "open"}, "eid")]:
            with pytest.raises(Exception) as e:
                c.call("alert/update", params)
            assert getattr(e.value, "field", None) == field, (params, e.value)
        history = [(h["from_status"], h["to_status"], h["status_by"], h["comment"])
                   for h in c.iter_events({"start_time": 0}, "alert_history") if h["alert_eid"] == eid]
    assert history == [("open", "acknowledged", 0, "mine"), ("acknowledged", "closed", os.getuid(), "done")]
    out = vajractl(rig, "alert", "reopen", str(eid))
    assert out.returncode == 0 and "is open" in out.stdout


def test_new_alerts_and_triage_are_streamed_to_subscribers(rig):
    with rig.client() as c:
        stream = c.subscribe("alerts")
        c._sock.settimeout(20)          # a failure, not a hang
        alert, _ = shm_alert(rig, "stream")
        for msg in stream:
            if msg["method"] == "event" and msg["params"]["event"]["eid"] == alert["eid"]:
                assert msg["params"]["event"]["rule_id"] == "vajra.exec_from_tmp"
                break


def test_sighup_reloads_rules_and_a_bad_one_never_stops_the_others(rig):
    Path(rig.rules_d, "local.yml").write_text(
        "- id: local.bad\n  name: bad\n  table: bpf_process_events\n  where: \"1; DROP TABLE alerts\"\n"
        f"- id: local.good\n  name: good\n  table: bpf_process_events\n  where: \"cmdline = 'x {TAG}-hup'\"\n")
    try:
        rig.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "local.good" not in rig.call("status")["collectors"]["alerts"]["rules"]:
            assert time.monotonic() < deadline, rig.log[-2000:]
            time.sleep(0.1)
        status = rig.call("status")["collectors"]["alerts"]
        assert any("local.yml: rule local.bad: where:" in e for e in status["rules_refused"])
        assert "vajra.exec_from_tmp" in status["rules"]          # the defaults stay
        subprocess.run(["x", f"{TAG}-hup"], executable="/bin/true", check=True)      # argv[0] "x"
        alerts = find(rig, "alerts", lambda a: a["rule_id"] == "local.good")    # its exec and exit rows
        assert alerts and find(rig, P, lambda e: e["eid"] == alerts[0]["first_eid"] and e["is_open"])
        cost = rig.call("status")["collectors"]["alerts"]["rules"]["local.good"]
        assert cost["rows_evaluated"] > 0 and cost["evaluations"] > 0 and cost["time_ms"] > 0
    finally:
        os.unlink(os.path.join(rig.rules_d, "local.yml"))


def test_a_killed_vajrad_neither_fires_twice_nor_skips_after_restart(workdir):
    """SIGKILL after an alert is committed, then rows that arrive while the
    daemon restarts: the first alert is not made again, the new rows are
    evaluated (their watermark was stored with the first alert)."""
    rules = os.path.join(workdir, "rules.d")
    os.mkdir(rules)
    Path(rules, "t.yml").write_text(
        f"- id: test.restart\n  name: r\n  table: bpf_process_events\n"
        f"  where: \"syscall = 'exec' AND cmdline LIKE 'x {TAG}-restart-%'\"\n  group_by: [cmdline]\n")
    flags = ("--enable_alerts=true", f"--rules_path={rules}", "--alerts_interval_ms=50")
    d = Daemon(workdir, *flags).start(timeout=60)
    try:
        subprocess.run(["x", f"{TAG}-restart-1"], executable="/bin/true", check=True)
        assert find(d, "alerts", lambda a: a["rule_id"] == "test.restart")
    finally:
        d.stop(signal.SIGKILL)
    d = Daemon(workdir, *flags).start(timeout=60)
    try:
        subprocess.run(["x", f"{TAG}-restart-2"], executable="/bin/true", check=True)
        deadline = time.monotonic() + 15
        while len(alerts := find(d, "alerts", lambda a: a["rule_id"] == "test.restart", timeout=0)) < 2:
            assert time.monotonic() < deadline, alerts
            time.sleep(0.1)
        time.sleep(1.0)          # a duplicate would come with the same evaluation or the next
        keys = sorted(a["group_key"] for a in find(d, "alerts", lambda a: a["rule_id"] == "test.restart"))
        assert keys == [f'["x {TAG}-restart-1"]', f'["x {TAG}-restart-2"]']
    finally:
        d.stop()


def test_vajractl_alerts_follow_prints_new_alerts(rig):
    follow = subprocess.Popen([sys.executable, "-m", "vajrad.client.ctl", "--socket", rig.socket, "alerts",
                               "--follow", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parent.parent))
    try:
        time.sleep(1.0)                  # subscribed and listed (a slow start only shows it in the list)
        alert, _ = shm_alert(rig, "follow")
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in follow.stdout], daemon=True).start()
        deadline = time.monotonic() + 20
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))     # queue.Empty: not printed
            if json.loads(line)["eid"] == alert["eid"]:
                break
    finally:
        follow.kill()
        follow.wait()

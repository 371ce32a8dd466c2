"""vajractl rules import-sigma: Sigma rules become rules that load and match
what the Sigma rule means (no root, no daemon: a real store and the engine's SQL)."""
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from vajrad.client.sigma import SigmaError, convert, convert_file
from vajrad.collectors.alerts import rules as rule_files
from vajrad.store.event_store import EventStore
from vajrad.tables import TABLES

# After SigmaHQ's rules/linux/process_creation/proc_creation_lnx_base64_decode.yml and friends.
PROCESS = """
title: Linux Base64 Encoded Shebang In CLI
id: fe2f9663-41cb-47e2-b954-8a228f3b9dff
status: test
description: Detects the presence of a base64 version of the shebang in the commandline.
tags:
    - attack.defense-evasion
    - attack.t1140
logsource:
    product: linux
    category: process_creation
detection:
    selection:
        CommandLine|contains:
            - IyEvYmluL2Jhc2
            - IyEvYmluL2Rhc2
    selection_parent:
        ParentImage|endswith: '/nginx'
    filter_admin:
        Image: '/usr/bin/base64'
        CommandLine|contains|all:
            - '--decode'
            - 'backup_*.sh'
    condition: 1 of selection* and not filter_admin
level: high
"""

FILE = """
title: Persistence Via Cron Files
id: 6c4e2f43-d94d-4ead-b64d-97e53fa2bd05
tags: [attack.persistence, attack.t1053.003]
logsource: {product: linux, category: file_event}
detection:
    selection1:
        TargetFilename|startswith:
            - '/etc/cron.d/'
            - '/var/spool/cron/crontabs/'
    selection2:
        TargetFilename: '/etc/crontab'
    condition: selection1 or selection2
level: medium
"""

NETWORK = """
title: Communication To Ngrok Tunneling Service
id: 19bf6fdb-7721-4f3d-867f-53467f6a5db6
tags: [attack.command-and-control, attack.t1568.002, attack.t1572]
logsource: {product: linux, category: network_connection}
detection:
    selection:
        DestinationIp|cidr: '10.0.0.0/8'
        DestinationPort:
            - 4444
            - 1337
        Initiated: 'true'
    condition: selection
level: critical
"""


@pytest.fixture
def checked(tmp_path):
    store = EventStore(str(tmp_path / "e.db"), TABLES, expiry=0, max_rows=0)
    store.open()
    store.start()
    conn, guard = rule_files.connect_checked(store.path, TABLES)
    yield store, conn, guard
    store.stop()


def matches(checked, tmp_path, sigma_text, table, rows):
    """Converts, loads the result as any rule file, and returns the indexes of the rows it matches."""
    store, conn, guard = checked
    source = tmp_path / "sigma.yml"
    source.write_text(textwrap.dedent(sigma_text))
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "converted.yml").write_text(convert_file(str(source)))
    rules, errors = rule_files.load([str(rules_dir)], TABLES, conn, guard)
    assert errors == [] and len(rules) == 1
    (rule,) = rules.values()
    now = int(time.time())
    before = conn.execute(f'SELECT IFNULL(MAX(eid), 0) FROM "{table}"').fetchone()[0]
    store.submit(table, [TABLES[table].row(time=now, **r) for r in rows])
    deadline = time.monotonic() + 10
    while conn.execute(f'SELECT IFNULL(MAX(eid), 0) FROM "{table}"').fetchone()[0] < before + len(rows):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    got = [r[0] - before - 1 for r in conn.execute(rule.sql, (before, before + len(rows)))]
    return rule, got


def anc(path, cmdline=""):
    return f'[{{"exe_name": "x", "pid": 1, "ppid": 0, "path": "{path}", "cmdline": "{cmdline}"}}]'


def test_process_creation(checked, tmp_path):
    rule, got = matches(checked, tmp_path, PROCESS, "bpf_process_events", [
        dict(syscall="exec", path="/usr/bin/echo", cmdline="echo iyevyMluL2Jhc2 | base64 -d", ancestry=anc("/bin/x")),  # case-insensitive
        dict(syscall="exec", path="/usr/bin/sh", cmdline="sh -c id", ancestry=anc("/usr/sbin/nginx")),   # parent
        dict(syscall="exec", path="/usr/bin/base64", cmdline="base64 --decode backup_1.sh IyEvYmluL2Jhc2",
             ancestry=anc("/bin/x")),                                                                  # filtered out
        dict(syscall="exec", path="/usr/bin/base64", cmdline="base64 --decode IyEvYmluL2Jhc2", ancestry=anc("/bin/x")),
        dict(syscall="fork", path="/usr/bin/echo", cmdline="echo IyEvYmluL2Jhc2", ancestry=anc("/bin/x")),  # not an exec
        dict(syscall="exec", path="/usr/bin/true", cmdline="true", ancestry=anc("/usr/sbin/nginx-helper")),
    ])
    assert got == [0, 1, 3]
    assert rule.id == "sigma.fe2f9663-41cb-47e2-b954-8a228f3b9dff" and rule.severity == "high"
    assert rule.mitre == ("T1140",) and rule.table == "bpf_process_events"


def test_file_event(checked, tmp_path):
    rule, got = matches(checked, tmp_path, FILE, "bpf_file_events", [
        dict(syscall="openat", file_path="/etc/cron.d/evil", path="/usr/bin/tee"),
        dict(syscall="openat", file_path="/etc/crontab", path="/usr/bin/vi"),
        dict(syscall="openat", file_path="/etc/crontab.bak", path="/usr/bin/vi"),
        dict(syscall="openat", file_path="/etc/cron.daily/x", path="/usr/bin/vi"),
    ])
    assert got == [0, 1] and rule.mitre == ("T1053.003",)


def test_network_connection(checked, tmp_path):
    rule, got = matches(checked, tmp_path, NETWORK, "bpf_socket_events", [
        dict(syscall="connect", remote_address="10.1.2.3", remote_port=4444, path="/usr/bin/bash"),
        dict(syscall="connect", remote_address="10.1.2.3", remote_port=80, path="/usr/bin/bash"),
        dict(syscall="accept", remote_address="10.1.2.3", remote_port=4444, path="/usr/bin/bash"),
        dict(syscall="connect", remote_address="100.1.2.3", remote_port=1337, path="/usr/bin/bash"),
        dict(syscall="connect", remote_address="10.9.9.9", remote_port=1337, path="/usr/bin/nc"),
    ])
    assert got == [0, 4] and rule.severity == "critical" and rule.mitre == ("T1568.002", "T1572")


@pytest.mark.parametrize("change, where, message", [
    (lambda d: d["logsource"].update(product="windows"), "logsource.product", "only linux"),
    (lambda d: d["logsource"].update(category="dns_query"), "logsource.category", "must be one of"),
    (lambda d: d["detection"].update(selection={"Hashes": "x"}), "detection.selection.Hashes", "no counterpart"),
    (lambda d: d["detection"].update(selection={"Image|base64offset": "x"}), "detection.selection.Image|base64offset",
     "modifier 'base64offset'"),
    (lambda d: d["detection"].update(selection=["evil", "words"]), "detection.selection", "keyword"),
    (lambda d: d["detection"].update(condition="selection1 | count() > 5"), "detection.condition", "aggregations"),
    (lambda d: d["detection"].update(condition="selection1 and nothing"), "detection.condition", "not a selection"),
    (lambda d: d["detection"].update(condition="(selection1"), "detection.condition", "ends too early"),
])
def test_what_does_not_convert_is_refused_by_name(change, where, message):
    doc = yaml.safe_load(FILE)
    change(doc)
    with pytest.raises(SigmaError) as e:
        convert(doc, "x.yml")
    assert e.value.where == where and message in str(e.value)


def test_vajractl_rules_import_sigma(tmp_path):
    source = tmp_path / "s.yml"
    source.write_text(FILE)
    out = subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "rules", "import-sigma", str(source)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    (rule,) = yaml.safe_load(out.stdout)["rules"]
    assert rule["table"] == "bpf_file_events" and rule["id"].startswith("sigma.")
    source.write_text(FILE.replace("product: linux", "product: windows"))
    out = subprocess.run([sys.executable, "-m", "vajrad.client.ctl", "rules", "import-sigma", str(source)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "logsource.product" in out.stderr

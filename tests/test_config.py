"""Config file and flags: every bad key or value is named, and the daemon
exits non-zero before READY."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vajrad import config
from vajrad.collectors.registry import CATALOGUE
from vajrad.errors import ConfigError


def load(tmp_path, doc, *flags):
    p = tmp_path / "vajra.conf"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return config.load([f"--config_path={p}", *flags], CATALOGUE)


def test_defaults_and_precedence(tmp_path):
    c = load(tmp_path, {"options": {"events_max": 10, "host_identifier": "file"}}, "--events_max=20")
    assert c.events_max == 20                  # a flag beats the file
    assert c.host_identifier == "file"         # the file beats the default
    assert c.api_socket == "/run/vajra/vajra.sock" and c.database_path == "/var/lib/vajra/events.db"
    assert c.disable_events is False and c.enable_bpf_events is True
    assert c.events_expiry == 3600 and c.dbus == "system"


def test_osquery_style_flags():
    f = config.parse_flags(["--disable_events=false", "--enable_bpf_events", "--events_expiry", "60",
                            "--noverbose", "--dbus=unix:path=/tmp/x"], CATALOGUE)
    assert f == {"disable_events": False, "enable_bpf_events": True, "events_expiry": 60,
                 "verbose": False, "dbus": "unix:path=/tmp/x"}
    assert config.parse_flags(["--disable_events=t"], CATALOGUE)["disable_events"] is True


@pytest.mark.parametrize("argv,key", [
    (["--events_max=-1"], "--events_max"),
    (["--events_expiry=soon"], "--events_expiry"),
    (["--disable_events=maybe"], "--disable_events"),
    (["--dbus=bogus"], "--dbus"),
    (["--api_socket=relative.sock"], "--api_socket"),
    (["--bpf_output=pipe"], "--bpf_output"),
    (["--process_cmdline_max_bytes=100"], "--process_cmdline_max_bytes"),
    (["--process_cmdline_max_bytes=8192"], "--process_cmdline_max_bytes"),
    (["--no_such_flag=1"], "--no_such_flag"),
    (["--database_path"], "--database_path"),
    (["stray"], "stray"),
])
def test_bad_flags_name_the_flag(argv, key):
    with pytest.raises(ConfigError) as e:
        config.parse_flags(argv, CATALOGUE)
    assert e.value.key == key and key in str(e.value)


@pytest.mark.parametrize("doc,key", [
    ({"options": {"events_max": "many"}}, "options.events_max"),
    ({"options": {"disable_events": "perhaps"}}, "options.disable_events"),
    ({"options": {"unknown_thing": 1}}, "options.unknown_thing"),
    ({"options": {"config_path": "/x"}}, "options.config_path"),
    ({"schedule": {}}, "schedule"),
    ({"options": []}, "options"),
    ([1, 2], "config_path"),
    ('{"options": {', "config_path"),
])
def test_bad_file_names_the_key(tmp_path, doc, key):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, doc)
    assert e.value.key == key and key in str(e.value)


def test_missing_default_config_uses_embedded(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.conf"))
    c = config.load([], CATALOGUE)
    assert c.events_max == 50000


def test_missing_explicit_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load([f"--config_path={tmp_path}/absent.conf"], CATALOGUE)
    assert e.value.key == "config_path"


def test_host_identifier_modes():
    import socket
    assert config.resolve_host_identifier("hostname") == socket.gethostname()
    assert config.resolve_host_identifier("web-01") == "web-01"
    machine = None
    for path in ("/sys/class/dmi/id/product_uuid", "/etc/machine-id"):      # osquery's order
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw:
            machine = str(__import__("uuid").UUID(raw)).upper()
            break
    if machine is None:
        pytest.skip("this machine has neither a DMI product uuid nor a machine-id")
    assert config.resolve_host_identifier("uuid") == machine


@pytest.mark.parametrize("doc,flag,needle", [
    ({"options": {"events_max": "lots"}}, None, "options.events_max"),
    ({"options": {}}, "--events_expiry=-5", "--events_expiry"),
    ({"nonsense": True}, None, "nonsense"),
])
def test_daemon_exits_before_ready_on_config_error(daemon_factory, workdir, doc, flag, needle):
    cfg = Path(workdir, "bad.conf")
    cfg.write_text(json.dumps(doc))
    d = daemon_factory(f"--config_path={cfg}", *([flag] if flag else []), start=False)
    d.start(wait_ready=False)
    rc = d.proc.wait(20)
    assert rc == 2
    assert needle in d.log and "configuration error" in d.log
    assert "READY=1" not in d.notify.states()


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "vajrad", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in CATALOGUE.options:
        assert f"--{option.name}=" in out

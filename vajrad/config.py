"""Configuration: a JSON file in osquery's shape, overridden by osquery-style flags.

Every option is declared once: the daemon's own in CORE_OPTIONS, each
collector unit's in its declaration (vajrad/units.py). A `Catalogue` puts
them together with the units' config-file sections; the flag parser, the file
loader, `vajrad --help` and docs/flags.md all follow it.
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from vajrad import __version__

from vajrad.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/vajra/vajra.conf"

# Used when the default config file does not exist: the daemon then runs
# with these, which is what `make run` relies on.
EMBEDDED_CONFIG: dict = {"options": {}}


def _dbus_value(value: str) -> str | None:
    if value in ("system", "session", "none") or "=" in value:
        return None
    return "must be system, session, none or a D-Bus address such as unix:path=/run/bus"


def _nonempty(value: str) -> str | None:
    return None if value else "must not be empty"


def _absolute(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple = ()
    minimum: int | None = None
    maximum: int | None = None
    reloadable: bool = False
    in_file: bool = True   # may appear under "options" in the config file

    def parse(self, raw: Any, source: str, key: str | None = None) -> Any:
        """A value from a flag (str) or the file (JSON), checked; ConfigError names the key
        as the user wrote it (`--name` or `options.name`)."""
        key = key or self.name
        value = raw
        if self.type is bool:
            if isinstance(raw, str):
                low = raw.strip().lower()
                if low in ("true", "t", "1", "yes"):
                    value = True
                elif low in ("false", "f", "0", "no"):
                    value = False
                else:
                    raise ConfigError(key, f"expected true or false, got {raw!r}", source)
            elif not isinstance(raw, bool):
                raise ConfigError(key, f"expected a boolean, got {raw!r}", source)
        elif self.type is int:
            if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                raise ConfigError(key, f"expected an integer, got {raw!r}", source)
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(key, f"expected an integer, got {raw!r}", source) from None
            if self.minimum is not None and value < self.minimum:
                raise ConfigError(key, f"must be >= {self.minimum}, got {value}", source)
            if self.maximum is not None and value > self.maximum:
                raise ConfigError(key, f"must be <= {self.maximum}, got {value}", source)
        elif not isinstance(raw, str):
            raise ConfigError(key, f"expected a string, got {raw!r}", source)
        if self.choices and value not in self.choices:
            raise ConfigError(key, f"must be one of {', '.join(self.choices)}, got {value!r}",
                              source)
        if self.check and (problem := self.check(value)):
            raise ConfigError(key, f"{problem}, got {value!r}", source)
        return value


CORE_OPTIONS: tuple[Option, ...] = (
    Option("config_path", str, DEFAULT_CONFIG_PATH,
           "JSON config file. When the default path is missing, the embedded defaults apply.",
           check=_absolute, in_file=False),
    Option("api_socket", str, "/run/vajra/vajra.sock", "Path of the JSON-lines API socket.",
           check=_absolute),
    Option("database_path", str, "/var/lib/vajra/events.db", "Path of the SQLite event store.",
           check=_absolute),
    Option("dbus", str, "system", "Bus to serve org.vajra.Vajra1 on: system, session, none or an address.",
           check=_dbus_value),
    Option("host_identifier", str, "hostname",
           "Host identifier stored with each event: hostname, uuid, or any other string used as given.",
           check=_nonempty, reloadable=True),
    Option("disable_events", bool, False, "Disable event collection (the store stays readable)."),
    Option("enable_bpf_events", bool, True, "Attach the eBPF collectors."),
    Option("events_expiry", int, 3600, "Seconds to keep events; 0 keeps them regardless of age.",
           minimum=0, reloadable=True),
    Option("events_max", int, 50000, "Rows to keep per table; 0 means no limit.",
           minimum=0, reloadable=True),
    Option("store_max_pending_ms", int, 100,
           "Longest a captured event waits in the store's queue for its commit (one fsync per interval "
           "under load): with what the collectors hold, the bound on what a crash loses (docs/storage.md).",
           minimum=10, maximum=10_000),
    Option("store_max_pending_rows", int, 50_000,
           "Events the store's queue holds at most; beyond that, events are dropped and counted "
           "(status: events.lost_store) rather than queued, so a crash cannot lose more.",
           minimum=1000),
    Option("bpf_output", str, "auto",
           "Kernel-to-user channel: ringbuf (5.8+), perf (older kernels), or auto.",
           choices=("auto", "ringbuf", "perf")),
    Option("bpf_wakeup_ms", int, 100,
           "Ring buffer: a record that finds the oldest one not yet read this many ms old wakes its "
           "collector, which otherwise drains on its timer (400 ms for processes): lower is fresher "
           "events for more CPU; 0 wakes only every 128 KiB per CPU (least CPU).",
           minimum=0, maximum=10_000),
    Option("subscriber_queue_events", int, 10000,
           "Events queued per live subscriber; beyond that a slow subscriber misses events (and is told).",
           minimum=1),
    Option("verbose", bool, False, "Log debug messages.", reloadable=True),
)


class Catalogue:
    """Every option and config-file section: the daemon's own and its units'."""

    def __init__(self, units: tuple = ()):
        """units: vajrad.units.Unit declarations (their options and sections)."""
        self.options: tuple[Option, ...] = CORE_OPTIONS + tuple(o for u in units for o in u.options)
        self.by_name = {o.name: o for o in self.options}
        if len(self.by_name) != len(self.options):
            raise ValueError("an option is declared twice")
        self.sections: tuple = tuple(u.section for u in units if u.section)
        self.top_level_keys = ("options",) + tuple(k for sec in self.sections for k in sec.keys)


class Config:
    """Resolved options and sections. Attribute access by option or section name."""

    def __init__(self, values: dict[str, Any], explicit: set[str], sections: dict[str, Any] | None = None):
        self._values = values
        self.explicit = explicit     # options set by a flag, which a reload must not override
        self.sections = dict(sections or {})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            pass
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def changed(self, other: "Config") -> set[str]:
        """Options, and sections (by their first key, e.g. "file_paths"), that differ."""
        found = {k for k in self._values if self._values[k] != other._values.get(k)}
        return found | {name for name in self.sections if self.sections[name] != other.sections.get(name)}


def parse_flags(argv: list[str], catalogue: Catalogue) -> dict[str, Any]:
    """osquery/gflags style: --name=value, --name value, --name (true), --noname (false)."""
    options = catalogue.by_name
    flags: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            raise ConfigError(arg, "unexpected argument", "command line")
        body = arg.lstrip("-")
        name, has_value, value = body.partition("=")
        option = options.get(name)
        if option is None and name.startswith("no") and name[2:] in options \
                and options[name[2:]].type is bool and not has_value:
            flags[name[2:]] = False
            continue
        if option is None:
            raise ConfigError("--" + name, "unknown flag", "command line")
        if not has_value:
            if option.type is bool:
                value = "true"
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise ConfigError("--" + name, "needs a value", "command line")
        flags[name] = option.parse(value, "command line", "--" + name)
    return flags


def read_config_file(path: str, catalogue: Catalogue) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `options` and sections of a config file, validated; ConfigError names the bad key."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("config_path", f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError("config_path", f"not UTF-8 at byte {e.start}", path) from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("config_path", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                          path) from e
    return validate_document(doc, path, catalogue)


def validate_document(doc: Any, source: str, catalogue: Catalogue) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(doc, dict):
        raise ConfigError("config_path", "the config must be a JSON object", source)
    for key in doc:
        if key not in catalogue.top_level_keys:
            raise ConfigError(key, f"unknown top-level key (known: {', '.join(catalogue.top_level_keys)})",
                              source)
    options = doc.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError("options", "must be a JSON object", source)
    out = {}
    for key, raw in options.items():
        option = catalogue.by_name.get(key)
        if option is None or not option.in_file:
            raise ConfigError(f"options.{key}", "unknown option", source)
        out[key] = option.parse(raw, source, f"options.{key}")
    return out, {sec.name: sec.parse(doc, source) for sec in catalogue.sections}


def load(argv: list[str], catalogue: Catalogue, previous_flags: dict[str, Any] | None = None) -> Config:
    """Defaults, then the config file, then flags. Raises ConfigError."""
    flags = parse_flags(argv, catalogue) if previous_flags is None else previous_flags
    path = flags.get("config_path", DEFAULT_CONFIG_PATH)
    if "config_path" not in flags and not os.path.exists(path):
        file_opts, sections = validate_document(EMBEDDED_CONFIG, "embedded config", catalogue)
    else:
        file_opts, sections = read_config_file(path, catalogue)
    values = {o.name: o.default for o in catalogue.options}
    values.update(file_opts)
    values.update(flags)
    values["config_path"] = path
    return Config(values, set(flags), sections)


def resolve_host_identifier(setting: str) -> str:
    """osquery's meaning: `hostname`, `uuid`, or a literal identifier."""
    if setting == "hostname":
        return socket.gethostname()
    if setting == "uuid":
        for path in ("/sys/class/dmi/id/product_uuid", "/etc/machine-id"):
            try:
                with open(path) as f:
                    raw = f.read().strip()
                if raw:
                    return str(uuid.UUID(raw)).upper()
            except (OSError, ValueError):
                continue
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname())).upper()
    return setting


def help_text(catalogue: Catalogue) -> str:
    lines = [f"vajrad {__version__}: eBPF security telemetry for osquery", "", "Flags:"]
    for o in catalogue.options:
        default = str(o.default).lower() if o.type is bool else o.default
        lines.append(f"  --{o.name}={default}\n      {o.help}")
    return "\n".join(lines)

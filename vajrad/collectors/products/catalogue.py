"""The security-product catalogue: what each product looks like on disk and
in the process table, declared as data.

One JSON file per product ships in `catalogue/` next to this module; the
config file's `security_products` key adds or replaces entries in the same
format (a list of objects). Every field is checked when the catalogue is
loaded, and a bad one is a ConfigError naming the file and the field, e.g.
`clamd.json: health.timeout: must be a number of seconds > 0`.

    {"name": "clamd", "vendor": "Cisco Talos", "type": "av",
     "packages": ["clamav-daemon"], "units": ["clamav-daemon.service"],
     "executables": ["/usr/sbin/clamd"],          # resolved paths of its processes
     "binaries": ["/usr/sbin/clamd"],             # hashed; the first is binary_sha256
     "configs": ["/etc/clamav/clamd.conf"],
     "needs_process": true,                       # protecting only while one runs
     "requires": [{"path": "...", "reason": "..."}],
     "signatures": {"paths": ["/var/lib/clamav/daily.cld"], "format": "clamav",
                    "max_age_hours": 72},
     "health": {"command": ["clamdscan", "--ping", "1"], "timeout": 5, "parser": "exit_status"}}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources

from vajrad.errors import ConfigError

TYPES = ("av", "edr", "hids", "lsm", "firewall", "audit", "fim", "rootkit")
PARSERS = ("exit_status", "mdatp", "falconctl_rfm", "nft_ruleset", "iptables_save", "fail2ban_ping", "ufw_status")
LSMS = ("apparmor", "selinux", "smack", "tomoyo", "landlock", "yama", "bpf")
SIGNATURE_FORMATS = ("clamav",)
FIELDS = ("name", "vendor", "type", "packages", "units", "executables", "binaries", "configs",
          "needs_process", "requires", "signatures", "health", "description", "lsm")
HEALTH_TIMEOUT_MAX = 120.0


@dataclass(frozen=True)
class Health:
    command: tuple[str, ...]
    timeout: float
    parser: str


@dataclass(frozen=True)
class Signatures:
    paths: tuple[str, ...]
    format: str
    max_age_hours: float


@dataclass(frozen=True)
class Requirement:
    path: str
    reason: str


@dataclass(frozen=True)
class Product:
    name: str
    vendor: str
    type: str
    source: str                              # the file (or config) that declared it
    description: str = ""
    packages: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    executables: tuple[str, ...] = ()
    binaries: tuple[str, ...] = ()
    configs: tuple[str, ...] = ()
    needs_process: bool = False
    requires: tuple[Requirement, ...] = ()
    signatures: Signatures | None = None
    health: Health | None = None
    lsm: str = ""                            # protecting only while this LSM is active
    # Executables as the kernel reports them (symlinks resolved), filled at load.
    resolved_executables: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def watched_paths(self) -> tuple[str, ...]:
        """Files whose change is a change of the product (binaries and configs)."""
        return tuple(dict.fromkeys(self.binaries + self.configs))

    def identifiers(self) -> set[str]:
        """Words that name this product on a command line (unit, package, binary names)."""
        words = {self.name}
        words.update(u.removesuffix(".service").removesuffix(".socket") for u in self.units)
        words.update(self.packages)
        words.update(os.path.basename(p) for p in self.executables + self.binaries)
        return {w for w in words if w}


def _strings(entry: dict, key: str, where: str, source: str, absolute: bool = False) -> tuple[str, ...]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}{key}", "must be a list of non-empty strings", source)
    if absolute:
        for i, v in enumerate(value):
            if not v.startswith("/"):
                raise ConfigError(f"{where}{key}[{i}]", f"must be an absolute path, got {v!r}", source)
    return tuple(value)


def _text(entry: dict, key: str, where: str, source: str, required: bool = True) -> str:
    value = entry.get(key, "" if not required else None)
    if not isinstance(value, str) or (required and not value):
        raise ConfigError(f"{where}{key}", "must be a non-empty string" if required else "must be a string",
                          source)
    return value


def _seconds(value, key: str, source: str, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
        raise ConfigError(key, f"must be a number of seconds > 0 and <= {maximum:g}, got {value!r}", source)
    return float(value)


def parse_entry(entry, source: str, where: str = "") -> Product:
    """One catalogue entry; `where` prefixes field names (e.g. "security_products[2].")."""
    if not isinstance(entry, dict):
        raise ConfigError(where.rstrip(".") or "entry", "must be a JSON object", source)
    for key in entry:
        if key not in FIELDS:
            raise ConfigError(f"{where}{key}", f"unknown field (known: {', '.join(FIELDS)})", source)
    name = _text(entry, "name", where, source)
    kind = _text(entry, "type", where, source)
    if kind not in TYPES:
        raise ConfigError(f"{where}type", f"must be one of {', '.join(TYPES)}, got {kind!r}", source)
    needs_process = entry.get("needs_process", False)
    if not isinstance(needs_process, bool):
        raise ConfigError(f"{where}needs_process", f"must be true or false, got {needs_process!r}", source)
    requires = []
    raw_requires = entry.get("requires", [])
    if not isinstance(raw_requires, list):
        raise ConfigError(f"{where}requires", "must be a list of {\"path\", \"reason\"} objects", source)
    for i, req in enumerate(raw_requires):
        key = f"{where}requires[{i}]"
        if not isinstance(req, dict) or set(req) != {"path", "reason"}:
            raise ConfigError(key, "must be an object with exactly path and reason", source)
        path = _text(req, "path", key + ".", source)
        if not path.startswith("/"):
            raise ConfigError(f"{key}.path", f"must be an absolute path, got {path!r}", source)
        requires.append(Requirement(path, _text(req, "reason", key + ".", source)))
    signatures = None
    if "signatures" in entry:
        sig, key = entry["signatures"], f"{where}signatures"
        if not isinstance(sig, dict) or not set(sig) <= {"paths", "format", "max_age_hours"}:
            raise ConfigError(key, "must be an object with paths, format and max_age_hours", source)
        paths = _strings(sig, "paths", key + ".", source, absolute=True)
        if not paths:
            raise ConfigError(f"{key}.paths", "must name at least one file", source)
        fmt = sig.get("format")
        if fmt not in SIGNATURE_FORMATS:
            raise ConfigError(f"{key}.format", f"must be one of {', '.join(SIGNATURE_FORMATS)}, got {fmt!r}",
                              source)
        age = sig.get("max_age_hours", 72)
        if isinstance(age, bool) or not isinstance(age, (int, float)) or age <= 0:
            raise ConfigError(f"{key}.max_age_hours", f"must be a number of hours > 0, got {age!r}", source)
        signatures = Signatures(paths, fmt, float(age))
    health = None
    if "health" in entry:
        h, key = entry["health"], f"{where}health"
        if not isinstance(h, dict) or not set(h) <= {"command", "timeout", "parser"}:
            raise ConfigError(key, "must be an object with command, timeout and parser", source)
        command = _strings(h, "command", key + ".", source)
        if not command:
            raise ConfigError(f"{key}.command", "must be a non-empty list (argv, no shell)", source)
        parser = h.get("parser")
        if parser not in PARSERS:
            raise ConfigError(f"{key}.parser", f"must be one of {', '.join(PARSERS)}, got {parser!r}", source)
        health = Health(command, _seconds(h.get("timeout"), f"{key}.timeout", source, HEALTH_TIMEOUT_MAX),
                        parser)
    executables = _strings(entry, "executables", where, source, absolute=True)
    lsm = _text(entry, "lsm", where, source, required=False)
    if lsm and lsm not in LSMS:
        raise ConfigError(f"{where}lsm", f"must be one of {', '.join(LSMS)}, got {lsm!r}", source)
    return Product(
        name=name, vendor=_text(entry, "vendor", where, source), type=kind, source=source,
        description=_text(entry, "description", where, source, required=False),
        packages=_strings(entry, "packages", where, source),
        units=_strings(entry, "units", where, source),
        executables=executables,
        binaries=_strings(entry, "binaries", where, source, absolute=True),
        configs=_strings(entry, "configs", where, source, absolute=True),
        needs_process=needs_process, requires=tuple(requires), signatures=signatures, health=health, lsm=lsm,
        resolved_executables=frozenset(executables) | frozenset(os.path.realpath(p) for p in executables),
    )


def load_file(path: str) -> Product:
    """One product from a JSON file; errors name the file and the field."""
    source = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise ConfigError("security_products", f"cannot read {path}: {e.strerror}", source) from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("(file)", f"not valid JSON: {e}", source) from e
    return parse_entry(doc, source)


def builtin() -> list[Product]:
    """The catalogue shipped with the package, in name order."""
    folder = resources.files("vajrad.collectors.products") / "catalogue"
    products = []
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            with resources.as_file(item) as path:
                products.append(load_file(str(path)))
    return products


def parse_section(doc: dict, source: str) -> tuple[Product, ...]:
    """The config file's `security_products`: a list of entries in the files' format."""
    entries = doc.get("security_products", [])
    if not isinstance(entries, list):
        raise ConfigError("security_products", "must be a list of product objects", source)
    products = [parse_entry(e, source, f"security_products[{i}].") for i, e in enumerate(entries)]
    names = [p.name for p in products]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"security_products[{i}].name", f"{name!r} is declared twice", source)
    return tuple(products)


def merged(extra: tuple[Product, ...] = ()) -> list[Product]:
    """The shipped catalogue with the config's entries added; an entry with a
    shipped product's name replaces it."""
    by_name = {p.name: p for p in builtin()}
    for p in extra:
        by_name[p.name] = p
    return list(by_name.values())

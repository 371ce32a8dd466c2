"""The `log_files` and `journal` sections of the config file, checked.

A bad glob, regex or field is a ConfigError naming it as written
(`log_files.nginx.rules[0].regex`): at start vajrad exits 2 before READY, on
SIGHUP the error is logged and the running configuration stays.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from vajrad.errors import ConfigError

SEVERITIES = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
START_AT = ("end", "beginning")
# Rotated files compressed by logrotate are never read (their bytes are the
# lines already read, compressed): a glob that matches them skips them.
COMPRESSED_SUFFIXES = (".gz", ".xz", ".zst", ".bz2", ".lz4", ".z", ".Z", ".zip")
GLOB_CHARS = re.compile(r"[*?\[]")
JOURNAL_FIELD = re.compile(r"^[A-Z0-9_]+$")

FILE_KEYS = ("paths", "exclude", "start_at", "multiline", "max_line_bytes", "encoding", "rules",
             "matched_only", "partial_timeout_ms", "rotate_wait_ms")
JOURNAL_KEYS = ("units", "match", "rules", "matched_only", "start_at", "directory")


@dataclass(frozen=True)
class Rule:
    name: str
    regex: str
    severity: str
    pattern: re.Pattern


@dataclass(frozen=True)
class FileCategory:
    name: str
    paths: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    start_at: str = "end"
    multiline_start: re.Pattern | None = None
    multiline_timeout_ms: int = 1000
    max_line_bytes: int = 16384
    encoding: str = "utf-8"
    rules: tuple[Rule, ...] = ()
    matched_only: bool = False
    partial_timeout_ms: int = 1000
    rotate_wait_ms: int = 5000


@dataclass(frozen=True)
class JournalCategory:
    name: str
    units: tuple[str, ...] = ()
    match: tuple[tuple[str, str], ...] = ()
    rules: tuple[Rule, ...] = ()
    matched_only: bool = False
    start_at: str = "end"
    directory: str | None = None     # a journal directory; None: the system's journal


@dataclass(frozen=True)
class LogsConfig:
    files: tuple[FileCategory, ...] = ()
    journal: tuple[JournalCategory, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.files or self.journal)


def _object(value, key: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a JSON object, got {type(value).__name__}", source)
    return value


def _strings(value, key: str, source: str, allow_empty: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, "must be a list of non-empty strings", source)
    if not value and not allow_empty:
        raise ConfigError(key, "must not be empty", source)
    return tuple(value)


def _int(value, key: str, source: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {value!r}", source)
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value}", source)
    return value


def _bool(value, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}", source)
    return value


def _choice(value, key: str, source: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}", source)
    return value


def _regex(value, key: str, source: str) -> re.Pattern:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a non-empty regular expression", source)
    try:
        return re.compile(value)
    except re.error as e:
        raise ConfigError(key, f"invalid regular expression: {e}", source) from None


def _glob(value: str, key: str, source: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(key, f"must be an absolute path, got {value!r}", source)
    if "\0" in value:
        raise ConfigError(key, "must not contain NUL", source)
    directory, _, name = value.rpartition("/")
    if GLOB_CHARS.search(directory):
        # inotify watches the parent directory: wildcards in it would need a
        # watch per match and a rescan per new directory.
        raise ConfigError(key, f"wildcards are allowed in the file name only, got {value!r}", source)
    if not name:
        raise ConfigError(key, f"must name files, not a directory, got {value!r}", source)
    depth = 0
    for ch in name:       # fnmatch takes an unclosed [ literally: almost always a typo
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
    if depth:
        raise ConfigError(key, f"unbalanced [ in glob {value!r}", source)
    return value


def _rules(value, key: str, source: str) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, "must be a list of rules", source)
    rules, names = [], set()
    for i, raw in enumerate(value):
        at = f"{key}[{i}]"
        raw = _object(raw, at, source)
        for k in raw:
            if k not in ("name", "regex", "severity"):
                raise ConfigError(f"{at}.{k}", "unknown field (known: name, regex, severity)", source)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{at}.name", "must be a non-empty string", source)
        if name in names:
            raise ConfigError(f"{at}.name", f"rule {name!r} is defined twice", source)
        names.add(name)
        pattern = _regex(raw.get("regex"), f"{at}.regex", source)
        severity = _choice(raw.get("severity", "info"), f"{at}.severity", source, SEVERITIES)
        rules.append(Rule(name, pattern.pattern, severity, pattern))
    return tuple(rules)


def _unknown(raw: dict, known: tuple[str, ...], key: str, source: str) -> None:
    for k in raw:
        if k not in known:
            raise ConfigError(f"{key}.{k}", f"unknown field (known: {', '.join(known)})", source)


def _file_category(name: str, raw, source: str) -> FileCategory:
    key = f"log_files.{name}"
    raw = _object(raw, key, source)
    _unknown(raw, FILE_KEYS, key, source)
    if "paths" not in raw:
        raise ConfigError(f"{key}.paths", "is required", source)
    paths = _strings(raw["paths"], f"{key}.paths", source, allow_empty=False)
    paths = tuple(_glob(p, f"{key}.paths[{i}]", source) for i, p in enumerate(paths))
    exclude = _strings(raw.get("exclude", []), f"{key}.exclude", source)
    for i, p in enumerate(exclude):
        _glob(p, f"{key}.exclude[{i}]", source)
    multiline_start, multiline_timeout = None, 1000
    if "multiline" in raw:
        ml = _object(raw["multiline"], f"{key}.multiline", source)
        _unknown(ml, ("start", "timeout_ms"), f"{key}.multiline", source)
        multiline_start = _regex(ml.get("start"), f"{key}.multiline.start", source)
        multiline_timeout = _int(ml.get("timeout_ms", 1000), f"{key}.multiline.timeout_ms", source, 10, 600_000)
    encoding = raw.get("encoding", "utf-8")
    try:
        if not isinstance(encoding, str):
            raise LookupError
        encoding = codecs.lookup(encoding).name
    except LookupError:
        raise ConfigError(f"{key}.encoding", f"unknown encoding {encoding!r}", source) from None
    return FileCategory(
        name=name, paths=paths, exclude=exclude,
        start_at=_choice(raw.get("start_at", "end"), f"{key}.start_at", source, START_AT),
        multiline_start=multiline_start, multiline_timeout_ms=multiline_timeout,
        max_line_bytes=_int(raw.get("max_line_bytes", 16384), f"{key}.max_line_bytes", source, 64, 16 << 20),
        encoding=encoding,
        rules=_rules(raw.get("rules", []), f"{key}.rules", source),
        matched_only=_bool(raw.get("matched_only", False), f"{key}.matched_only", source),
        partial_timeout_ms=_int(raw.get("partial_timeout_ms", 1000), f"{key}.partial_timeout_ms", source,
                                10, 3_600_000),
        rotate_wait_ms=_int(raw.get("rotate_wait_ms", 5000), f"{key}.rotate_wait_ms", source, 0, 3_600_000),
    )


def _journal_category(name: str, raw, source: str) -> JournalCategory:
    key = f"journal.{name}"
    raw = _object(raw, key, source)
    _unknown(raw, JOURNAL_KEYS, key, source)
    match = _object(raw.get("match", {}), f"{key}.match", source)
    for field, value in match.items():
        if not JOURNAL_FIELD.match(field):
            raise ConfigError(f"{key}.match.{field}", "journal field names are A-Z, 0-9 and _", source)
        if not isinstance(value, str):
            raise ConfigError(f"{key}.match.{field}", f"must be a string, got {value!r}", source)
    return JournalCategory(
        name=name,
        units=_strings(raw.get("units", []), f"{key}.units", source),
        match=tuple(sorted(match.items())),
        rules=_rules(raw.get("rules", []), f"{key}.rules", source),
        matched_only=_bool(raw.get("matched_only", False), f"{key}.matched_only", source),
        start_at=_choice(raw.get("start_at", "end"), f"{key}.start_at", source, START_AT),
        directory=_directory(raw.get("directory"), f"{key}.directory", source),
    )


def _directory(value, key: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(key, f"must be an absolute path, got {value!r}", source)
    return value


def parse(doc: dict, source: str) -> LogsConfig:
    files, journal = [], []
    for section, build, out in (("log_files", _file_category, files), ("journal", _journal_category, journal)):
        raw = _object(doc.get(section, {}), section, source)
        for name, body in raw.items():
            if not name:
                raise ConfigError(section, "a category name must not be empty", source)
            out.append(build(name, body, source))
    return LogsConfig(tuple(files), tuple(journal))

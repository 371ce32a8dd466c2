"""Sigma rules into Vajra's rule format, offline (`vajractl rules import-sigma`).

Covers Linux `process_creation`, `file_event` and `network_connection` rules
in Sigma's common forms: selections as maps (fields ANDed, a list of values
ORed) or lists of maps (ORed); the modifiers contains, startswith, endswith,
all, re and cidr (IPv4); conditions built from selection names, `and`, `or`,
`not`, parentheses, and `1 of X*` / `all of X*` / `1 of them` / `all of them`.
Anything else (keyword lists, other modifiers, unmapped fields, aggregations)
is refused with an error naming it, rather than converted into something
that matches differently. Sigma's string matches are case-insensitive:
they become LIKE (ASCII case-insensitive in SQLite); `re` stays
case-sensitive, as in Sigma. pySigma is not needed.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import Any

from vajrad.errors import VajraError

# Sigma field -> SQL over our table, per log source category.
PARENT_PATH = "json_extract(ancestry, '$[0].path')"
PARENT_CMDLINE = "json_extract(ancestry, '$[0].cmdline')"
SOURCES = {
    "process_creation": ("bpf_process_events", "syscall = 'exec'", ["path"], {
        "Image": "path", "CommandLine": "cmdline", "ParentImage": PARENT_PATH,
        "ParentCommandLine": PARENT_CMDLINE, "CurrentDirectory": "cwd", "ProcessId": "pid",
        "ParentProcessId": "parent", "User": None, "LogonId": "auid"}),
    "file_event": ("bpf_file_events", None, ["path", "file_path"], {
        "TargetFilename": "file_path", "Image": "path", "ProcessId": "pid"}),
    "network_connection": ("bpf_socket_events", "syscall IN ('connect', 'accept', 'accept4')",
                           ["path", "remote_address"], {
        "DestinationIp": "remote_address", "DestinationPort": "remote_port", "SourceIp": "local_address",
        "SourcePort": "local_port", "Image": "path", "ProcessId": "pid", "Initiated": "syscall",
        "Protocol": "protocol"}),
}
LEVELS = {"informational": "info", "low": "low", "medium": "medium", "high": "high", "critical": "critical"}
MODIFIERS = {"contains", "startswith", "endswith", "all", "re", "cidr"}
_TECHNIQUE = re.compile(r"^attack\.(t\d{4}(\.\d{3})?)$", re.I)


class SigmaError(VajraError):
    def __init__(self, path: str, where: str, message: str):
        self.path, self.where = path, where
        super().__init__(f"{path}: {where}: {message}")


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _like(pattern: str) -> str:
    """A Sigma wildcard string (* ?, backslash escapes) as a LIKE pattern with ESCAPE '\\'."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "*?\\":
            c = pattern[i + 1]
            out.append("\\" + c if c == "\\" else c)
            i += 2
            continue
        out.append({"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\"}.get(c, c))
        i += 1
    return "".join(out)


class Converter:
    def __init__(self, path: str, doc: dict):
        self.path, self.doc = path, doc

    def fail(self, where: str, message: str):
        raise SigmaError(self.path, where, message)

    def convert(self) -> dict:
        doc = self.doc
        if not isinstance(doc, dict):
            self.fail("document", "a Sigma rule is a mapping")
        source = doc.get("logsource") or {}
        if source.get("product") != "linux":
            self.fail("logsource.product", f"only linux rules convert, got {source.get('product')!r}")
        category = source.get("category")
        if category not in SOURCES:
            self.fail("logsource.category", f"must be one of {', '.join(SOURCES)}, got {category!r}")
        if source.get("service"):
            self.fail("logsource.service", "service-specific log sources (auditd, syslog) do not convert")
        self.table, base, group_by, self.fields = SOURCES[category]
        detection = doc.get("detection")
        if not isinstance(detection, dict) or "condition" not in detection:
            self.fail("detection", "needs selections and a condition")
        condition = detection["condition"]
        if isinstance(condition, list):
            if len(condition) != 1:
                self.fail("detection.condition", "several conditions in one rule do not convert")
            condition = condition[0]
        if not isinstance(condition, str):
            self.fail("detection.condition", "must be a string")
        if "|" in condition:
            self.fail("detection.condition", "aggregations (| count() ...) do not convert")
        self.selections = {name: self.selection(name, body) for name, body in detection.items() if name != "condition"}
        where = self.condition(condition)
        if base:
            where = f"{base} AND ({where})"
        level = doc.get("level", "medium")
        title = doc.get("title")
        if not isinstance(title, str) or not title:
            self.fail("title", "is required")
        sigma_id = str(doc.get("id") or re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_"))[:120]
        tags = doc.get("tags") or []
        mitre = sorted({m.group(1).upper() for t in tags if isinstance(t, str) and (m := _TECHNIQUE.match(t))})
        description = str(doc.get("description") or "").strip()
        origin = f"Converted from Sigma rule {doc.get('id') or title} by vajractl rules import-sigma."
        return {"id": f"sigma.{sigma_id}", "version": 1, "name": title,
                "description": f"{description} {origin}".strip(), "table": self.table, "where": where,
                "severity": LEVELS.get(level, "medium"), "mitre": mitre, "group_by": group_by,
                "suppress_for": 600, "enabled": True}

    # --- selections ---------------------------------------------------------
    def selection(self, name: str, body: Any) -> str:
        where = f"detection.{name}"
        if isinstance(body, dict):
            return self.mapping(where, body)
        if isinstance(body, list) and body and all(isinstance(b, dict) for b in body):
            return "(" + " OR ".join(self.mapping(f"{where}[{i}]", b) for i, b in enumerate(body)) + ")"
        self.fail(where, "keyword selections (values without a field) do not convert")

    def mapping(self, where: str, body: dict) -> str:
        if not body:
            self.fail(where, "is empty")
        return "(" + " AND ".join(self.field(f"{where}.{key}", key, value) for key, value in body.items()) + ")"

    def field(self, where: str, key: str, value: Any) -> str:
        name, *modifiers = str(key).split("|")
        for m in modifiers:
            if m not in MODIFIERS:
                self.fail(where, f"modifier {m!r} does not convert (known: {', '.join(sorted(MODIFIERS))})")
        if name not in self.fields or self.fields[name] is None:
            known = ", ".join(k for k, v in self.fields.items() if v)
            self.fail(where, f"field {name!r} has no counterpart in {self.table} (mapped: {known})")
        column = self.fields[name]
        values = value if isinstance(value, list) else [value]
        if not values:
            self.fail(where, "has no values")
        tests = [self.test(where, name, column, v, modifiers) for v in values]
        joiner = " AND " if "all" in modifiers else " OR "
        return "(" + joiner.join(tests) + ")"

    def test(self, where: str, name: str, column: str, value: Any, modifiers: list[str]) -> str:
        if value is None:
            return f"{column} IS NULL"
        if name == "Initiated":
            initiated = str(value).lower() == "true"
            return "syscall = 'connect'" if initiated else "syscall IN ('accept', 'accept4')"
        if name == "Protocol":
            number = {"tcp": 6, "udp": 17}.get(str(value).lower())
            if number is None:
                self.fail(where, f"protocol {value!r} does not convert (tcp, udp)")
            return f"protocol = {number}"
        if isinstance(value, bool):
            self.fail(where, f"a boolean for {name} does not convert")
        if isinstance(value, int):
            if modifiers:
                self.fail(where, f"modifiers on a number do not convert")
            return f"{column} = {value}"
        if not isinstance(value, str):
            self.fail(where, f"value {value!r} does not convert")
        if "re" in modifiers:
            try:
                re.compile(value)
            except re.error as e:
                self.fail(where, f"bad regular expression: {e}")
            return f"{column} REGEXP {_sql_text(value)}"
        if "cidr" in modifiers:
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError as e:
                self.fail(where, f"bad network: {e}")
            if net.version != 4 or net.prefixlen % 8:
                self.fail(where, f"only IPv4 networks on an octet boundary convert, got {value}")
            prefix = ".".join(str(net.network_address).split(".")[:net.prefixlen // 8])
            return f"{column} LIKE {_sql_text(prefix + '.%' if prefix else '%')}"
        pattern = _like(value)
        if "contains" in modifiers:
            pattern = f"%{pattern}%"
        elif "startswith" in modifiers:
            pattern = f"{pattern}%"
        elif "endswith" in modifiers:
            pattern = f"%{pattern}"
        return f"{column} LIKE {_sql_text(pattern)} ESCAPE '\\'"

    # --- condition ------------------------------------------------------------
    def condition(self, text: str) -> str:
        self.tokens = re.findall(r"\(|\)|[^\s()]+", text)
        self.at = 0
        sql = self.parse_or()
        if self.at != len(self.tokens):
            self.fail("detection.condition", f"unexpected {self.tokens[self.at]!r}")
        return sql

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            self.fail("detection.condition", "ends too early")
        self.at += 1
        return token

    def parse_or(self) -> str:
        parts = [self.parse_and()]
        while (self.peek() or "").lower() == "or":
            self.take()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def parse_and(self) -> str:
        parts = [self.parse_not()]
        while (self.peek() or "").lower() == "and":
            self.take()
            parts.append(self.parse_not())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def parse_not(self) -> str:
        if (self.peek() or "").lower() == "not":
            self.take()
            # A selection that is NULL for a row does not hold, so NOT of it holds.
            return f"NOT IFNULL({self.parse_not()}, 0)"
        return self.parse_atom()

    def parse_atom(self) -> str:
        token = self.take()
        if token == "(":
            sql = self.parse_or()
            if self.take() != ")":
                self.fail("detection.condition", "a '(' is not closed")
            return sql
        if token.lower() in ("1", "all", "any") and (self.peek() or "").lower() == "of":
            self.take()
            target = self.take()
            names = list(self.selections) if target == "them" else \
                [n for n in self.selections if fnmatch.fnmatchcase(n, target)]
            if not names:
                self.fail("detection.condition", f"{token} of {target} names no selection")
            joiner = " AND " if token.lower() == "all" else " OR "
            return "(" + joiner.join(self.selections[n] for n in names) + ")"
        if token not in self.selections:
            self.fail("detection.condition", f"{token!r} is not a selection (have: {', '.join(self.selections)})")
        return self.selections[token]


def convert(doc: dict, path: str = "<sigma>") -> dict:
    return Converter(path, doc).convert()


def convert_file(path: str) -> str:
    """One Sigma file (one rule, or several YAML documents) as a Vajra rules file."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as e:
        raise SigmaError(path, "file", f"cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise SigmaError(path, "file", f"not valid YAML: {e}") from None
    if not docs:
        raise SigmaError(path, "file", "holds no rule")
    rules = [convert(d, path) for d in docs]
    header = f"# Converted from {path} by vajractl rules import-sigma; review before use.\n"
    return header + yaml.safe_dump({"rules": rules}, sort_keys=False, allow_unicode=True, width=100)

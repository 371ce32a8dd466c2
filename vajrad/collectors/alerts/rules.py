"""Detection rules: YAML files, parsed and validated at load.

A rule file holds a list of rules (or {"rules": [...]}, or one rule). Each
rule is checked on its own: a bad one is reported (RuleError naming the file,
the rule and the field) and left out, and the others load. The SQL of a rule
(`where`, `exceptions`) must be one read-only expression over its table's
columns: it is prepared inside `SELECT ... FROM <table>__read WHERE (...)`
under SQLite's authorizer, which refuses anything but reading event tables
(writes, ATTACH, pragmas, side-effecting functions), then evaluated once on
a row of NULLs, which catches what only running finds (a bad regexp).
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from vajrad.errors import VajraError
from vajrad.protocol import SEVERITIES
from vajrad.schema import Table
from vajrad.store.shared_columns import quote, read_view, side_table

PACKAGED_RULES = str(Path(__file__).resolve().parent / "rules")
RULE_KEYS = ("id", "version", "name", "description", "table", "where", "severity", "mitre", "group_by",
             "suppress_for", "exceptions", "enabled")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_MITRE = re.compile(r"^(T\d{4}(\.\d{3})?|TA\d{4})$")
MAX_SQL = 16_384
OWN_TABLES = ("alerts", "alert_history")      # a rule over alerts would feed on itself

# What an expression may do: read, call functions, nest selects.
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_NAMES = {getattr(sqlite3, n): n[len("SQLITE_"):] for n in dir(sqlite3)
          if n.startswith("SQLITE_") and n[len("SQLITE_"):] in (
              "INSERT", "UPDATE", "DELETE", "ATTACH", "DETACH", "PRAGMA", "TRANSACTION", "SAVEPOINT",
              "CREATE_TABLE", "CREATE_TEMP_TABLE", "CREATE_VIEW", "CREATE_TEMP_VIEW", "CREATE_TRIGGER",
              "CREATE_TEMP_TRIGGER", "CREATE_INDEX", "DROP_TABLE", "DROP_VIEW", "ALTER_TABLE", "ANALYZE",
              "REINDEX", "CREATE_VTABLE", "DROP_VTABLE")}
# Functions with effects outside the expression (files, extensions, the schema).
_SIDE_EFFECTS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "zipfile", "sqlar_compress",
                 "sqlar_uncompress", "sqlite_compileoption_get", "changes", "total_changes", "last_insert_rowid"}


class RuleError(VajraError):
    def __init__(self, path: str, rule: str | None, field_name: str | None, message: str):
        self.path, self.rule, self.field = path, rule, field_name
        where = path + (f": rule {rule}" if rule else "") + (f": {field_name}" if field_name else "")
        super().__init__(f"{where}: {message}")


@dataclass
class Rule:
    id: str
    version: int
    name: str
    description: str
    table: str
    where: str
    severity: str
    mitre: tuple[str, ...]
    group_by: tuple[str, ...]
    suppress_for: int
    exceptions: tuple[str, ...]
    enabled: bool
    path: str
    sql: str = ""                   # the evaluation query: (lo, hi] eid range as parameters
    # where and exceptions as evaluated: the same expressions, with reads of
    # one element of a shared JSON array made cheap (shared_json_shortcuts)
    where_sql: str = ""
    exceptions_sql: tuple[str, ...] = ()
    stats: dict = field(default_factory=lambda: {"rows_evaluated": 0, "time_ms": 0.0, "evaluations": 0,
                                                 "matches": 0, "alerts": 0, "errors": 0, "last_error": None})


_PATTERNS: dict[str, re.Pattern] = {}
PATTERNS_KEPT = 1024
# (pattern, value) -> result: the values rules test repeat (a host runs the
# same few hundred programs), and a lookup costs less than a search.
_RESULTS: dict[tuple, int] = {}
RESULTS_KEPT = 65_536


def regexp(pattern, value) -> int | None:
    """SQLite's `value REGEXP pattern` (Python's re, search anywhere). The
    pattern is compiled even when value is NULL, so that validation on a row
    of NULLs finds a bad one. Called once per row per REGEXP: kept lean."""
    if value is not None:
        key = (pattern, value)
        found = _RESULTS.get(key)
        if found is not None:
            return found
    if pattern is None:
        return None
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        if len(_PATTERNS) >= PATTERNS_KEPT:
            _PATTERNS.clear()
        compiled = _PATTERNS[pattern] = re.compile(str(pattern))
    if value is None:
        return None
    found = 1 if compiled.search(value if type(value) is str else str(value)) else 0
    if len(_RESULTS) >= RESULTS_KEPT:
        _RESULTS.clear()
    _RESULTS[key] = found
    return found


class Guard:
    """SQLite authorizer for rule SQL: reads of event tables (through their
    views and side tables) and functions without side effects, nothing else.
    `refused` names the first thing refused."""

    def __init__(self, tables: dict[str, Table]):
        self.readable = set()
        for name, table in tables.items():
            self.readable |= {name, read_view(name)}
            self.readable |= {side_table(name, c.name) for c in table.columns if c.shared}
        self.refused: str | None = None

    def __call__(self, action, arg1, arg2, db, source):
        refused = None
        if action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").lower() in _SIDE_EFFECTS:
                refused = f"function {arg2}()"
        elif action == sqlite3.SQLITE_READ:
            if arg1 not in self.readable:
                refused = f"reading {arg1}"
        elif action not in _ALLOWED:
            refused = _NAMES.get(action, f"action {action}")
        if refused is None:
            return sqlite3.SQLITE_OK
        self.refused = self.refused or refused
        return sqlite3.SQLITE_DENY


def connect_checked(path: str, tables: dict[str, Table]) -> tuple[sqlite3.Connection, Guard]:
    """A read-only connection to the store for validating and evaluating rules,
    with regexp and the guard installed."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.create_function("regexp", 2, regexp, deterministic=True)
    guard = Guard(tables)
    conn.set_authorizer(guard)
    return conn, guard


class _Unterminated(Exception):
    """A string, quoted name or comment that the expression never closes."""


def _code(sql: str):
    """(position, character) of the SQL outside strings, quoted names and
    comments, in order; one left open raises _Unterminated naming it."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`[":
            end = "]" if c == "[" else c
            j = i + 1
            while j < n:
                if sql[j] == end:
                    if end != "]" and j + 1 < n and sql[j + 1] == end:     # a doubled quote
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                raise _Unterminated(f"unterminated {c}")
            i = j + 1
            continue
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                raise _Unterminated("unterminated /* comment")
            i = j + 2
            continue
        yield i, c
        i += 1


def _balanced(sql: str) -> str | None:
    """What is wrong with the parentheses of an expression (outside strings,
    quoted names and comments), so that it cannot close the clause it is put in."""
    depth = 0
    try:
        for _, c in _code(sql):
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth < 0:
                    return "a ')' closes more than the expression opened"
            elif c == ";":
                return "';' ends the statement: a rule is one expression"
    except _Unterminated as e:
        return str(e)
    return None if depth == 0 else "a '(' is not closed"


def check_expression(conn: sqlite3.Connection, guard: Guard, table: Table, sql, path: str, rule: str,
                     field_name: str) -> str:
    if not isinstance(sql, str) or not sql.strip():
        raise RuleError(path, rule, field_name, "must be a non-empty SQL expression")
    if len(sql) > MAX_SQL:
        raise RuleError(path, rule, field_name, f"longer than {MAX_SQL} characters")
    problem = _balanced(sql)
    if problem:
        raise RuleError(path, rule, field_name, problem)
    view = quote(read_view(table.name))
    nulls = ", ".join(f"NULL AS {quote(c.name)}" for c in table.columns)
    for statement in (f"EXPLAIN SELECT eid FROM {view} WHERE (\n{sql}\n)",
                      # the same expression on a row of NULLs (the CTE stands in for the view)
                      f"WITH {view} AS (SELECT {nulls}) SELECT (\n{sql}\n) FROM {view}"):
        guard.refused = None
        try:
            conn.execute(statement).fetchall()
        except sqlite3.Warning as e:
            raise RuleError(path, rule, field_name, f"must be one expression ({e})") from None
        except sqlite3.Error as e:
            if guard.refused:
                raise RuleError(path, rule, field_name,
                                f"refused: rules are read-only expressions, and this needs {guard.refused}") from None
            raise RuleError(path, rule, field_name, str(e)) from None
    return sql


def parse_rule(raw, path: str, index: int, tables: dict[str, Table], conn: sqlite3.Connection,
               guard: Guard) -> Rule:
    label = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise RuleError(path, label, None, "a rule must be a mapping")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not _ID.match(rule_id):
        raise RuleError(path, label, "id", f"must be letters, digits and _.:- (at most 128), got {rule_id!r}")
    label = rule_id
    unknown = [k for k in raw if k not in RULE_KEYS]
    if unknown:
        raise RuleError(path, label, str(unknown[0]), f"unknown key (known: {', '.join(RULE_KEYS)})")

    def text(key, required=True, default=""):
        value = raw.get(key, None if required else default)
        if not isinstance(value, str) or (required and not value.strip()):
            raise RuleError(path, label, key, f"must be a{' non-empty' if required else ''} string, got {value!r}")
        return value

    def strings(key):
        value = raw.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RuleError(path, label, key, f"must be a list of strings, got {value!r}")
        return value

    version = raw.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RuleError(path, label, "version", f"must be an integer >= 1, got {version!r}")
    name = text("name")
    description = text("description", required=False)
    table_name = text("table")
    if table_name in OWN_TABLES or table_name not in tables or not tables[table_name].evented:
        known = [n for n, t in tables.items() if t.evented and n not in OWN_TABLES]
        raise RuleError(path, label, "table", f"unknown event table {table_name!r} (known: {', '.join(known)})")
    table = tables[table_name]
    severity = raw.get("severity", "medium")
    if severity not in SEVERITIES:
        raise RuleError(path, label, "severity", f"must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    mitre = strings("mitre")
    for i, technique in enumerate(mitre):
        if not _MITRE.match(technique):
            raise RuleError(path, label, f"mitre[{i}]", f"not a MITRE ATT&CK id (T1059, T1059.004, TA0002): "
                                                        f"{technique!r}")
    group_by = strings("group_by")
    for i, column in enumerate(group_by):
        if column not in table.column_names:
            raise RuleError(path, label, f"group_by[{i}]", f"{table_name} has no column {column!r}")
    suppress_for = raw.get("suppress_for", 0)
    if isinstance(suppress_for, bool) or not isinstance(suppress_for, int) or suppress_for < 0:
        raise RuleError(path, label, "suppress_for", f"must be seconds (an integer >= 0), got {suppress_for!r}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleError(path, label, "enabled", f"must be true or false, got {enabled!r}")
    where = check_expression(conn, guard, table, raw.get("where"), path, label, "where")
    exceptions = strings("exceptions")
    for i, exc in enumerate(exceptions):
        check_expression(conn, guard, table, exc, path, label, f"exceptions[{i}]")
    rule = Rule(rule_id, version, name, description, table_name, where, severity, tuple(mitre),
                tuple(group_by), suppress_for, tuple(exceptions), enabled, path)
    rule.where_sql = shared_json_shortcuts(where, table)
    rule.exceptions_sql = tuple(shared_json_shortcuts(e, table) for e in exceptions)
    rule.sql = evaluation_sql(rule)
    return rule


# `json_extract(ancestry, '$[2].exe_name')`: one element of a shared JSON
# array. Through the view, the column is the whole array, put together from
# its side rows for every row the expression is evaluated on (a recursive
# query over the whole line); the element alone is a few lookups by key.
_SHARED_ELEMENT = re.compile(
    r"""json_extract\s*\(\s*(?:"(?P<q>[A-Za-z_][A-Za-z0-9_]*)"|(?P<n>[A-Za-z_][A-Za-z0-9_]*))\s*,\s*"""
    r"""'\$\[(?P<k>\d+)\](?P<rest>(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)'\s*\)""", re.I)
SHORTCUT_MAX_INDEX = 16


def _element_sql(table: Table, column: str, k: int) -> str:
    """Element k of the shared column's array, for the row of the view the
    expression is evaluated on: from the chain of side rows (node k's entry),
    else from a whole value (a side row of depth 0, or the text kept in the
    row itself from before the column was shared)."""
    t, side, view = quote(table.name), quote(side_table(table.name, column)), quote(read_view(table.name))
    ref = quote(column + "_ref")
    joins = "".join(f" JOIN {side} s{i} ON s{i}.id = s{i - 1}.parent" for i in range(1, k + 1))
    chained = (f"(SELECT s{k}.value FROM {t} r JOIN {side} s0 ON s0.id = r.{ref}{joins} "
               f"WHERE r.eid = {view}.eid AND s0.depth > {k})")
    whole = (f"(SELECT json_extract(COALESCE(s0.value, r.{quote(column)}), '$[{k}]') FROM {t} r "
             f"LEFT JOIN {side} s0 ON s0.id = r.{ref} WHERE r.eid = {view}.eid AND COALESCE(s0.depth, 0) = 0)")
    return f"COALESCE({chained}, {whole})"


def shared_json_shortcuts(sql: str, table: Table) -> str:
    """The expression with each `json_extract(<shared column>, '$[k]...')`
    (outside strings and comments, k up to SHORTCUT_MAX_INDEX) reading
    element k alone: the same value, without assembling the whole array."""
    try:
        code = {i for i, _ in _code(sql)}
    except _Unterminated:
        return sql
    out, at = [], 0
    for m in _SHARED_ELEMENT.finditer(sql):
        name = m.group("q") or m.group("n")
        k = int(m.group("k"))
        if m.start() not in code or name not in table.column_names or not table.column(name).shared \
                or k > SHORTCUT_MAX_INDEX:
            continue
        out += [sql[at:m.start()], f"json_extract({_element_sql(table, name, k)}, '${m.group('rest')}')"]
        at = m.end()
    return "".join(out) + sql[at:] if out else sql


def evaluation_sql(rule: Rule) -> str:
    """Matching rows in an eid range: eid, time, then the group_by values.
    An exception that is NULL for a row does not except it."""
    columns = ", ".join(["eid", "time", *(quote(c) for c in rule.group_by)])
    where, exceptions = rule.where_sql or rule.where, rule.exceptions_sql or rule.exceptions
    clauses = [f"(\n{where}\n)"] + [f"NOT IFNULL((\n{exc}\n), 0)" for exc in exceptions]
    return (f"SELECT {columns} FROM {quote(read_view(rule.table))} WHERE eid > ? AND eid <= ? AND "
            + " AND ".join(clauses) + " ORDER BY eid")


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def _top_level_words(sql: str):
    """(position, WORD) of the words outside parentheses, strings, quoted
    names and comments (the text is a validated expression: an unclosed
    string or comment just ends it)."""
    depth, after_word = 0, 0
    try:
        for i, c in _code(sql):
            if i < after_word:
                continue
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif depth == 0:
                m = _WORD.match(sql, i)
                if m:
                    yield i, m.group(0).upper()
                    after_word = m.end()
    except _Unterminated:
        return


def conjuncts(where: str) -> list[str] | None:
    """The terms of `where` when it is a plain conjunction at its top level
    (no OR, BETWEEN or CASE there, where an AND would not join terms), in
    order; None otherwise. A single term is a conjunction of one."""
    words = list(_top_level_words(where))
    if any(w in ("OR", "BETWEEN", "CASE") for _, w in words):
        return None
    terms, start = [], 0
    for at, word in words:
        if word == "AND":
            terms.append(where[start:at].strip())
            start = at + 3
    terms.append(where[start:].strip())
    return terms if all(terms) else None


def leading_term(where: str) -> tuple[str, str] | None:
    """(first term, the rest) of a plain conjunction of two terms or more."""
    terms = conjuncts(where)
    if not terms or len(terms) < 2:
        return None
    first = terms[0]
    rest = where[where.index(first) + len(first):].lstrip()
    return first, rest[3:].strip()       # past the AND


# The term shapes the combined query can serve cheaply: `column = literal`,
# `column IN (literal, ...)` (answered together, for every rule holding one,
# by one IN over all their literals: SQLite looks a value up in a constant
# list at once instead of comparing it with each) and `column REGEXP 'pattern'`
# (put behind a C-level substring test of the literal every match contains,
# so most rows never call the Python function).
_NAME = r'(?:"(?P<q>[A-Za-z_][A-Za-z0-9_]*)"|(?P<n>[A-Za-z_][A-Za-z0-9_]*))'
_LITERAL = r"(?:'(?:[^']|'')*'|-?\d+)"
_EQUALS = re.compile(rf"^{_NAME}\s*==?\s*(?P<v>{_LITERAL})$", re.S)
_IN_LIST = re.compile(rf"^{_NAME}\s+IN\s*\(\s*(?P<v>{_LITERAL}(?:\s*,\s*{_LITERAL})*)\s*\)$", re.S | re.I)
_REGEXP = re.compile(rf"^{_NAME}\s+REGEXP\s+(?P<v>'(?:[^']|'')*')$", re.S | re.I)
_LITERALS = re.compile(_LITERAL)
MIN_REQUIRED = 3                 # shorter literals are in nearly every value: not worth a test


def _column(m: re.Match, columns: dict) -> str | None:
    name = m.group("q") or m.group("n")
    return name if name in columns else None


def equality(term: str, columns: dict) -> tuple[str, list[str]] | None:
    """(column, its literals as SQL) when the term is `column = literal` or
    `column IN (literals)` on a column of the table."""
    m = _EQUALS.match(term) or _IN_LIST.match(term)
    column = m and _column(m, columns)
    if not column:
        return None
    return column, _LITERALS.findall(m.group("v"))


def required_literal(pattern: str) -> str | None:
    """A substring every string the pattern matches contains: the longest run
    of plain characters at the pattern's top level (a quantifier, a group or an
    alternation ends a run). None when there is no such run of MIN_REQUIRED or
    more, or the pattern ignores case."""
    try:
        from re import _parser as sre_parse          # Python's own parse of the pattern
        parsed = sre_parse.parse(pattern)
        literal = sre_parse.LITERAL
    except Exception:       # noqa: BLE001 - any failure only costs the shortcut
        return None
    if parsed.state.flags & re.IGNORECASE:
        return None
    best, run = "", []
    for op, arg in list(parsed) + [(None, None)]:
        if op is literal:
            run.append(chr(arg))
            continue
        if len(run) > len(best):
            best = "".join(run)
        run = []
    return best if len(best) >= MIN_REQUIRED and "\x00" not in best else None


def _guarded(term: str, columns: dict) -> str:
    """The term, behind a substring test when it is a REGEXP on a text column
    with a literal every match contains (the test never holds where the term
    could: both are NULL on NULL, and a value without the literal cannot match)."""
    m = _REGEXP.match(term)
    column = m and _column(m, columns)
    if not column or not columns[column].type == "TEXT":
        return term
    literal = required_literal(m.group("v")[1:-1].replace("''", "'"))
    if literal is None:
        return term
    return f"instr({quote(column)}, '{literal.replace(chr(39), chr(39) * 2)}') > 0 AND {term}"


def _all_of(terms: list[str], columns: dict) -> str:
    return " AND ".join(f"(\n{_guarded(t, columns)}\n)" for t in terms) if terms else "1"


def _any_of(conjunctions: list[list[str]], columns: dict) -> str:
    """SQL that holds for a row exactly when every term of one of the
    conjunctions does. Conjunctions that start with the same term share its
    evaluation (a row it fails for costs one test, not one per rule), and
    those holding an equality on the same column share one IN lookup."""
    if any(not c for c in conjunctions):
        return "1"
    by_lead: dict[str, list[list[str]]] = {}
    for c in conjunctions:
        by_lead.setdefault(c[0], []).append(c)
    parts, single = [], []
    for lead, group in by_lead.items():
        if len(group) > 1:
            parts.append(f"((\n{_guarded(lead, columns)}\n) AND ({_any_of([c[1:] for c in group], columns)}))")
        else:
            single.append(group[0])
    # Of the rest, those with an equality on the same column (the column most
    # of them test first) are looked up together.
    while single:
        tests: dict[str, list[tuple[list[str], list[str]]]] = {}
        for c in single:
            for term in c:
                found = equality(term, columns)
                if found:
                    tests.setdefault(found[0], []).append((c, found[1]))
        column, members = max(tests.items(), key=lambda kv: len(kv[1]), default=(None, []))
        chosen = {id(c) for c, _ in members}
        if len(chosen) < 2:
            break
        values = sorted({v for _, vs in members for v in vs})
        inner = " OR ".join(f"({_all_of(c, columns)})" for c in single if id(c) in chosen)
        parts.append(f"({quote(column)} IN ({', '.join(values)}) AND ({inner}))")
        single = [c for c in single if id(c) not in chosen]
    parts += [f"({_all_of(c, columns)})" for c in single]
    return " OR ".join(parts)


def combined_sql(table: Table, rules: list[Rule]) -> tuple[str, list[str]]:
    """One query for every rule of a table (see AlertEngine._combined): eid,
    time, the group_by columns of any of them, then one flag per rule; only
    rows where some rule's where holds come back (the flags are each rule's
    exact test, exceptions included; the WHERE only picks the rows cheaply)."""
    columns = ["eid", "time"] + sorted({c for r in rules for c in r.group_by} - {"eid", "time"})
    flags = []
    wheres = [rule.where_sql or rule.where for rule in rules]
    for rule, where in zip(rules, wheres):
        clauses = [f"IFNULL((\n{where}\n), 0)"] + [f"NOT IFNULL((\n{exc}\n), 0)"
                                                     for exc in rule.exceptions_sql or rule.exceptions]
        flags.append("(" + " AND ".join(clauses) + ")")
    known = {c.name: c for c in table.columns}
    conjunctions = [conjuncts(where) for where in wheres]
    plain = [c for c in conjunctions if c is not None]
    terms = [f"(\n{where}\n)" for where, c in zip(wheres, conjunctions) if c is None]
    if plain:
        terms.append(f"({_any_of(plain, known)})")
    sql = (f"SELECT {', '.join(quote(c) for c in columns)}, {', '.join(flags)} FROM {quote(read_view(table.name))} "
           f"WHERE eid > ? AND eid <= ? AND ({' OR '.join(terms)}) ORDER BY eid")
    return sql, columns


def group_key(values) -> str:
    return json.dumps(list(values), separators=(",", ":"), ensure_ascii=False)


def rule_files(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names if n.endswith((".yml", ".yaml")) and not n.startswith(".")]


def load(directories: list[str], tables: dict[str, Table], conn: sqlite3.Connection,
         guard: Guard) -> tuple[dict[str, Rule], list[RuleError]]:
    """Every rule of every file in the directories, in order; a rule in a later
    directory replaces one of the same id from an earlier one (the packaged
    defaults come first, so an admin's file overrides or disables them)."""
    import yaml
    rules: dict[str, Rule] = {}
    errors: list[RuleError] = []
    for directory in directories:
        here: dict[str, str] = {}
        try:
            files = rule_files(directory)
        except OSError as e:
            errors.append(RuleError(directory, None, None, f"cannot list: {e}"))
            continue
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    doc = yaml.safe_load(f)
            except (OSError, UnicodeDecodeError) as e:
                errors.append(RuleError(path, None, None, f"cannot read: {e}"))
                continue
            except yaml.YAMLError as e:
                errors.append(RuleError(path, None, None, f"not valid YAML: {e}"))
                continue
            if doc is None:
                continue
            if isinstance(doc, dict) and "rules" in doc:
                doc = doc["rules"]
            elif isinstance(doc, dict):
                doc = [doc]
            if not isinstance(doc, list):
                errors.append(RuleError(path, None, None, "must hold a list of rules"))
                continue
            for i, raw in enumerate(doc):
                try:
                    rule = parse_rule(raw, path, i, tables, conn, guard)
                except RuleError as e:
                    errors.append(e)
                    continue
                if rule.id in here:
                    errors.append(RuleError(path, rule.id, "id", f"already defined in {here[rule.id]}"))
                    continue
                here[rule.id] = path
                rules[rule.id] = rule
    return rules, errors

"""Read-only SQL over the local event store, for hosts without osquery.

Reads go through SQLite's authorizer: anything but reading is refused with
the action named, so a query cannot write, attach or load an extension even
through a function or a pragma.
"""
from __future__ import annotations

import os
import sqlite3

from vajrad.errors import VajraError
from vajrad.tables import TABLES

# Names osquery users query by that Vajra stores under a bpf_ name, so that
# queries written for the process-ancestry osquery build run verbatim.
# The osquery shim's names (vajra_<table>) too, so that a query written for
# osquery runs here as it is.
ALIASES = {alias: name for name, table in TABLES.items() for alias in table.aliases}
ALIASES.update({t.osquery_name: name for name, t in TABLES.items() if t.osquery_name != name})

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_ACTIONS = ("CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER "
            "CREATE_TEMP_VIEW CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE DROP_TEMP_INDEX "
            "DROP_TEMP_TABLE DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW INSERT PRAGMA "
            "TRANSACTION UPDATE ATTACH DETACH ALTER_TABLE REINDEX ANALYZE CREATE_VTABLE DROP_VTABLE "
            "SAVEPOINT").split()
_ACTION_NAMES = {getattr(sqlite3, "SQLITE_" + n): n for n in _ACTIONS if hasattr(sqlite3, "SQLITE_" + n)}
_BLOCKED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}
# Pragmas that only describe the schema or the build, whatever their argument:
# allowed, so that the table-valued forms (SELECT * FROM pragma_table_info('x'))
# work. Any other pragma (journal_mode, writable_schema, ...) stays refused.
_READ_ONLY_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
                      "foreign_key_list", "function_list", "module_list", "pragma_list", "collation_list",
                      "database_list", "compile_options"}


class QueryError(VajraError):
    pass


class ReadOnlySql:
    def __init__(self, database: str, live: dict[str, list[dict]] | None = None):
        """live: rows of live tables (read from vajrad), offered as TEMP tables."""
        if not os.path.exists(database):
            raise QueryError(f"no event store at {database} (is vajrad configured with another --database_path?)")
        try:
            self.conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
            self.conn.execute("PRAGMA busy_timeout=5000")
            have = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            # Each table is read through the view the store keeps for SQL
            # readers ("<table>__read", which puts shared columns back
            # together), under the table's own name: temp is searched first.
            views = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='view'")}
            for name in TABLES:
                if name in have and f"{name}__read" in views:
                    self.conn.execute(f'CREATE TEMP VIEW "{name}" AS SELECT * FROM main."{name}__read"')
            for name, rows in (live or {}).items():
                cols = TABLES[name].columns
                self.conn.execute(f'CREATE TEMP TABLE "{name}" ('
                                  + ", ".join(f'"{c.name}" {c.sqlite_type}' for c in cols) + ")")
                self.conn.executemany(f'INSERT INTO temp."{name}" VALUES ({", ".join("?" for _ in cols)})',
                                      [tuple(r.get(c.name) for c in cols) for r in rows])
            # SQLite asks to update sqlite_master when a connection first uses an
            # eponymous virtual table (a table-valued pragma, json_each): done
            # here, before the authorizer, so that only the PRAGMA itself is asked later.
            for name in sorted(_READ_ONLY_PRAGMAS):
                self.conn.execute(f"SELECT * FROM pragma_{name} LIMIT 0").fetchall()
            for name in ("json_each", "json_tree"):
                self.conn.execute(f"SELECT * FROM {name}('[]') LIMIT 0").fetchall()
            for alias, target in ALIASES.items():
                if (target in have or target in (live or {})) and alias not in have:
                    self.conn.execute(f'CREATE TEMP VIEW "{alias}" AS SELECT * FROM "{target}"')
        except sqlite3.Error as e:
            raise QueryError(f"cannot open {database}: {e}") from e
        self.refused: str | None = None
        self.conn.set_authorizer(self._authorize)

    def _authorize(self, action, arg1, arg2, db, trigger):
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _BLOCKED_FUNCTIONS:
            refused = f"function {arg2}()"
        elif action in _ALLOWED:
            return sqlite3.SQLITE_OK
        elif action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_ONLY_PRAGMAS:
            return sqlite3.SQLITE_OK
        elif (arg1 or "").startswith(("sqlite_master", "sqlite_temp_master", "sqlite_schema")):
            refused = "a schema change"       # SQLite asks for this before CREATE/DROP
        else:
            refused = _ACTION_NAMES.get(action, f"action {action}")
        # The first refusal names the statement; later ones are its consequences.
        self.refused = self.refused or refused
        return sqlite3.SQLITE_DENY

    def run(self, sql: str) -> tuple[list[str], list[tuple]]:
        self.refused = None
        try:
            cur = self.conn.execute(sql)
            rows = cur.fetchall()
        except sqlite3.Warning as e:           # e.g. more than one statement
            raise QueryError(str(e)) from e
        except sqlite3.DatabaseError as e:
            if "because it is a view" in str(e):       # a write to a table we show as a view
                self.refused = self.refused or sql.split(None, 1)[0].upper()
            if self.refused:
                raise QueryError(f"refused: vajractl query is read-only, and this statement needs "
                                 f"{self.refused}") from e
            raise QueryError(str(e)) from e
        return [d[0] for d in cur.description or ()], rows

    def close(self) -> None:
        self.conn.close()

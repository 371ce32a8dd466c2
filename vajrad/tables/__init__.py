"""One module per table; each defines TABLE (see vajrad/schema.py).

`TABLES` (every declared table, by name) is built on first use, so that
importing one table module does not import the others.
"""
from __future__ import annotations

import importlib
import pkgutil

from vajrad.schema import Table

_tables: dict[str, Table] | None = None


def load_tables() -> dict[str, Table]:
    """Every table declared in this package, by name."""
    found: dict[str, Table] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        table = importlib.import_module(f"{__name__}.{info.name}").TABLE
        if table.name != info.name:
            raise ValueError(f"vajrad/tables/{info.name}.py declares table {table.name}")
        found[table.name] = table
    return found


def __getattr__(name: str):
    global _tables
    if name == "TABLES":
        if _tables is None:
            _tables = load_tables()
        return _tables
    raise AttributeError(name)

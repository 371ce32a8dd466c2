"""Writes docs/tables.md and docs/flags.md from the declarations, so the docs
cannot drift: tests/test_docs.py fails when they are stale.

    python -m vajrad.docgen          # rewrite both files
"""
from __future__ import annotations

import sys
from pathlib import Path

from vajrad.collectors.registry import CATALOGUE, UNITS
from vajrad.tables import TABLES

DOCS = Path(__file__).resolve().parent.parent / "docs"


def tables_md() -> str:
    out = ["# Tables", "",
           "Generated from `vajrad/tables/*.py` by `python -m vajrad.docgen`; do not edit by hand.", "",
           "Types are osquery's. Options: *hidden* columns are left out of `SELECT *` in osquery; "
           "*additional* columns are used as constraints but not required.", ""]
    for t in TABLES.values():
        out += [f"## {t.name}", "", t.description, ""]
        if t.aliases:
            out += ["`vajractl query` also answers it as " + ", ".join(f"`{a}`" for a in t.aliases) + ".", ""]
        out += ["| column | type | options | description |", "| --- | --- | --- | --- |"]
        for c in t.columns:
            opts = ", ".join(o for o in ("hidden", "additional", "index") if getattr(c, o))
            out.append(f"| `{c.name}` | {c.type} | {opts} | {c.description} |")
        if t.notes:
            out += ["", "Per event kind:", ""]
            out += [f"- `{kind}`: {note}" for kind, note in t.notes.items()]
        out.append("")
    return "\n".join(out)


def flags_md() -> str:
    out = ["# Flags and options", "",
           "Generated from `vajrad/config.py` and the units' declarations (`vajrad/collectors/*/__init__.py`) by `python -m vajrad.docgen`; do not edit by hand.", "",
           "Each option is a flag (`--name=value`; booleans also `--name` and `--noname`) and, except "
           "`config_path`, a key under `options` in the config file. Flags win over the file. "
           "*Reload* marks options that SIGHUP applies without a restart.", "",
           "| option | type | default | reload | meaning |", "| --- | --- | --- | --- | --- |"]
    for o in CATALOGUE.options:
        default = str(o.default).lower() if o.type is bool else o.default
        choices = f" One of: {', '.join(o.choices)}." if o.choices else ""
        out.append(f"| `{o.name}` | {o.type.__name__} | `{default}` | {'yes' if o.reloadable else ''} "
                   f"| {o.help}{choices} |")
    return "\n".join(out) + "\n"


GENERATED = {"tables.md": tables_md, "flags.md": flags_md}


def main() -> int:
    DOCS.mkdir(exist_ok=True)
    for name, make in GENERATED.items():
        (DOCS / name).write_text(make())
    return 0


if __name__ == "__main__":
    sys.exit(main())

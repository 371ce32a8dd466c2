"""Logs unit: application log files (log_files) and the journal (journal),
one log_events row per line, read exactly once through rotation,
truncation, restarts and crashes (positions are committed with the rows:
see tail.py), and the live log_files table.

Its config sections sit beside file_paths:
  "log_files": {"<category>": {"paths": [globs], "exclude": [globs],
                "start_at": "end"|"beginning", "rules": [{"name", "regex", "severity"}], ...}},
  "journal": {"<category>": {"units": [...], "match": {"FIELD": "value"}, "rules": [...]}}
(docs/logs.md has every field).
"""
from vajrad.config import Option
from vajrad.units import Section, Unit, UnitContext


def _parse(doc: dict, source: str):
    from vajrad.collectors.logs import settings
    return settings.parse(doc, source)


def _build(ctx: UnitContext):
    from vajrad.collectors.logs.collector import LogCollector
    return LogCollector(ctx.config.logs, ctx.need("store"), ctx.config.log_rescan_interval_ms,
                        containers=ctx.want("container_resolver"))


UNIT = Unit(
    name="logs",
    description="log_events and log_files: application log files and the journal, line by line.",
    tables=("log_events", "log_files"),
    factory=_build,
    wanted=lambda cfg: bool(cfg.logs) and not cfg.disable_events,
    needs=("store",),
    optional=("container_resolver",),
    options=(
        Option("log_rescan_interval_ms", int, 10_000,
               "How often the logs unit rescans the log_files directories besides inotify's wake-ups: "
               "the safety net for what inotify misses (NFS, FUSE, watch limits, a queue overflow).",
               minimum=100, maximum=3_600_000, reloadable=True),
    ),
    section=Section("logs", ("log_files", "journal"), _parse),
    starts_on_reload=True,
)

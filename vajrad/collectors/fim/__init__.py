"""File integrity monitoring: two units sharing one configuration.

- `fim` (file_events): inotify on the config's file_paths, with hashes; it
  owns the options and the osquery FIM sections (file_paths, exclude_paths,
  file_accesses), which the other unit reads too.
- `file` (bpf_file_events): who changed what, filtered in the kernel
  (bpf/file.bpf.c). Its program costs a compile and a hook on every open for
  writing, so it is built only once file_paths has a pattern (at start, or
  on the reload that brings one).
"""
from vajrad.config import Option
from vajrad.units import Section, Unit, UnitContext


def _parse_rules(doc: dict, source: str):
    from vajrad.collectors.fim import rules
    return rules.parse(doc, source)


def _build_watcher(ctx: UnitContext):
    from vajrad.collectors.fim.file_events import FimWatcher
    return FimWatcher(ctx.config.fim, ctx.config.read_max)


def _build_bpf(ctx: UnitContext):
    from vajrad.collectors.fim.bpf_file_events import FileCollector
    return FileCollector(ctx.need("kernel"), ctx.config.bpf_output, ctx.need("process_cache"), ctx.config.fim,
                         ctx.want("container_resolver"))


FILE_EVENTS = Unit(
    name="fim",
    description="file_events: changes to watched files, from inotify, with hashes.",
    tables=("file_events",),
    factory=_build_watcher,
    wanted=lambda cfg: cfg.enable_file_events and not cfg.disable_events,
    options=(
        Option("enable_file_events", bool, True,
               "File integrity monitoring of the config's file_paths: file_events (inotify, with hashes) "
               "and, with enable_bpf_events, bpf_file_events (who changed what, filtered in the kernel; "
               "its BPF program is loaded once file_paths has a pattern)."),
        Option("read_max", int, 50 * 1024 * 1024,
               "Largest file, in bytes, that file_events hashes; bigger files get hashed = 0.",
               minimum=0, reloadable=True),
    ),
    section=Section("fim", ("file_paths", "exclude_paths", "file_accesses"), _parse_rules),
)

BPF_FILE_EVENTS = Unit(
    name="file",
    description="bpf_file_events: file-changing calls on watched paths, filtered in the kernel.",
    tables=("bpf_file_events",),
    factory=_build_bpf,
    wanted=lambda cfg: bool(cfg.fim) and cfg.enable_file_events and cfg.enable_bpf_events
    and not cfg.disable_events,
    needs=("kernel", "process_cache"),
    optional=("container_resolver",),
    starts_on_reload=True,
)

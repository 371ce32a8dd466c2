"""vajrad: wires the store, the collectors and the API surfaces together."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time

from vajrad import __version__, config, faults, logs, units
from vajrad.collectors.base import Collector
from vajrad.collectors.registry import CATALOGUE, UNITS
from vajrad.errors import ConfigError, VajraError
from vajrad.kernel import environment as kernel
from vajrad.kernel.compiler_memory import release_compiler_pages
from vajrad.notify import Notifier
from vajrad.serve.dbus_api import DbusService
from vajrad.serve.hub import EventHub
from vajrad.serve.service import VajraService
from vajrad.serve.socket_api import ApiServer
from vajrad.store.event_store import EventStore
from vajrad.tables import TABLES
from vajrad.watchdog import Watchdog

log = logging.getLogger("vajrad")

STATUS_INTERVAL = 2.0
GC_THRESHOLDS = (50_000, 20, 20)
EXIT_CONFIG, EXIT_STARTUP = 2, 1
DAEMON_SERVICES = ("kernel", "store", "host_identifier")   # what the daemon itself offers units (see Vajrad.services)


def release_compiler_memory() -> None:
    """BCC compiles each program with LLVM in-process; glibc keeps the freed
    heap afterwards, and the compiler's code stays resident. Handing both back
    costs one call after the collectors load (see kernel/compiler_memory.py)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):    # not glibc
        pass
    dropped = release_compiler_pages()
    if dropped:
        log.info("released %d MiB of compiler pages (LLVM, clang) now that the BPF programs are loaded",
                 dropped >> 20)


class Vajrad:
    def __init__(self, argv: list[str]):
        units.check(UNITS, DAEMON_SERVICES)
        self.catalogue = CATALOGUE
        self.flags = config.parse_flags(argv, self.catalogue)
        self.config = config.load(argv, self.catalogue, self.flags)
        self.host_id = config.resolve_host_identifier(self.config.host_identifier)
        self.notifier = Notifier()
        self.started = time.time()
        self.kenv: kernel.KernelEnv | None = None
        # What units share: the kernel environment (probed on first use), the
        # store (for units that write with transactions), the current host
        # identifier (a callable: it may change on reload), and what each unit
        # provides as it is built.
        self.services = units.Services({"kernel": self._probe_kernel, "store": lambda: self.store,
                                        "host_identifier": lambda: (lambda: self.host_id)})
        self.collectors: list[Collector] = []
        self.units: dict[str, Collector] = {}
        self.store: EventStore | None = None
        self.hub = EventHub(self.config.subscriber_queue_events)
        self.api: ApiServer | None = None
        self.dbus: DbusService | None = None
        self.service: VajraService | None = None
        self._pumps: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self.watchdog: Watchdog | None = None
        self._background: set[asyncio.Task] = set()
        # SIGHUPs handled so far and how the last one ended, for a reloader
        # (vajrad.client.reload, the unit's ExecReload) that waits for it.
        self.reloads = {"count": 0, "result": "none"}

    # --- status -------------------------------------------------------------
    def counters(self) -> tuple[int, int]:
        """(captured, lost) for the D-Bus properties."""
        s = self.status()["events"]
        return s["captured"], s["lost"]

    def status(self) -> dict:
        collectors = {c.name: c.stats() for c in self.collectors}
        kernel_lost = sum(s.get("kernel_lost", 0) for s in collectors.values())
        store = self.store.stats() if self.store else {}
        collector_dropped = sum(s["dropped"] for s in collectors.values()) + store.get("rejected", 0)
        store_dropped = store.get("dropped", 0)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": int(time.time() - self.started),
            "host_identifier": self.host_id,
            "events_enabled": not self.config.disable_events,
            "bpf_enabled": self.config.enable_bpf_events,
            "kernel": self.kenv.describe() if self.kenv else {},
            "collectors": collectors,
            "store": store,
            "api": {"socket": self.config.api_socket,
                    "connections": self.api.connections if self.api else 0,
                    "subscribers": len(self.hub.subscribers),
                    "subscriber_missed": self.hub.missed_total,
                    "events_served": self.service.served if self.service else 0},
            "dbus": self.dbus.state if self.dbus else "stopped",
            "reload": dict(self.reloads),
            "events": {
                "captured": sum(c.captured for c in self.collectors),
                "captured_kernel": sum(c.captured for c in self.collectors if c.source == "kernel"),
                "captured_inotify": sum(c.captured for c in self.collectors if c.source == "inotify"),
                "captured_other": sum(c.captured for c in self.collectors
                                      if c.source not in ("kernel", "inotify")),
                "stored": store.get("stored", 0),
                "lost": kernel_lost + collector_dropped + store_dropped,
                "lost_kernel": kernel_lost,
                "lost_collector": collector_dropped,
                "lost_store": store_dropped,
            },
        }

    def status_line(self) -> str:
        e = self.status()["events"]
        return f"captured {e['captured']}, stored {e['stored']}, lost {e['lost']}"

    # --- start-up -------------------------------------------------------------
    def _probe_kernel(self) -> kernel.KernelEnv:
        kernel.ensure_tracefs()
        runtime = os.environ.get("RUNTIME_DIRECTORY", "/run/vajra").split(":")[0]
        self.kenv = kernel.probe(runtime)
        self.kenv.defines["VAJRA_WAKEUP_AGE_MS"] = self.config.bpf_wakeup_ms     # every program's submit()
        return self.kenv

    def _wanted_units(self, cfg: config.Config) -> list[units.Unit]:
        """Units the configuration asks for and that are not running yet, in build order."""
        if cfg.disable_events:
            return []
        return units.build_order([u for u in UNITS if u.name not in self.units and u.wanted(cfg)])

    async def _start_units(self, wanted: list[units.Unit], cfg: config.Config) -> None:
        for unit in wanted:
            collector = unit.factory(units.UnitContext(unit, cfg, self.services))
            await collector.start()
            self.units[unit.name] = collector
            self.collectors.append(collector)
            self._pumps.append(asyncio.create_task(self._pump(collector)))
        produced = {t for c in self.collectors for t in c.tables}
        for c in self.collectors:
            c.producers(produced)

    async def _start(self) -> None:
        cfg = self.config
        self.store = EventStore(cfg.database_path, TABLES, expiry=cfg.events_expiry,
                                max_rows=cfg.events_max, max_pending_ms=cfg.store_max_pending_ms,
                                max_pending_rows=cfg.store_max_pending_rows)
        self.store.open()
        loop = asyncio.get_running_loop()
        self.store.on_commit = lambda batches: loop.call_soon_threadsafe(self._committed, batches)
        self.store.start()
        if cfg.disable_events:
            log.info("events are disabled (--disable_events): no collector runs")
        elif not cfg.enable_bpf_events:
            log.info("eBPF collectors are disabled (--enable_bpf_events=false)")
        await self._start_units(self._wanted_units(cfg), cfg)
        if self.collectors:
            release_compiler_memory()
        snapshots = {name: rows for c in self.collectors for name, rows in c.snapshots().items()}
        self.service = VajraService(self.store, TABLES, self.status, snapshots,
                                    self.services.find("describe_process"), self.services.find("alert_triage"))
        self.api = ApiServer(cfg.api_socket, self.service, self.hub)
        await self.api.start()
        self.dbus = DbusService(cfg.dbus, self.service, self.counters)
        await self.dbus.start()
        faults.install(lambda: self.collectors)

    def _committed(self, batches: list[tuple[str, list]]) -> None:
        """Committed rows to live subscribers and observing collectors; rows
        a collector gave as lists become dicts only when someone listens."""
        for table, rows in batches:
            observers = [c for c in self.collectors if table in c.observes]
            wanted = self.hub.wants(table)
            if not observers and not wanted:
                continue
            # Observers that only follow eids (the alerts unit) take the rows as
            # they came: no dict per row for them alone.
            raw = [c for c in observers if c.observes_rows_as_given]
            for collector in raw:
                collector.observe(table, rows)
            if not wanted and len(raw) == len(observers):
                continue
            if type(rows[0]) is list:
                names = TABLES[table].column_names
                rows = [dict(zip(names, v)) for v in rows]
            self.hub.publish([(table, rows)])
            for collector in observers:
                if not collector.observes_rows_as_given:
                    collector.observe(table, rows)

    async def _pump(self, collector: Collector) -> None:
        # A batch may carry changes to its unit's saved state (a log offset),
        # committed in the same transaction as its rows.
        async for batch in collector.events():
            self.store.submit(batch[0], batch[1], self.host_id, state=batch[2] if len(batch) > 2 else None)

    # --- running ------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            await self._start()
        except VajraError as e:
            log.error("%s", e)
            await self._shutdown()
            return EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_STARTUP
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        # What start-up built (BCC, modules, the seeded cache) lives as long as
        # the daemon: frozen out of the collector's generations, a collection
        # walks only what events create. Before READY, so that the pause
        # (about 20 ms) comes before anyone relies on us.
        gc.collect()
        gc.freeze()
        # Rows are containers that live a few hundred ms, between the collector
        # and the store: at the default threshold (700 allocations) each is
        # walked by several young collections, about a tenth of vajrad's CPU
        # at 1,000 exec/s. They hold no cycles, so collecting rarely costs
        # little memory.
        gc.set_threshold(*GC_THRESHOLDS)
        self.notifier.ready(self.status_line())
        log.info("vajrad %s ready in %.2f s: socket %s, %s", __version__, time.monotonic() - t0,
                 self.config.api_socket,
                 ", ".join(c.name for c in self.collectors) or "no collectors")
        self._spawn(self._report_status())
        if self.notifier.watchdog_interval:
            self.watchdog = Watchdog(self.notifier, self.notifier.watchdog_interval, self.unhealthy)
            self.watchdog.start()
        await self._stop.wait()
        log.info("stopping")
        self.notifier.stopping()
        if self.watchdog is not None:       # stopping parts are not unhealthy ones
            await self.watchdog.stop()
        await self._shutdown()
        return 0

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            self.notifier.status(self.status_line())

    def unhealthy(self) -> list[str]:
        """What is wrong besides the event loop (the watchdog checks that);
        read from the watchdog's thread."""
        problems = []
        if self.store is None or not self.store.healthy:
            problems.append("event store writer is not healthy")
        return problems + [f"collector {c.name} is {c.state}" + (f" ({c.error})" if c.error else "")
                           for c in list(self.collectors) if not c.healthy]

    async def reload(self) -> None:
        """SIGHUP: re-read the config file. Flags given at start still win; a bad
        file is reported and the running config stays."""
        self.notifier.reloading()
        try:
            new = config.load([], self.catalogue, self.flags)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            self._reloaded(f"failed: {e}")
            return
        changed = self.config.changed(new)
        for name in sorted(changed):
            option = self.catalogue.by_name.get(name)
            if option is not None and not option.reloadable:
                log.warning("option %s changed; restart vajrad to apply it", name)
        if "host_identifier" in changed:
            self.host_id = config.resolve_host_identifier(new.host_identifier)
        if self.store:
            self.store.expiry, self.store.max_rows = new.events_expiry, new.events_max
        logs.set_verbose(new.verbose)
        for collector in self.collectors:
            try:
                collector.reconfigure(new)
            except Exception as e:      # a collector that cannot follow keeps its old settings
                log.error("collector %s could not apply the new configuration: %s", collector.name, e)
        brought = [u for u in self._wanted_units(new) if u.starts_on_reload]
        if brought:
            try:
                await self._start_units(brought, new)
                release_compiler_memory()
            except VajraError as e:
                log.error("collector could not start: %s", e)
        self.config = new
        # Without a file at the default path the embedded defaults apply:
        # say so rather than name a file that was never read.
        source = new.config_path if os.path.exists(new.config_path) else \
            f"the embedded defaults ({new.config_path} does not exist)"
        log.info("configuration reloaded from %s (%s)", source, ", ".join(sorted(changed)) or "no changes")
        self._reloaded("ok")

    def _reloaded(self, result: str) -> None:
        self.reloads = {"count": self.reloads["count"] + 1, "result": result}
        self.notifier.ready(self.status_line())

    async def _shutdown(self) -> None:
        if self.api:
            await self.api.stop()
        if self.dbus:
            await self.dbus.stop()
        for collector in self.collectors:
            await collector.stop()
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)
        if self.store:
            await asyncio.to_thread(self.store.stop)
            log.info("event store flushed: %d events stored in total this run", self.store.stored)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config.help_text(CATALOGUE))
        return 0
    if "--version" in argv:
        print(f"vajrad {__version__}")
        return 0
    # Nothing vajrad writes is for other users, whatever umask it inherits
    # (quickstart's shell has 022); the store and the socket also set theirs.
    os.umask(0o027)
    logs.configure("--verbose" in argv or "--verbose=true" in argv)
    try:
        daemon = Vajrad(argv)
    except ConfigError as e:
        log.error("configuration error: %s", e)
        return EXIT_CONFIG
    logs.set_verbose(daemon.config.verbose)
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    sys.exit(main())

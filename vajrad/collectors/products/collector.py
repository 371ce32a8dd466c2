"""security_products and security_product_events: the state of each product
in the catalogue and of the kernel's protections, re-evaluated the moment
something that can change it happens, and every change with the process
that caused it.

What triggers an evaluation round (debounced, one at a time):
- an exec of a product's executable, or an exit of one of its processes
  (committed bpf_process_events rows, through observe());
- the exit of a command that tampers with products (systemctl, kill, auditctl,
  nft, dpkg, ...: TAMPER_TOOLS), which also re-runs health commands;
- a change of a catalogue path or of dpkg's database, from inotify on their
  directories, and bpf_file_events/file_events rows on those paths;
- the reconcile pass (--security_products_reconcile_interval), which also
  refreshes health commands.

The actor of a change is looked for in what our own events saw shortly
before it: a file event on the path that changed, or an exec of a tamper
command naming the product (its unit, package, binary or pid). A change is
held up to ACTOR_WAIT_S for that evidence to be committed; when none comes,
the row says so (actor_found 0, actor_source none).
"""
from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import cachetools

from vajrad.collectors.base import Collector
from vajrad.collectors.products import dpkg, health, kernel_facts
from vajrad.collectors.products.catalogue import Product
from vajrad.tables import TABLES

log = logging.getLogger(__name__)

LIVE, EVENTS = "security_products", "security_product_events"
PROCESS_TABLE, FILE_TABLES = "bpf_process_events", ("bpf_file_events", "file_events")
DEBOUNCE_S = 0.05
# Rounds that events trigger come at most this often: on a busy host, execs
# and exits of watched executables and tamper tools would otherwise start a
# round each (measured: 8 rounds/s, 15% of a core, while the test suite ran).
# Changes are then seen up to this much later, well inside the 2 s target.
MIN_ROUND_INTERVAL_S = 0.5
ACTOR_WINDOW_NS = 30_000_000_000     # how far back a cause may lie
ACTOR_WAIT_S = 1.5                   # how long a change waits for its cause to be committed
SENDER_WAIT_S = 0.6                  # how long a signal's sender waits for its exec row
STOP_DRAIN_S = 3.0                   # how long stop() waits for found changes to be written
RECENT_MAX = 2048
HASH_CACHE = 512
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
# Commands whose exit may have changed a product; the value says which
# changes they can cause without naming the product on their command line.
TAMPER_TOOLS: dict[str, tuple[str, ...]] = {
    "systemctl": (), "service": (), "invoke-rc.d": (), "update-rc.d": (), "start-stop-daemon": (),
    "kill": (), "pkill": (), "killall": (),
    "auditctl": ("audit_rules_flushed", "audit_disabled"),
    "nft": ("firewall_flushed",), "iptables": ("firewall_flushed",), "iptables-nft": ("firewall_flushed",),
    "iptables-legacy": ("firewall_flushed",), "ip6tables": ("firewall_flushed",),
    "xtables-nft-multi": ("firewall_flushed",), "ufw": ("firewall_flushed",),
    "dpkg": (), "apt": (), "apt-get": (),
    "aa-complain": ("profile_complain",), "aa-disable": ("profile_complain", "lsm_disabled"),
    "apparmor_parser": ("profile_complain", "lsm_disabled"), "setenforce": ("lsm_disabled",),
    "bpftool": ("bpf_detached",),
}
# systemctl verbs that only read (the first word that is not an option)
SYSTEMCTL_READ_ONLY = frozenset({
    "status", "show", "cat", "help", "is-active", "is-enabled", "is-failed", "is-system-running",
    "list-units", "list-unit-files", "list-dependencies", "list-jobs", "list-timers", "list-sockets",
    "list-automounts", "list-paths", "list-machines", "get-default", "show-environment"})
_RESTARTS = frozenset({"restart", "try-restart", "reload-or-restart", "try-reload-or-restart", "condrestart",
                       "force-reload", "isolate"})
# The systemctl verbs that can cause each change (a `systemctl disable X` seen
# just before is not why X was masked); changes not listed take any verb.
SYSTEMCTL_CAUSES: dict[str, frozenset] = {
    "stopped": _RESTARTS | {"stop", "kill", "mask", "disable", "halt", "poweroff", "reboot", "rescue",
                           "emergency", "default", "exit", "freeze", "clean"},
    "failed": _RESTARTS | {"start", "stop", "kill", "reload"},
    "degraded": _RESTARTS | {"start", "stop", "kill", "reload", "freeze"},
    "started": _RESTARTS | {"start", "enable", "unmask", "default", "thaw", "reset-failed"},
    "recovered": _RESTARTS | {"start", "enable", "unmask", "default", "thaw", "reset-failed"},
    "masked": frozenset({"mask"}),
    "disabled": frozenset({"disable", "preset", "preset-all", "revert"}),
    "enabled": frozenset({"enable", "reenable", "preset", "preset-all", "unmask", "revert", "link",
                          "add-wants", "add-requires"}),
}
SEVERITY = {"stopped": "high", "failed": "high", "masked": "high", "disabled": "high", "uninstalled": "high",
            "binary_replaced": "high", "audit_rules_flushed": "high", "audit_disabled": "high",
            "firewall_flushed": "high", "bpf_detached": "high", "lsm_disabled": "high",
            "profile_complain": "high", "signal": "high", "config_changed": "medium", "signatures_out_of_date": "medium",
            "degraded": "medium", "unknown": "medium", "started": "low", "installed": "low",
            "enabled": "low", "recovered": "low"}


@dataclass
class Change:
    product: str
    type: str
    change: str
    old_state: str
    new_state: str
    reason: str
    paths: tuple[str, ...] = ()      # files whose change this is (binary, config)
    words: frozenset = frozenset()   # what a causing command line would name
    target_pid: int = 0
    signal: int = 0
    detected_ns: int = 0
    state_since_ns: int = 0          # when the product was first seen in old_state: causes come after
    actor: tuple | None = None       # (source, actor) when known at detection (a signal record)


def _unit_file_state(unit: str) -> str | None:
    """enabled, disabled, masked or static from the unit files, as systemctl
    is-enabled would say; None when no unit file exists."""
    for d in ("/etc/systemd/system", "/run/systemd/system"):
        p = os.path.join(d, unit)
        if os.path.islink(p) and os.path.realpath(p) == "/dev/null":
            return "masked"
    if glob.glob(f"/etc/systemd/system/*.wants/{glob.escape(unit)}"):
        return "enabled"
    for d in UNIT_DIRS:
        p = os.path.join(d, unit)
        if os.path.exists(p):
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    return "disabled" if "[Install]" in f.read() else "static"
            except OSError:
                return "disabled"
    return None


def _scan_processes() -> dict[str, list[tuple[int, int]]]:
    """Resolved executable -> [(start ticks, pid)] of every process, from /proc.
    A replaced or deleted image shows as '<path> (deleted)': it still counts."""
    found: dict[str, list[tuple[int, int]]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{entry.name}/exe")
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:                 # gone, a kernel thread, or a zombie
            continue
        start = int(stat[stat.rfind(b")") + 2:].split()[19])
        found.setdefault(exe.removesuffix(" (deleted)"), []).append((start, int(entry.name)))
    return found


class ProductsCollector(Collector):
    name = "products"
    source = "products"
    tables = (LIVE, EVENTS)
    observes = (PROCESS_TABLE,) + FILE_TABLES

    def __init__(self, products: list[Product], reconcile_s: float, bpf_enabled: bool,
                 describe_process=None, dpkg_status: str = dpkg.STATUS, signal_watch=None,
                 systemd_bus: str = "auto"):
        super().__init__()
        self.products = {p.name: p for p in products}
        self.reconcile_s = reconcile_s
        self.bpf_enabled = bpf_enabled
        self.describe_process = describe_process
        self.dpkg = dpkg.DpkgDatabase(dpkg_status)
        self._rows: dict[str, dict] = {}
        self._previous: dict[str, dict] = {}     # name -> facts of the last round
        self._health = cachetools.TTLCache(maxsize=256, ttl=max(1.0, reconcile_s))
        self._health_last: dict[str, health.Verdict] = {}     # shown while a new run is under way
        self._health_running: dict[str, asyncio.Task] = {}
        self._hashes = cachetools.LRUCache(maxsize=HASH_CACHE)
        self._recent_execs: deque[dict] = deque(maxlen=RECENT_MAX)
        self._state_since: dict[str, int] = {}     # name -> when its current state was first seen
        self._exec_by_pid = cachetools.LRUCache(maxsize=RECENT_MAX * 2)   # every exec: signal senders
        self._signals: deque = deque(maxlen=RECENT_MAX)
        # (on_signal) -> a started-later SignalWatch; None without eBPF
        self._signal_factory = signal_watch
        self.signals = None
        self.signal_status = "off (no eBPF)" if signal_watch is None else "starting"
        self._recent_files: deque[dict] = deque(maxlen=RECENT_MAX)
        self._tamper_pids: dict[int, dict] = {}
        self._product_pids: dict[int, str] = {}
        self._exits: dict[int, int] = {}          # product pid -> signal that ended it (0: exit)
        self._by_exe: dict[str, str] = {}
        self._watch_names: dict[str, set[str]] = {}  # directory -> names in it
        self._wanted = asyncio.Event()
        self._refresh_health = False
        self._tasks: list[asyncio.Task] = []
        self._pending: set[asyncio.Task] = set()
        self._emissions: asyncio.Queue[asyncio.Task] = asyncio.Queue()
        self._notifier = None
        self._wm = None
        self._mask = 0
        self._own_expected: int | None = None
        self._own_pid = os.getpid()
        self._stopping = False
        self.rounds = 0
        self.health_runs = 0
        self.last_round_ms = 0.0
        # "auto": the system bus when systemd runs; "none"; or a bus address
        self._systemd_bus = systemd_bus
        self._systemd = None
        self.systemd = _systemd_status()
        self._index()

    # --- set-up ---------------------------------------------------------------------
    def _index(self) -> None:
        self._by_exe = {exe: p.name for p in self.products.values() for exe in p.resolved_executables}
        self._watch_names = {}
        for p in self.products.values():
            for path in p.watched_paths + tuple(r.path for r in p.requires) + \
                    (p.signatures.paths if p.signatures else ()):
                self._watch_names.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
        self._watch_names.setdefault(os.path.dirname(self.dpkg.path), set()).add(os.path.basename(self.dpkg.path))

    async def start(self) -> None:
        self._open_channel()
        self.state = "starting"
        self._start_inotify()
        if self._signal_factory is not None:
            try:
                self.signals = self._signal_factory(self._on_signal)
                await self.signals.start()
                self.signal_status = "running (signal:signal_generate, filtered to watched pids)"
            except Exception as e:     # the inventory works without it; attribution of signals does not
                self.signals = None
                self.signal_status = f"unavailable: {e}"
                log.warning("security products: kill signals will not be recorded: %s", e)
        await self._start_systemd()
        await self._round(baseline=True)
        if self.bpf_enabled:
            bpf = self._rows.get("kernel-bpf")
            self._own_expected = (bpf or {}).get("_vajra_attached") or None
            if bpf is not None:        # what later rounds compare against, shown from the start
                bpf["_details"]["vajra_expected"] = self._own_expected
                bpf["details"] = json.dumps(bpf["_details"], sort_keys=True)
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._reconcile()),
                       asyncio.create_task(self._emit_in_order())]
        self.state = "running"
        log.info("security products: %d known, %s", len(self.products), self.systemd)

    async def _start_systemd(self) -> None:
        from vajrad.collectors.products import systemd
        if self._systemd_bus == "none" or (self._systemd_bus == "auto" and not systemd.booted()):
            return
        address = None if self._systemd_bus == "auto" else self._systemd_bus
        units = list(dict.fromkeys(u for p in self.products.values() for u in p.units))
        watcher = systemd.SystemdUnits(address, lambda: self._want(refresh_health=False))
        try:
            await watcher.start(units)
        except Exception as e:       # D-Bus down or refusing: unit files and processes still answer
            watcher.close()
            self.systemd = f"systemd runs, but its D-Bus API failed ({e}): unit states from unit files"
            log.warning("security products: %s", self.systemd)
            return
        self._systemd = watcher
        self.systemd = (f"systemd over D-Bus: {len(watcher.states)} units watched "
                        "(PropertiesChanged)")

    async def stop(self) -> None:
        if self._systemd is not None:
            self._systemd.close()
            self._systemd = None
        # Changes already found are written: their actor searches end now,
        # and the rows go to the store before the end of the stream.
        self._stopping = True
        rounds, emitter = self._tasks[:2], self._tasks[2:]
        for task in rounds:
            task.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)
        if emitter:
            try:
                await asyncio.wait_for(self._emissions.join(), STOP_DRAIN_S)
            except asyncio.TimeoutError:
                self.dropped += self._emissions.qsize()
                log.error("security products: %d changes not written at stop", self._emissions.qsize())
        for task in emitter + list(self._pending):
            task.cancel()
        await asyncio.gather(*emitter, *self._pending, return_exceptions=True)
        self._tasks = []
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
        if self.signals is not None:
            await self.signals.stop()
            self.signals = None
        if self._queue is not None:
            self._deliver(None)
        self.state = "stopped"

    def _start_inotify(self) -> None:
        """Watches the directories of the catalogue's paths (those that exist):
        a binary replaced by rename, a config edited, dpkg's database rewritten."""
        try:
            import pyinotify
        except ImportError:
            log.warning("security products: pyinotify is missing; file changes are seen at reconcile only")
            return
        mask = (pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO | pyinotify.IN_MOVED_FROM | pyinotify.IN_CREATE
                | pyinotify.IN_DELETE | pyinotify.IN_ATTRIB)
        wm = pyinotify.WatchManager()

        def on_event(event) -> None:
            if event.name in self._watch_names.get(event.path, ()):
                self._want(refresh_health=False)

        self._notifier = pyinotify.AsyncioNotifier(wm, asyncio.get_running_loop(), default_proc_fun=on_event)
        self._wm, self._mask = wm, mask
        self._watch_dirs()

    def _watch_dirs(self) -> None:
        """Adds watches for the catalogue's directories not watched yet (at start, on reload)."""
        if self._wm is None:
            return
        watched = set(self._wm.watches[wd].path for wd in list(self._wm.watches))
        dirs = [d for d in self._watch_names if os.path.isdir(d) and d not in watched]
        if dirs:
            self._wm.add_watch(dirs, self._mask, quiet=True)

    def reconfigure(self, config) -> None:
        from vajrad.collectors.products.catalogue import merged
        self.products = {p.name: p for p in merged(config.security_products)}
        self.reconcile_s = config.security_products_reconcile_interval
        self._health.clear()
        self._index()
        self._watch_dirs()
        if self._systemd is not None:
            # units the new catalogue names are watched over D-Bus too, before the round
            task = asyncio.get_running_loop().create_task(self._watch_units())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            self._want(refresh_health=True)

    async def _watch_units(self) -> None:
        try:
            await self._systemd.watch(list(dict.fromkeys(u for p in self.products.values() for u in p.units)))
        except Exception as e:       # unit files and processes still answer for those units
            log.warning("security products: cannot watch the new units over D-Bus: %s", e)
        self.systemd = f"systemd over D-Bus: {len(self._systemd.states)} units watched (PropertiesChanged)"
        self._want(refresh_health=True)

    # --- surfaces ---------------------------------------------------------------------
    def snapshots(self) -> dict:
        return {LIVE: self.rows}

    def rows(self) -> list[dict]:
        table = TABLES[LIVE]
        return [table.row(**{k: v for k, v in r.items() if not k.startswith("_")})
                for _, r in sorted(self._rows.items())]

    def stats(self) -> dict:
        s = super().stats()
        s.update({"products": len(self.products), "rounds": self.rounds, "health_runs": self.health_runs,
                  "last_round_ms": round(self.last_round_ms, 1), "systemd": self.systemd,
                  "reconcile_interval": self.reconcile_s, "signals": self.signal_status,
                  "signal_records": self.signals.records if self.signals else 0})
        return s

    # --- triggers ---------------------------------------------------------------------
    def observe(self, table: str, rows: list[dict]) -> None:
        if table == PROCESS_TABLE:
            for row in rows:
                self._observe_process(row)
        else:
            for row in rows:
                path = row.get("file_path") or row.get("target_path")
                dest = row.get("dest_path")
                # only calls on the catalogue's paths are kept: FIM can be busy elsewhere
                if any(os.path.basename(p) in self._watch_names.get(os.path.dirname(p), ())
                       for p in (path, dest) if p):
                    self._recent_files.append(dict(row, _ns=time.monotonic_ns()))
                    self._want(refresh_health=False)

    def _observe_process(self, row: dict) -> None:
        syscall, pid = row.get("syscall"), row.get("pid")
        if syscall == "exec":
            if row.get("parent") == self._own_pid:
                return      # our own health commands and bpftool: neither causes nor triggers
            path = row.get("path") or ""
            base = os.path.basename(path)
            entry = {"pid": pid, "path": path, "cmdline": row.get("cmdline") or "", "uid": row.get("uid"),
                     "ancestry": row.get("ancestry"), "eid": row.get("eid"), "tool": base,
                     "_ns": time.monotonic_ns()}
            self._exec_by_pid[pid] = entry
            if base in TAMPER_TOOLS or path.startswith("/etc/init.d/") or _script_tool(entry["cmdline"]):
                self._recent_execs.append(entry)
                self._tamper_pids[pid] = entry
                while len(self._tamper_pids) > RECENT_MAX:     # exits we never saw
                    del self._tamper_pids[next(iter(self._tamper_pids))]
            if path in self._by_exe:
                self._product_pids[pid] = self._by_exe[path]
                self._want(refresh_health=False)
        elif syscall == "exit":
            if self._product_pids.pop(pid, None) is not None:
                code = str(row.get("exit_code") or "0")
                self._exits[pid] = -int(code) if code.startswith("-") and code[1:].isdigit() else 0
                while len(self._exits) > RECENT_MAX:
                    del self._exits[next(iter(self._exits))]
                self._want(refresh_health=False)
            if self._tamper_pids.pop(pid, None) is not None:
                self._want(refresh_health=True)

    def _want(self, refresh_health: bool) -> None:
        self._refresh_health = self._refresh_health or refresh_health
        self._wanted.set()

    async def _run(self) -> None:
        last = 0.0
        while True:
            await self._wanted.wait()
            await asyncio.sleep(max(DEBOUNCE_S, last + MIN_ROUND_INTERVAL_S - time.monotonic()))
            self._wanted.clear()
            refresh, self._refresh_health = self._refresh_health, False
            last = time.monotonic()
            try:
                await self._round(refresh_health=refresh)
            except Exception as e:          # one bad round must not end live updates
                log.error("security products: evaluation failed: %r", e, exc_info=e)

    async def _reconcile(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_s)
            self._want(refresh_health=True)

    # --- evaluation -------------------------------------------------------------------
    async def _round(self, baseline: bool = False, refresh_health: bool = True) -> None:
        t0 = time.monotonic()
        if refresh_health:
            self._health.clear()
            if self._systemd is not None and not baseline:
                # after a tamper command or at reconcile: what systemd did not signal
                await self._systemd.refresh_all()
        facts = await asyncio.to_thread(self._static_facts)
        verdicts = await self._health_verdicts(facts, wait=baseline)
        now = int(time.time())
        changes: list[Change] = []
        rows: dict[str, dict] = {}
        seen_ns = time.monotonic_ns()
        for name, f in facts.items():
            row = self._product_row(f, verdicts.get(name), now) if "product" in f else self._kernel_row(f, now)
            rows[name] = row
            if not baseline and name in self._previous:
                found = self._changes(self._previous[name], row, f)
                for change in found:
                    change.state_since_ns = self._state_since.get(name, 0)
                changes.extend(found)
            if name not in self._previous or self._previous[name]["state"] != row["state"]:
                self._state_since[name] = seen_ns
        self._previous = rows
        self._rows = rows
        if self.signals is not None:
            self.signals.watch({pid for r in rows.values() for pid in r.get("_pids", ())
                                if r["name"] != "vajra"})
        self.rounds += 1
        self.last_round_ms = (time.monotonic() - t0) * 1000
        for change in changes:
            change.detected_ns = time.monotonic_ns()
            # Each change looks for its actor on its own, but rows leave in the
            # order the changes happened (a stop before the start that follows).
            task = asyncio.create_task(self._attributed(change))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            self._emissions.put_nowait(task)

    def _static_facts(self) -> dict[str, dict]:
        """Everything read from files and /proc, on a worker thread."""
        procs = _scan_processes()
        wanted = {pkg for p in self.products.values() for pkg in p.packages}
        packages = self.dpkg.packages(wanted)
        lsms = kernel_facts.active_lsms()
        out: dict[str, dict] = {}
        if len(self._product_pids) > RECENT_MAX:     # exits never seen (no eBPF): start afresh
            self._product_pids = {}
        for p in self.products.values():
            f: dict = {"product": p}
            pkg = next((packages[n] for n in p.packages if n in packages and packages[n].installed), None)
            f["package"] = pkg
            running = sorted(x for exe in p.resolved_executables for x in procs.get(exe, ()))
            f["pids"] = [pid for _, pid in running]
            for pid in f["pids"]:
                self._product_pids[pid] = p.name
            f["binary"] = next((b for b in p.binaries + p.executables if os.path.exists(b)), None)
            f["binary_sha256"] = self._sha256(f["binary"]) if f["binary"] else ""
            f["configs"] = {c: self._sha256(c) for c in p.configs if os.path.exists(c)}
            f["unit"], f["unit_file_state"], f["systemd"] = None, None, None
            for unit in p.units if self._systemd is not None else ():
                st = self._systemd.states.get(unit)
                if st and st.get("LoadState") not in (None, "not-found"):
                    f["unit"], f["systemd"] = unit, dict(st)
                    f["unit_file_state"] = "masked" if st.get("LoadState") == "masked" else st.get("UnitFileState")
                    break
            for unit in p.units if f["systemd"] is None else ():
                state = _unit_file_state(unit)
                if state is not None:
                    f["unit"], f["unit_file_state"] = unit, state
                    break
            f["missing"] = [r.reason for r in p.requires if not os.path.exists(r.path)]
            f["signatures"] = health.signatures(p.signatures) if p.signatures else None
            f["lsm_active"] = kernel_facts.lsm_active(p.lsm, lsms) if p.lsm else None
            out[p.name] = f
        for k in kernel_facts.collect(os.getpid(), self._own_expected):
            out[k["name"]] = k
        return out

    def _sha256(self, path: str) -> str:
        try:
            st = os.stat(path)
        except OSError:
            return ""
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest = self._hashes.get(key)
        if digest is None:
            h = hashlib.sha256()
            try:
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
            except OSError:
                return ""
            digest = self._hashes[key] = h.hexdigest()
        return digest

    async def _health_verdicts(self, facts: dict[str, dict], wait: bool) -> dict[str, health.Verdict]:
        """Health verdicts of installed products whose process runs (or needs
        none), cached until the next reconcile or tamper command. A command
        that must run again runs in the background: the round goes on with
        its last verdict (a slow or hung command delays nothing else), and its
        result starts a new round. wait: run them now (the first round)."""
        out, launched = {}, []
        for name, f in facts.items():
            p = f.get("product")
            if p is None or p.health is None or not _installed(f) or (p.needs_process and not f["pids"]):
                continue
            cached = self._health.get(name)
            if cached is not None:
                out[name] = cached
                continue
            if name not in self._health_running:
                task = asyncio.create_task(self._run_health(name, p.health))
                self._health_running[name] = task
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                launched.append(task)
            if name in self._health_last:
                out[name] = self._health_last[name]
        if wait and launched:
            await asyncio.gather(*launched)
            for name in facts:
                if name in self._health:
                    out[name] = self._health[name]
        return out

    async def _run_health(self, name: str, check) -> None:
        self.health_runs += 1
        try:
            verdict = await health.run(check)
        finally:
            self._health_running.pop(name, None)
        self._health[name] = self._health_last[name] = verdict
        self._want(refresh_health=False)

    def _product_row(self, f: dict, verdict: health.Verdict | None, now: int) -> dict:
        p: Product = f["product"]
        pkg = f["package"]
        pids = f["pids"]
        installed = _installed(f)
        details: dict = {}
        sig, sig_problem = f["signatures"] or (None, "")
        state, reason = "protecting", ""
        sd = f.get("systemd")
        if p.name == "vajra":
            installed, pids = True, [os.getpid()]
        elif sd and not pids and sd.get("MainPID"):
            pids = [sd["MainPID"]]           # a wrapper, or an executable the catalogue does not name
        if not installed:
            state, reason = "not_installed", "no package, binary or process of it found"
        elif f["unit_file_state"] == "masked":
            state, reason = "stopped", f"{f['unit']} is masked"
        elif sd and sd.get("ActiveState") == "failed":
            state, reason = "stopped", f"{f['unit']} failed ({sd.get('SubState')})"
        elif sd and p.needs_process and sd.get("ActiveState") == "active" and not pids:
            state, reason = "degraded", f"{f['unit']} is active but has no main process (MainPID 0)"
        elif p.needs_process and not pids:
            state, reason = "stopped", "no process of it runs"
        elif f["missing"]:
            state, reason = "degraded", "; ".join(f["missing"])
        elif f["lsm_active"] is False:
            state, reason = "degraded", f"the {p.lsm} LSM is not active in the kernel"
        elif verdict is not None and verdict.state != "ok":
            state = "unknown" if verdict.state == "unknown" else "degraded"
            reason = verdict.reason
        elif p.signatures and sig_problem:
            state, reason = "degraded", sig_problem
        elif p.name == "vajra":
            bpf = self._rows.get("kernel-bpf")
            if not self.bpf_enabled:
                state, reason = "degraded", "eBPF collectors are disabled (--enable_bpf_events=false)"
            elif bpf is not None and bpf["state"] == "degraded":
                state, reason = "degraded", bpf["state_reason"]
        if verdict is not None:
            details.update(verdict.facts)
        if f["configs"]:
            details["configs"] = f["configs"]
        running = bool(pids)
        has_units = bool(p.units) and p.needs_process     # a state of a running service
        return {
            "name": p.name, "vendor": p.vendor, "type": p.type, "installed": int(installed),
            "package": pkg.name if pkg else "", "version": pkg.version if pkg else "",
            "install_path": f["binary"] or "", "unit": f["unit"] or "",
            "active_state": sd.get("ActiveState", "") if sd else
            ("active" if running else "inactive") if has_units else "",
            "sub_state": sd.get("SubState", "") if sd else ("running" if running else "dead") if has_units else "",
            "unit_file_state": f["unit_file_state"] or "", "pid": pids[0] if pids else 0,
            "running": int(running), "state": state, "state_reason": reason,
            "signatures_version": str(sig["version"]) if sig else "",
            "signatures_time": sig["time"] if sig else None,
            "signatures_up_to_date": (int(sig["up_to_date"]) if sig else 0) if p.signatures else None,
            "binary_sha256": f["binary_sha256"], "details": json.dumps(details, sort_keys=True),
            "last_checked": now,
            "_pids": pids, "_configs": f["configs"], "_details": details,
        }

    def _kernel_row(self, k: dict, now: int) -> dict:
        d = k["details"]
        return {
            "name": k["name"], "vendor": k["vendor"], "type": k["type"],
            "installed": int(k["state"] != "not_installed"), "package": "", "version": os.uname().release,
            "install_path": "", "unit": "", "active_state": "", "sub_state": "", "unit_file_state": "",
            "pid": d.get("auditd_pid", 0) if k["name"] == "kernel-audit" else 0,
            "running": int(k["state"] in ("protecting", "degraded")), "state": k["state"],
            "state_reason": k["reason"], "signatures_version": "", "signatures_time": None,
            "signatures_up_to_date": None, "binary_sha256": "", "details": json.dumps(d, sort_keys=True),
            "last_checked": now, "_details": d, "_vajra_attached": d.get("vajra_attached"),
        }

    # --- changes -------------------------------------------------------------------
    def _changes(self, old: dict, new: dict, f: dict) -> list[Change]:
        name, kind = new["name"], new["type"]
        p: Product | None = f.get("product")
        words = frozenset(p.identifiers()) if p else frozenset({name})
        out: list[Change] = []

        def add(change: str, reason: str, **kw) -> None:
            out.append(Change(name, kind, change, old["state"], new["state"], reason, words=words, **kw))

        od, nd = old.get("_details", {}), new.get("_details", {})
        if old["installed"] and not new["installed"]:
            add("uninstalled", f"{name} is no longer installed (package {old['package'] or '-'})")
        elif not old["installed"] and new["installed"]:
            add("installed", f"{name} was installed ({new['package']} {new['version']})".strip())
        if p is not None:
            gone = [pid for pid in old.get("_pids", []) if pid not in new.get("_pids", [])]
            if old["running"] and not new["running"]:
                # how its process ended is added when the exit row is in (_attributed)
                failed = new["active_state"] == "failed"
                add("failed" if failed else "stopped" if p.needs_process else "degraded",
                    f"{name} {'failed' if failed else 'stopped'}", target_pid=gone[0] if gone else 0)
            elif not old["running"] and new["running"]:
                add("started", f"{name} started (pid {new['pid']})", target_pid=new["pid"])
            elif old["running"] and gone and not set(old["_pids"]) & set(new["_pids"]):
                # it stopped and started again between two rounds (a restart, a
                # flapping unit): both changes, in order, through the stopped state
                out.append(Change(name, kind, "stopped", old["state"], "stopped", f"{name} stopped",
                                  words=words, target_pid=gone[0]))
                out.append(Change(name, kind, "started", "stopped", new["state"],
                                  f"{name} started again (pid {new['pid']})", words=words, target_pid=new["pid"]))
            if old["binary_sha256"] and new["binary_sha256"] and old["binary_sha256"] != new["binary_sha256"]:
                add("binary_replaced", f"{new['install_path']} changed (sha256 {new['binary_sha256'][:16]}...)",
                    paths=(new["install_path"],))
            oc, nc = old.get("_configs", {}), new.get("_configs", {})
            changed = sorted(c for c in oc.keys() | nc.keys() if oc.get(c) != nc.get(c))
            if changed:
                add("config_changed", "changed: " + ", ".join(changed), paths=tuple(changed))
            if new["active_state"] == "failed" and old["active_state"] != "failed" and not new["running"] \
                    and not old["running"]:
                add("failed", new["state_reason"])
            ou, nu = old["unit_file_state"], new["unit_file_state"]
            if ou != nu and nu in ("masked", "disabled", "enabled") and ou:
                add(nu, f"{new['unit']} is now {nu} (was {ou})")
            if old["signatures_up_to_date"] == 1 and new["signatures_up_to_date"] == 0:
                add("signatures_out_of_date", new["state_reason"])
            if p.type == "firewall" and od.get("rules", 0) > 0 and nd.get("rules") == 0:
                add("firewall_flushed", f"the ruleset went from {od['rules']} rules to none")
        elif name == "kernel-audit":
            if od.get("rules", 0) > nd.get("rules", 0):
                add("audit_rules_flushed", f"audit rules went from {od['rules']} to {nd.get('rules')}")
            if od.get("enabled") and nd.get("enabled") == 0:
                add("audit_disabled", "the audit subsystem was disabled")
        elif name == "kernel-apparmor":
            if nd.get("complain", 0) > od.get("complain", 0):
                newly = sorted(set(nd.get("complain_profiles", [])) - set(od.get("complain_profiles", [])))
                add("profile_complain", "profiles put in complain mode: " + ", ".join(newly))
            if od.get("enabled") and not nd.get("enabled"):
                add("lsm_disabled", "AppArmor was disabled")
        elif name == "kernel-selinux":
            if od.get("mode") == "enforcing" and nd.get("mode") != "enforcing":
                add("lsm_disabled", "SELinux left enforcing mode")
        elif name == "kernel-bpf":
            if (od.get("vajra_attached") or 0) > (nd.get("vajra_attached") or 0):
                add("bpf_detached", new["state_reason"] or "Vajra's BPF attachments dropped")
        if not out and old["state"] != new["state"]:
            change = "recovered" if new["state"] == "protecting" else \
                "unknown" if new["state"] == "unknown" else \
                "stopped" if new["state"] == "stopped" else "degraded"
            add(change, new["state_reason"] or f"{name} is {new['state']}")
        return out

    # --- attribution ------------------------------------------------------------------
    def _sender(self, sig) -> dict:
        """What we know of a signal's sender: its exec row, else the process cache."""
        known = self._exec_by_pid.get(sig.sender)
        actor = {"pid": sig.sender, "uid": sig.sender_uid, "path": None, "cmdline": None, "ancestry": None,
                 "eid": None}
        if known is not None:
            actor.update(path=known["path"], cmdline=known["cmdline"], ancestry=known["ancestry"],
                         eid=known["eid"])
        elif self.describe_process is not None:
            found = self.describe_process(sig.sender)
            if found is not None:
                actor.update(path=found["process"].get("path"), cmdline=found["process"].get("cmdline"),
                             ancestry=json.dumps(found["ancestry"]))
        if actor["path"] is None:
            actor["path"] = ""
            actor["cmdline"] = sig.sender_comm
        return actor

    def _on_signal(self, sig) -> None:
        """A signal to a watched product's process, from the kernel: a row at
        once, and the sender is kept as the actor of the stop that may follow."""
        self._signals.append((time.monotonic_ns(), sig))
        name = self._product_pids.get(sig.target)
        row = self._rows.get(name) if name else None
        if row is None:
            return
        change = Change(name, row["type"], "signal", row["state"], row["state"],
                        f"signal {sig.sig} sent to {name}'s process {sig.target} by {sig.sender} "
                        f"({sig.sender_comm})", target_pid=sig.target, signal=sig.sig,
                        detected_ns=time.monotonic_ns(), actor=("signal", sig))
        task = asyncio.create_task(self._attributed(change))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        self._emissions.put_nowait(task)
        self._want(refresh_health=False)

    async def _emit_in_order(self) -> None:
        while True:
            task = await self._emissions.get()
            try:
                row = await task
            except Exception as e:         # a failed attribution must not stop the others
                log.error("security products: attribution failed: %r", e, exc_info=e)
                self.dropped += 1
                continue
            else:
                self.captured += 1
                self._enqueue((EVENTS, [row]))
            finally:
                self._emissions.task_done()

    async def _attributed(self, change: Change) -> dict:
        deadline = time.monotonic() + ACTOR_WAIT_S
        # A stop waits for its process's exit row (how it ended), then for its actor.
        ending = change.change in ("stopped", "failed") and change.target_pid
        while ending and change.target_pid not in self._exits and time.monotonic() < deadline \
                and not self._stopping:
            await asyncio.sleep(0.05)
        if ending:
            change.signal = self._exits.get(change.target_pid, 0)
            change.reason += (f": its process {change.target_pid} was killed by signal {change.signal}"
                              if change.signal else f": its process {change.target_pid} exited")
        actor = change.actor or self._find_actor(change)
        while actor is None and time.monotonic() < deadline and not self._stopping:
            await asyncio.sleep(0.1)
            actor = self._find_actor(change)
        values = dict(name=change.product, type=change.type, change=change.change, old_state=change.old_state,
                      new_state=change.new_state, severity=SEVERITY.get(change.change, "medium"),
                      target_pid=change.target_pid, signal=change.signal, time=int(time.time()))
        if actor is not None and actor[0] == "signal":
            # the sender's exec row (path, cmdline) may be committed after the
            # signal record arrives: a short-lived `kill` is known only by it
            sig = actor[1]
            wait_until = time.monotonic() + SENDER_WAIT_S
            while sig.sender not in self._exec_by_pid and time.monotonic() < wait_until and not self._stopping:
                await asyncio.sleep(0.05)
            actor = ("signal", self._sender(sig))
        if actor is None:
            values.update(reason=change.reason + " (no actor found in Vajra's events)", actor_found=0,
                          actor_source="none")
        else:
            source, a = actor
            ancestry = a.get("ancestry")
            if ancestry is None and self.describe_process is not None:
                found = self.describe_process(a["pid"]) if a.get("pid") else None
                ancestry = json.dumps(found["ancestry"]) if found else None
            values.update(reason=change.reason, actor_found=1, actor_source=source, pid=a.get("pid"),
                          path=a.get("path"), cmdline=a.get("cmdline"), uid=a.get("uid"), ancestry=ancestry,
                          actor_eid=a.get("eid"))
        return TABLES[EVENTS].row(**values)

    def _find_actor(self, change: Change) -> tuple[str, dict] | None:
        since = change.detected_ns - ACTOR_WINDOW_NS
        # A command seen before the product entered its old state cannot have
        # ended that state (`systemctl start X` is not why X failed later).
        commands_since = max(since, change.state_since_ns)
        if change.target_pid and change.signal:
            # the kernel saw who sent the signal that ended it
            for at, sig in reversed(self._signals):
                if at < since:
                    break
                if sig.target == change.target_pid and sig.sig == change.signal:
                    return "signal", sig
        if change.paths:
            for row in reversed(self._recent_files):
                if row["_ns"] < since:
                    break
                if (row.get("file_path") or row.get("target_path")) in change.paths or \
                        row.get("dest_path") in change.paths:
                    if row.get("pid") is None:
                        continue
                    found = next((e for e in reversed(self._recent_execs) if e["pid"] == row["pid"]), None)
                    actor = dict(row)
                    if found is not None:
                        actor.setdefault("cmdline", found["cmdline"])
                        actor["ancestry"] = actor.get("ancestry") or found["ancestry"]
                    return "file", actor
        for e in reversed(self._recent_execs):
            if e["_ns"] < commands_since:
                break
            if _causes(e, change):
                return "exec", e
        return None


def _audit_disables(args: list[str]) -> bool:
    return "-e0" in args or any(a == "-e" and b == "0" for a, b in zip(args, args[1:]))


_FLUSHES = frozenset({"-F", "--flush", "-X", "--delete-chain", "-P", "--policy"})
# Which invocations of a tamper tool make a change (the rest of its uses do not).
TOOL_ARGUMENTS = {
    ("auditctl", "audit_rules_flushed"): lambda args: "-D" in args,
    ("auditctl", "audit_disabled"): _audit_disables,
    ("nft", "firewall_flushed"): lambda args: bool({"flush", "delete", "-f"} & set(args)),
    **{(tool, "firewall_flushed"): (lambda args: bool(_FLUSHES & set(args)))
       for tool in ("iptables", "iptables-nft", "iptables-legacy", "ip6tables", "xtables-nft-multi")},
}


def _script_tool(cmdline: str) -> bool:
    """`sh /etc/init.d/auditd stop`: a shell running an init script."""
    parts = cmdline.split()
    return len(parts) > 1 and parts[1].startswith("/etc/init.d/")


def _systemctl_cannot_cause(tool: str, args: list[str], change: str) -> bool:
    """`systemctl status X`, `systemctl show X` name a product but change
    nothing; `systemctl disable X` does not mask it: never the cause."""
    if tool != "systemctl":
        return False
    verb = next((a for a in args if not a.startswith("-")), "")
    if verb in SYSTEMCTL_READ_ONLY:
        return True
    return change in SYSTEMCTL_CAUSES and verb not in SYSTEMCTL_CAUSES[change]


def _causes(exec_row: dict, change: Change) -> bool:
    """Whether this command could have caused the change: it names the
    product (or the target pid), or it is a tool whose effect is that change."""
    args = exec_row["cmdline"].split()[1:]
    if change.change in TAMPER_TOOLS.get(exec_row["tool"], ()):
        # the tool's effect, if these arguments make it: `auditctl -w` or
        # `nft add rule` just before a flush did not flush
        can = TOOL_ARGUMENTS.get((exec_row["tool"], change.change))
        return can is None or can(args)
    if _systemctl_cannot_cause(exec_row["tool"], args, change.change):
        return False
    names = set()
    for a in args:
        a = a.strip("'\"")
        names.add(a)
        names.add(os.path.basename(a))
        names.add(a.removesuffix(".service"))
    if change.target_pid and str(change.target_pid) in names:
        return True
    return bool(names & change.words)


def _installed(f: dict) -> bool:
    return f["package"] is not None or f["binary"] is not None or bool(f["pids"])


def _systemd_status() -> str:
    """Whether unit states can come from systemd; say why not when they cannot."""
    if os.path.isdir("/run/systemd/system"):
        return "systemd runs: connecting to its D-Bus API"
    try:
        with open("/proc/1/comm") as f:
            init = f.read().strip()
    except OSError:
        init = "unknown"
    return (f"systemd is not running (PID 1 is {init}): unit file states are read from the unit files, "
            "active states from the process table; D-Bus unit signals are skipped")

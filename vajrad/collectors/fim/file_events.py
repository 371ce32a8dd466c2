"""file_events: inotify (through pyinotify) on the config's file_paths, as
osquery's file_events, with hashes and the process behind each change.

inotify says what changed but not who. bpf_file_events says who; each
file_events row waits (up to CAUSE_WAIT_NS) for the bpf_file_events row of
the call that caused it, and carries its pid, executable and eid.
Hashing runs on worker threads; the event loop only reads inotify and lstat()s.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor

import pyinotify

from vajrad.collectors.fim import rules as fim
from vajrad.collectors.base import Collector
from vajrad.enrich.containers import CONTAINER_FIELDS, HOST

log = logging.getLogger(__name__)

TABLE = "file_events"
CAUSE_TABLE = "bpf_file_events"
TICK_S = 0.1
CAUSE_WAIT_NS = 1_000_000_000     # how long a row waits for the call behind it
CAUSE_SLACK_NS = 200_000_000      # inotify can be read before the call's exit is recorded
CAUSE_KEEP_NS = 10_000_000_000    # bpf_file_events rows kept for matching
# A call this close before the event is taken as its cause at once; an older
# one (the open of a long write) only once the wait is over and nothing newer came.
CAUSE_FRESH_NS = 100_000_000
UPDATE_QUIET_NS = 1_000_000_000   # writes without a close become UPDATED after this
# Taken from the cause's bpf_file_events row with its pid: the container
# context of the process that made the change.
CONTEXT_FIELDS = (*CONTAINER_FIELDS, "pid_namespace", "mnt_namespace", "net_namespace")
NO_CONTEXT = dict(zip(CONTEXT_FIELDS, (*HOST, None, None, None)))
HASH_CHUNK = 1 << 20
HASH_WORKERS = 2

# The calls that can cause each action, and which of a row's paths names the target.
_OPENS = ("open", "openat", "openat2", "creat")
CAUSES: dict[str, tuple[frozenset, str]] = {
    "CREATED": (frozenset(_OPENS + ("mkdir", "mkdirat", "symlink", "symlinkat")), "file_path"),
    "UPDATED": (frozenset(_OPENS + ("truncate", "ftruncate")), "file_path"),
    "DELETED": (frozenset({"unlink", "unlinkat", "rmdir"}), "file_path"),
    "MOVED_FROM": (frozenset({"rename", "renameat", "renameat2"}), "file_path"),
    "MOVED_TO": (frozenset({"rename", "renameat", "renameat2"}), "dest_path"),
    "ATTRIBUTES_MODIFIED": (frozenset({"chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "lchown",
                                       "fchown", "fchownat", "setxattr", "lsetxattr", "fsetxattr",
                                       "setxattrat", "link", "linkat", "truncate", "ftruncate"}
                                      | set(_OPENS)), "file_path"),
    "OPENED": (frozenset(_OPENS), "file_path"),
    "ACCESSED": (frozenset(_OPENS), "file_path"),
}
# A hard link's new name is CREATED by link(): matched through dest_path.
LINK_CREATES = frozenset({"link", "linkat"})
HASHED_ACTIONS = ("CREATED", "UPDATED")
# inotify events that map to one action each; writes, opens and reads are coalesced apart.
_ACTIONS = ((pyinotify.IN_CREATE, "CREATED"), (pyinotify.IN_DELETE, "DELETED"),
            (pyinotify.IN_MOVED_FROM, "MOVED_FROM"), (pyinotify.IN_MOVED_TO, "MOVED_TO"),
            (pyinotify.IN_ATTRIB, "ATTRIBUTES_MODIFIED"))


def hash_file(path: str, read_max: int) -> tuple[str, str, str, int]:
    """(md5, sha1, sha256, hashed) as osquery reports them: hashed 1, 0 when
    not a regular file or over read_max, -1 when it could not be read."""
    try:
        # O_NOFOLLOW: a symlink is not hashed (its target is another file's business)
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > read_max:
                return "", "", "", 0
            md5, sha1, sha256 = hashlib.md5(), hashlib.sha1(), hashlib.sha256()
            left = read_max
            while left > 0:
                chunk = f.read(min(HASH_CHUNK, left))
                if not chunk:
                    break
                md5.update(chunk)
                sha1.update(chunk)
                sha256.update(chunk)
                left -= len(chunk)
            return md5.hexdigest(), sha1.hexdigest(), sha256.hexdigest(), 1
    except OSError as e:
        return ("", "", "", 0) if e.errno == errno.ELOOP else ("", "", "", -1)


class _WatchFailures(logging.Handler):
    """pyinotify reports a watch it could not add (also the ones it adds by
    itself for new directories) only in its log; this counts them."""

    def __init__(self, watcher: "FimWatcher"):
        super().__init__(logging.ERROR)
        self.watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "cannot watch" in message:
            self.watcher.watch_failed(message, "No space left on device" in message)


class FimWatcher(Collector):
    name = "fim"
    source = "inotify"
    tables = (TABLE,)
    observes = (CAUSE_TABLE,)

    def __init__(self, rules: fim.FimRules, read_max: int, causes: bool = False):
        super().__init__()
        self.rules = rules
        self.read_max = read_max
        self.causes = causes                   # bpf_file_events is collected: wait for its rows
        self.watches: dict[str, int] = {}      # configured directories -> wd
        self.missing: list[str] = []
        self.watch_failures = 0
        self.watch_limit_reached = False
        self.overflows = 0
        self.inotify_events = 0                # read from the inotify queue
        self.ignored = 0
        self.hash_failures = 0
        self._wm = None
        self._notifier = None
        # (read at, row, action, hashing future or None)
        self._pending: deque[tuple[int, dict, str, asyncio.Future | None]] = deque()
        self._dirty: dict[str, int] = {}       # written, not yet closed: path -> first write
        self._accessed: set[str] = set()
        self._recent: dict[str, deque] = defaultdict(deque)      # path -> bpf_file_events rows
        # Opens by our own hashing not yet seen as IN_OPEN: those events are ours, not a reader's.
        self._own_opens: dict[str, int] = defaultdict(int)
        self._pool: ThreadPoolExecutor | None = None
        self._ticker: asyncio.Task | None = None
        # Set when there is something for the ticker to do; an idle watcher
        # (no paths, or nothing happening) does not wake every TICK_S.
        self._work = asyncio.Event()
        self._log_handler = _WatchFailures(self)

    # --- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self._open_channel()
        self.state = "starting"
        self._pool = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="vajra-hash")
        logging.getLogger("pyinotify").addHandler(self._log_handler)
        try:
            self._wm = pyinotify.WatchManager()
            self._notifier = pyinotify.AsyncioNotifier(self._wm, asyncio.get_running_loop(),
                                                       default_proc_fun=self._on_inotify)
        except Exception as e:                 # no inotify at all (seccomp, old kernel)
            self.state, self.error = "failed", str(e)
            raise
        self._throttle_move_cleanup()
        self._apply(self.rules)
        self._ticker = asyncio.create_task(self._tick())
        self.state = "running"

    def _throttle_move_cleanup(self) -> None:
        """pyinotify prunes its rename bookkeeping (entries older than a
        minute) on every read, walking all of it: under steady renames that
        was most of the event loop's time. Once a second is enough."""
        sys_proc = getattr(self._notifier, "_sys_proc_fun", None)
        prune = getattr(sys_proc, "cleanup", None)
        if prune is None:
            return
        last = [0.0]

        def throttled() -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                prune()
        sys_proc.cleanup = throttled

    async def stop(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        await self._release(final=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        logging.getLogger("pyinotify").removeHandler(self._log_handler)
        if self._queue is not None:
            self._deliver(None)
        self.state = "stopped"

    def producers(self, tables: set[str]) -> None:
        self.causes = CAUSE_TABLE in tables

    def reconfigure(self, config) -> None:
        if config.fim.unmatched:
            log.warning("file_paths patterns that match nothing yet: %s", ", ".join(config.fim.unmatched))
        self.read_max = config.read_max
        if config.fim != self.rules and self._wm is not None:
            self._apply(config.fim)
            self._own_opens.clear()
        self.rules = config.fim

    @property
    def healthy(self) -> bool:
        return self.state == "running" and self._ticker is not None and not self._ticker.done()

    def stats(self) -> dict:
        s = super().stats()
        # The keys every collector has (docs/api.md): inotify loses events in
        # the kernel only by overflowing its queue, counted in queue_overflows
        # and dropped, not here; nobody counts inotify's wake-ups.
        s.update(kernel_lost=0, output="inotify", records=self.inotify_events, wakeups=None)
        s.update(watches=len(self._wm.watches) if self._wm else 0, watched_roots=len(self.watches),
                 missing_roots=list(self.missing), watch_failures=self.watch_failures,
                 watch_limit_reached=self.watch_limit_reached, queue_overflows=self.overflows,
                 ignored=self.ignored, hash_failures=self.hash_failures, waiting=len(self._pending),
                 max_user_watches=inotify_limit())
        return s

    # --- watches -----------------------------------------------------------------
    def _mask(self, rules: fim.FimRules) -> int:
        p = pyinotify
        mask = (p.IN_CREATE | p.IN_DELETE | p.IN_MOVED_FROM | p.IN_MOVED_TO | p.IN_ATTRIB
                | p.IN_CLOSE_WRITE | p.IN_MODIFY | p.IN_DONT_FOLLOW)
        return mask | (p.IN_OPEN | p.IN_ACCESS if rules.accesses else 0)

    def _apply(self, rules: fim.FimRules) -> None:
        """Adds the new watches before removing the old, so that a directory
        watched before and after sees no gap."""
        wm = self._wm
        mask = self._mask(rules)

        def outside(path: str) -> bool:
            inner = path.rstrip("/") + "/"
            return rules.classify(path) is None and not any(r.root.startswith(inner) for r in rules.includes)

        targets = rules.watch_targets()
        added: dict[str, int] = {}
        self.missing = []
        for directory, recursive in sorted(targets.items()):
            if not os.path.isdir(directory):
                self.missing.append(directory)
                continue
            result = wm.add_watch(directory, mask, rec=recursive, auto_add=recursive,
                                  exclude_filter=outside, quiet=True)
            wd = result.get(directory, -1)
            if wd >= 0:                 # a failure reaches watch_failed through pyinotify's log
                added[directory] = wd
        # Then every watch no target needs any more goes, one by one: a stale
        # tree may hold a directory a new, narrower target still watches.
        trees = [d.rstrip("/") + "/" for d, rec in targets.items() if rec]
        for wd, watch in list(wm.watches.items()):
            path = watch.path
            if path not in targets and not any((path + "/").startswith(t) for t in trees):
                wm.rm_watch(wd, quiet=True)
        self.watches = added
        if self.missing:
            log.warning("file_paths: not watched by inotify until they exist and vajrad reloads: %s",
                        ", ".join(self.missing))
        log.info("inotify: %d directories configured, %d watches", len(added), len(wm.watches))

    def watch_failed(self, message: str, limit: bool) -> None:
        self.watch_failures += 1
        if limit and not self.watch_limit_reached:
            self.watch_limit_reached = True
            log.error("inotify watch limit reached (fs.inotify.max_user_watches): changes in the "
                      "directories not watched are missed; raise the limit and reload")
        log.warning("inotify: %s", message)

    # --- events ----------------------------------------------------------------------
    def _on_inotify(self, event) -> None:
        self.inotify_events += 1
        self._work.set()
        p = pyinotify
        mask = event.mask
        if mask & p.IN_Q_OVERFLOW:
            self.overflows += 1
            self.dropped += 1           # at least one; inotify does not say how many
            log.error("inotify queue overflowed: file_events were lost (fs.inotify.max_queued_events)")
            return
        if mask & p.IN_IGNORED or not getattr(event, "pathname", None):
            return
        path = event.pathname
        now = time.monotonic_ns()
        if mask & p.IN_MODIFY:
            self._dirty.setdefault(path, now)
            return
        if mask & p.IN_CLOSE_WRITE:
            self._dirty.pop(path, None)
            action = "UPDATED"
        elif mask & p.IN_OPEN:
            if self._own_opens.get(path):
                self._own_opens[path] -= 1
                if not self._own_opens[path]:
                    del self._own_opens[path]
                self._accessed.add(path)        # and the reads that follow are ours too
                return
            self._accessed.discard(path)
            action = "OPENED"
        elif mask & p.IN_ACCESS:
            if path in self._accessed:
                return
            self._accessed.add(path)
            action = "ACCESSED"
        else:
            action = next((name for bit, name in _ACTIONS if mask & bit), None)
            if action is None:
                return
        self._record(path, action, getattr(event, "cookie", 0) or 0, now)

    def _record(self, path: str, action: str, cookie: int, now: int) -> None:
        category = self.rules.classify(path, access=action in ("OPENED", "ACCESSED"))
        if category is None:
            self.ignored += 1
            return
        row = {"target_path": path, "category": category, "action": action, "transaction_id": cookie,
               "inode": None, "uid": None, "gid": None, "mode": None, "size": None, "atime": None,
               "mtime": None, "ctime": None, "md5": "", "sha1": "", "sha256": "", "hashed": 0,
               "pid": None, "path": None, "bpf_eid": None, **NO_CONTEXT, "time": int(time.time())}
        hashing = None
        if action not in ("DELETED", "MOVED_FROM"):
            try:
                st = os.lstat(path)
                row.update(inode=st.st_ino, uid=st.st_uid, gid=st.st_gid,
                           mode=f"{stat.S_IMODE(st.st_mode):04o}", size=st.st_size,
                           atime=int(st.st_atime), mtime=int(st.st_mtime), ctime=int(st.st_ctime))
                if action in HASHED_ACTIONS and stat.S_ISREG(st.st_mode):
                    hashing = self._hash_now(path)
            except OSError:
                if action in HASHED_ACTIONS:
                    row["hashed"] = -1      # gone before we could look
        self.captured += 1
        self._pending.append((now, row, action, hashing))
        if self.causes:
            self._find_cause(now, row, action, fresh_only=True)

    # --- causes ---------------------------------------------------------------------
    def observe(self, table: str, rows: list[dict]) -> None:
        """Committed bpf_file_events rows (with their eids), on the event loop."""
        if table != CAUSE_TABLE:
            return
        self._work.set()
        touched = set()
        for r in rows:
            if r.get("exit_code", "").startswith("-"):
                continue
            entry = (int(r["ntime"]), r["syscall"], r["eid"], r["pid"], r["path"], r["file_path"],
                     r["dest_path"], tuple(r.get(c) for c in CONTEXT_FIELDS))
            self._recent[r["file_path"]].append(entry)
            touched.add(r["file_path"])
            if r["dest_path"] and not r["syscall"].startswith("symlink"):
                self._recent[r["dest_path"]].append(entry)
                touched.add(r["dest_path"])
        for now, row, action, _ in self._pending:
            if row["bpf_eid"] is None and row["target_path"] in touched:
                self._find_cause(now, row, action, fresh_only=True)

    def _find_cause(self, now: int, row: dict, action: str, fresh_only: bool = False) -> None:
        """The newest call on the target that can cause the action, not after
        the event (give or take CAUSE_SLACK_NS)."""
        target = row["target_path"]
        calls, field = CAUSES[action]
        for entry in reversed(self._recent.get(target, ())):
            ntime, syscall, eid, pid, exe, file_path, dest_path, context = entry
            if ntime > now + CAUSE_SLACK_NS:
                continue
            if ntime < now - CAUSE_KEEP_NS or (fresh_only and ntime < now - CAUSE_FRESH_NS):
                return
            if (syscall in calls and (file_path if field == "file_path" else dest_path) == target) \
                    or (action == "CREATED" and syscall in LINK_CREATES and dest_path == target):
                row["bpf_eid"], row["pid"], row["path"] = eid, pid, exe
                row.update(zip(CONTEXT_FIELDS, context))
                return

    # --- handing rows over -----------------------------------------------------------------
    async def _tick(self) -> None:
        while True:
            if not (self._dirty or self._pending or self._recent):
                self._work.clear()
                await self._work.wait()
            await asyncio.sleep(TICK_S)
            try:
                now = time.monotonic_ns()
                for path, first in list(self._dirty.items()):
                    if now - first > UPDATE_QUIET_NS:
                        del self._dirty[path]
                        self._record(path, "UPDATED", 0, now)
                self._forget(now)
                await self._release()
            except Exception:           # one bad row must not end file_events
                log.exception("file_events: failed to hand rows over")

    def _forget(self, now: int) -> None:
        horizon = now - CAUSE_KEEP_NS
        for path in list(self._recent):
            entries = self._recent[path]
            while entries and entries[0][0] < horizon:
                entries.popleft()
            if not entries:
                del self._recent[path]

    def _hash_now(self, path: str) -> asyncio.Future:
        """Hashing starts at the event, while the content is still the one
        the event is about; the row waits for it when it is handed over."""
        counted = bool(self.rules.accesses)     # only then do our opens come back as events
        if counted:
            self._own_opens[path] += 1
        future = asyncio.get_running_loop().run_in_executor(self._pool, hash_file, path, self.read_max)

        def finished(done):
            if counted and not done.cancelled() and done.result()[3] < 0 and self._own_opens.get(path):
                self._own_opens[path] -= 1      # it never opened the file
        future.add_done_callback(finished)
        return future

    async def _release(self, final: bool = False) -> None:
        """Rows whose cause is known, or that waited long enough, with their hashes."""
        now = time.monotonic_ns()
        ready = []
        while self._pending:
            read_at, row, action, hashing = self._pending[0]
            if self.causes and row["bpf_eid"] is None:
                if not final and now - read_at < CAUSE_WAIT_NS:
                    break
                self._find_cause(read_at, row, action)
            self._pending.popleft()
            ready.append((row, hashing))
        if not ready:
            return
        for row, hashing in ready:
            if hashing is not None:
                md5, sha1, sha256, hashed = await hashing
                row.update(md5=md5, sha1=sha1, sha256=sha256, hashed=hashed)
                self.hash_failures += hashed < 0
        self._deliver((TABLE, [row for row, _ in ready]))


def inotify_limit() -> int | None:
    """fs.inotify.max_user_watches, for status and docs."""
    try:
        with open("/proc/sys/fs/inotify/max_user_watches") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


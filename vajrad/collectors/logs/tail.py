"""Following log files through rotation, truncation and restarts.

A file is known by its identity: the device and inode, checked against a
fingerprint (SHA-256) of its first bytes with the size at which it was taken
(up to FINGERPRINT_BYTES; a shorter file's fingerprint grows with it). The
inode alone is never trusted: a freed inode is given to the next new file.

For each file the tailer keeps the offset of the first byte it has not
turned into a row. Every batch of rows carries the file's new position as a
state change that the store commits in the same transaction as the rows, so
the committed position and the committed rows always agree: a restart, or
a SIGKILL between reading and committing, resumes exactly after the last
committed row.

Rotation: by rename (the file is followed under its new name through its
open descriptor and read to its end, then let go once idle for
rotate_wait), by copytruncate (the copy is recognised by the fingerprint and
read from where the original was, so nothing written before the truncation
is lost), and generations rotated while vajrad was stopped (a rotated
sibling with no saved state, modified after the path was last seen, is read
from its start). This module does no I/O scheduling: Tailer.scan() and
Tailer.read() are called from one thread (the collector's).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable

from vajrad.collectors.logs.settings import COMPRESSED_SUFFIXES, FileCategory
from vajrad.enrich.containers import CONTAINER_FIELDS

# What writer_of gives (a dict, made once per read, not per line): the
# writer and its container context.
WRITER_COLUMNS = ("writer_pid", "writer_path", "writer_ancestry", *CONTAINER_FIELDS,
                  "pid_namespace", "mnt_namespace", "net_namespace")
NO_WRITER = dict.fromkeys(WRITER_COLUMNS)

log = logging.getLogger(__name__)

UNIT = "logs"
FINGERPRINT_BYTES = 1024
CHUNK_BYTES = 1 << 20          # read at most this much of one file per batch
BATCH_LINES = 5000             # and make at most this many rows of it
ROTATED_SEPARATORS = (".", "-", "_")
TRUNCATED = -2                 # _read_once: f was truncated; read again in order


def fingerprint(fd: int, size: int) -> tuple[str, int]:
    """(SHA-256 of the first min(size, FINGERPRINT_BYTES) bytes, that size)."""
    n = min(size, FINGERPRINT_BYTES)
    data = os.pread(fd, n, 0) if n else b""
    return hashlib.sha256(data).hexdigest(), len(data)


def fingerprint_matches(fd: int, fp: str, fp_size: int) -> bool:
    data = os.pread(fd, fp_size, 0) if fp_size else b""
    return len(data) == fp_size and hashlib.sha256(data).hexdigest() == fp


@dataclass
class TrackedFile:
    """One file being read (or kept known so that it is never read twice)."""
    dev: int
    ino: int
    path: str
    category: str
    fp: str
    fp_size: int
    offset: int = 0          # first byte not yet turned into a row
    size: int = 0
    mid_line: bool = False   # the last row ended without a newline (flushed partial or cut)
    skipping: bool = False   # dropping the rest of an over-long line, up to its newline
    seen: float = 0.0        # when the file was last found at a watched path
    fd: int | None = None
    rotated: bool = False    # no longer at a watched path: read to its end, then let go
    done: bool = False       # let go: read to its end, descriptor closed, kept known
    idle_since: float | None = None
    copy_of: str | None = None      # a probable copytruncate copy, waiting on its original
    copy_since: float = 0.0
    gone: bool = False       # not found at the last scan (deleted, or moved out of sight)
    complete: bool = False   # a copytruncate copy: nobody writes to it, its last line is whole as is
    lines: int = 0
    bytes: int = 0
    dropped: int = 0         # bytes cut off over-long lines
    errors: int = 0          # lines with invalid bytes for the encoding (replaced)
    last_read: int = 0
    mtime: float = 0.0

    @property
    def key(self) -> str:
        return f"file:{self.dev}:{self.ino}"

    def saved(self) -> dict:
        return {"path": self.path, "category": self.category, "dev": self.dev, "ino": self.ino,
                "fp": self.fp, "fp_size": self.fp_size, "offset": self.offset, "size": self.size,
                "mid_line": self.mid_line, "skipping": self.skipping, "seen": self.seen,
                "done": self.done}

    @classmethod
    def from_saved(cls, value: dict) -> "TrackedFile":
        return cls(dev=value["dev"], ino=value["ino"], path=value["path"], category=value["category"],
                   fp=value["fp"], fp_size=value["fp_size"], offset=value["offset"], size=value["size"],
                   mid_line=value.get("mid_line", False), skipping=value.get("skipping", False),
                   seen=value.get("seen", 0.0), done=value.get("done", False))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# (rows, state changes): one batch for the store.
Output = Callable[[list[dict], list[tuple[str, str, object]]], None]


@dataclass
class Counters:
    scans: int = 0
    rotations: int = 0
    truncations: int = 0
    copies: int = 0
    lines: int = 0
    partial: int = 0
    cut: int = 0
    invalid: int = 0
    matched: int = 0
    filtered: int = 0
    errors: int = 0


class Tailer:
    def __init__(self, categories: tuple[FileCategory, ...], saved: dict[str, dict], output: Output,
                 make_row: Callable[..., dict], writer_of: Callable[["TrackedFile"], dict] | None = None):
        self.categories = {c.name: c for c in categories}
        self.output = output
        if hasattr(make_row, "base"):
            self.make_row, self.row_base = make_row, make_row.base
        else:                                # a dict builder (Table.row): the base is a dict
            self.make_row = lambda _base=None, **v: make_row(**(_base or {}), **v)
            self.row_base = lambda **v: v
        self.writer_of = writer_of or (lambda f: NO_WRITER)
        self.files: dict[str, TrackedFile] = {}
        self.counters = Counters()
        self.first_scan = True
        # When each watched path was last seen, from what an earlier run saved:
        # a rotated sibling changed since then is a generation we missed.
        self.path_seen: dict[str, float] = {}
        for key, value in saved.items():
            if key.startswith("file:"):
                tracked = TrackedFile.from_saved(value)
                self.files[key] = tracked
                if not tracked.done:
                    self.path_seen[tracked.path] = max(self.path_seen.get(tracked.path, 0), tracked.seen)
        self.known_paths: set[str] = {f.path for f in self.files.values()}
        self._error_logged: set[str] = set()
        # Old rotated siblings already judged not to be read: key -> (size, mtime, files known).
        self._ignored: dict[str, tuple] = {}

    # --- configuration ----------------------------------------------------
    def reconfigure(self, categories: tuple[FileCategory, ...]) -> None:
        """New categories apply from the next scan; what was read stays read."""
        self.categories = {c.name: c for c in categories}

    def directories(self) -> set[str]:
        return {os.path.dirname(p) for c in self.categories.values() for p in c.paths}

    # --- discovery --------------------------------------------------------
    def _matching(self) -> dict[str, tuple[str, os.stat_result]]:
        """Regular files at watched paths: {path: (category, stat)}. Symlinks
        are followed (the identity is the target's)."""
        found: dict[str, tuple[str, os.stat_result]] = {}
        listings: dict[str, list[str]] = {}
        for cat in self.categories.values():
            for glob in cat.paths:
                directory, pattern = os.path.split(glob)
                if directory not in listings:
                    try:
                        listings[directory] = sorted(os.listdir(directory))
                    except OSError:
                        listings[directory] = []
                for name in listings[directory]:
                    path = os.path.join(directory, name)
                    if path in found or not fnmatch.fnmatchcase(name, pattern) \
                            or name.endswith(COMPRESSED_SUFFIXES) \
                            or any(fnmatch.fnmatchcase(path, ex) for ex in cat.exclude):
                        continue
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        found[path] = (cat.name, st)
        self._listings = listings
        return found

    def _category_of(self, path: str) -> str | None:
        directory, name = os.path.split(path)
        for cat in self.categories.values():
            for glob in cat.paths:
                gdir, pattern = os.path.split(glob)
                if gdir == directory and fnmatch.fnmatchcase(name, pattern):
                    return cat.name
        return None

    def _siblings(self, watched: dict[str, tuple[str, os.stat_result]]) -> dict[str, tuple[str, os.stat_result]]:
        """Rotated names of watched paths (app.log.1, app.log-20250101), not
        compressed, that are not watched themselves."""
        bases = {path: cat for path, (cat, _) in watched.items()}
        for path in self.path_seen:         # watched before, even if nothing is there now
            cat = self._category_of(path)
            if cat is not None:
                bases.setdefault(path, cat)
        found: dict[str, tuple[str, os.stat_result]] = {}
        for base, cat in bases.items():
            directory, name = os.path.split(base)
            for other in self._listings.get(directory, ()):
                if len(other) <= len(name) or not other.startswith(name) \
                        or other[len(name)] not in ROTATED_SEPARATORS or other.endswith(COMPRESSED_SUFFIXES):
                    continue
                path = os.path.join(directory, other)
                if path in watched or path in found:
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found[path] = (cat, st)
        return found

    def scan(self, now: float | None = None, created: set[str] = frozenset()) -> None:
        """Finds new, rotated, truncated, replaced and vanished files.
        created: paths inotify saw created since the last scan (read from
        their start whatever start_at says: all their content is new)."""
        now = time.time() if now is None else now
        self.counters.scans += 1
        watched = self._matching()
        siblings = self._siblings(watched)
        present: set[str] = set()
        base_seen = dict(self.path_seen)
        # Oldest first: a generation rotated away is read before its successor.
        everything = sorted([(st.st_mtime, path, cat, st, True) for path, (cat, st) in watched.items()]
                            + [(st.st_mtime, path, cat, st, False) for path, (cat, st) in siblings.items()])
        # Files already known first (a truncation found here finds its copy
        # before the copy could pass for a new file), then new ones.
        new = []
        for mtime, path, cat, st, at_watched in everything:
            key = f"file:{st.st_dev}:{st.st_ino}"
            tracked = self.files.get(key)
            if tracked is not None and tracked.fd is None and not tracked.done:
                tracked = self._reopen(tracked, path, st)
            if tracked is None:
                new.append((mtime, path, cat, st, at_watched))
                continue
            present.add(key)
            tracked.mtime, tracked.gone = mtime, False
            if tracked.path != path and not tracked.rotated and not at_watched:
                self.counters.rotations += 1
            tracked.path = path
            tracked.rotated = not at_watched
            if at_watched:
                tracked.seen = now
                self.path_seen[path] = now
                self.known_paths.add(path)
                if tracked.done:            # back at a watched path (a rotation undone)
                    tracked.done = False
                    self._reopen(tracked, path, st)
        for mtime, path, cat, st, at_watched in new:
            key = f"file:{st.st_dev}:{st.st_ino}"
            if key in self.files:           # a copy _truncated() took on
                present.add(key)
                continue
            if not at_watched:
                seen = base_seen.get(os.path.join(os.path.dirname(path), self._base_name(path)), 0)
                if not (seen and mtime > seen):
                    # Rotated before we knew the path (read then), unless it is a
                    # copytruncate copy; judged once while it does not change.
                    looks = (st.st_size, st.st_mtime_ns, len(self.files))
                    if self._ignored.get(key) == looks or self._copy_original(path, st) is None:
                        self._ignored[key] = looks
                        continue
            created_here = self._track_new(path, cat, st, now, at_watched, path in created)
            if created_here is not None:
                present.add(created_here.key)
        if len(self._ignored) > 4 * len(everything) + 64:
            self._ignored.clear()
        for key, tracked in list(self.files.items()):
            if key in present:
                continue
            if tracked.fd is not None:
                tracked.rotated = tracked.gone = True     # moved out of sight or deleted: read to its end
                continue
            del self.files[key]
            self._save_only(key, None)
        self.first_scan = False

    def _base_name(self, path: str) -> str:
        """The watched name a rotated name derives from (app.log for app.log.1)."""
        directory, name = os.path.split(path)
        bases = [os.path.basename(p) for p in self.path_seen if os.path.dirname(p) == directory]
        for base in sorted(bases, key=len, reverse=True):
            if name.startswith(base) and len(name) > len(base) and name[len(base)] in ROTATED_SEPARATORS:
                return base
        return name

    def _reopen(self, tracked: TrackedFile, path: str, st: os.stat_result) -> TrackedFile | None:
        """A file saved by an earlier run (or let go): the same one if its
        first bytes still match, else the inode was reused."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            self._file_error(path, e)
            return tracked
        if os.fstat(fd).st_ino != tracked.ino:      # replaced between stat and open: next scan
            os.close(fd)
            return tracked
        if fingerprint_matches(fd, tracked.fp, tracked.fp_size) and st.st_size >= tracked.offset:
            tracked.fd = fd
            tracked.done = tracked.done and st.st_size == tracked.offset
            if tracked.done:
                tracked.close()
            return tracked
        os.close(fd)
        if tracked.done:
            # Let go, so its inode could be freed and given to this new file.
            del self.files[tracked.key]
            return None
        # Same inode, other content: truncated and rewritten while we were
        # away, or a new file on a reused inode. Reported as a truncation
        # (we cannot tell them apart); a copytruncate copy continues it.
        self._truncated(tracked, st.st_size)
        del self.files[tracked.key]
        return None

    def _copy_original(self, path: str, st: os.stat_result) -> TrackedFile | None:
        """The tracked file in the same directory that this new file is a
        copy of (its first bytes), as copytruncate makes."""
        directory = os.path.dirname(path)
        candidates = [f for f in self.files.values()
                      if f.fd is not None and f.fp_size and os.path.dirname(f.path) == directory
                      and st.st_size >= f.fp_size and (f.dev, f.ino) != (st.st_dev, st.st_ino)]
        if not candidates:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            for f in candidates:
                if fingerprint_matches(fd, f.fp, f.fp_size):
                    return f
        finally:
            os.close(fd)
        return None

    def _track_new(self, path: str, cat: str, st: os.stat_result, now: float,
                   at_watched: bool, created: bool = False) -> TrackedFile | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            self._file_error(path, e)
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        fp, fp_size = fingerprint(fd, st.st_size)
        tracked = TrackedFile(dev=st.st_dev, ino=st.st_ino, path=path, category=cat, fp=fp, fp_size=fp_size,
                              size=st.st_size, seen=now, fd=fd, rotated=not at_watched, mtime=st.st_mtime)
        # At start a copytruncate copy is found from its truncated original
        # (_reopen); files already there are not copies of each other.
        original = None if self.first_scan else self._copy_original(path, st)
        if original is not None:
            # Held until the original is truncated (then read from where the
            # original was) or rotate_wait passes (then a file of its own).
            tracked.copy_of = original.key
            tracked.copy_since = time.monotonic()
            tracked.offset = min(original.offset, st.st_size)
        else:
            self._place_new(tracked, at_watched, created)
        if at_watched:
            self.path_seen[path] = now
        self.known_paths.add(path)
        self.files[tracked.key] = tracked
        self._save(tracked)
        return tracked

    def _place_new(self, tracked: TrackedFile, at_watched: bool, created: bool = False) -> None:
        """Where a file first read starts: its beginning when it is a new
        generation of a path read before, a generation rotated while we were
        away, created while we watch, or start_at says so; else its end at
        discovery."""
        cat = self.categories[tracked.category]
        from_start = (not at_watched or created or tracked.path in self.known_paths
                      or cat.start_at == "beginning")
        tracked.offset = 0 if from_start else tracked.size

    # --- reading ----------------------------------------------------------
    def pending(self) -> list[TrackedFile]:
        # Rotated files first (what is left in them was written before what
        # the current generation holds), then by age.
        return sorted((f for f in self.files.values() if f.fd is not None),
                      key=lambda f: (not f.rotated, f.mtime, f.path))

    def read(self, budget_bytes: int = 8 * CHUNK_BYTES, now_mono: float | None = None) -> bool:
        """Reads what is new in every open file, oldest first, in batches
        handed to output(). Returns whether anything is left to read now."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        more = False
        for f in self.pending():
            if f.copy_of is not None:
                self._settle_copy(f, now_mono)
                if f.copy_of is not None:
                    continue
            while budget_bytes > 0:
                used = self._read_once(f, now_mono)
                if used == TRUNCATED:
                    return True     # again in order: a copytruncate copy before its original
                if used < 0:
                    break
                budget_bytes -= used
            else:
                more = True
        return more

    def _settle_copy(self, f: TrackedFile, now_mono: float) -> None:
        original = self.files.get(f.copy_of)
        if original is not None and original.fd is not None:
            try:
                if self._check_truncation(original, os.fstat(original.fd).st_size):
                    return          # f took over from the original (copy_of cleared)
            except OSError:
                pass
        cat = self.categories.get(f.category)
        wait = (cat.rotate_wait_ms if cat else 0) / 1000
        if original is not None and original.fd is not None and now_mono - f.copy_since < wait:
            return                          # not truncated yet: wait
        if original is None or original.fd is None:
            f.copy_of = None                # the original went: continue it here
            return
        # The original was not truncated: a file of its own with the same start.
        f.copy_of = None
        self._place_new(f, not f.rotated, created=True)
        self._save(f)

    def _check_truncation(self, f: TrackedFile, size: int) -> bool:
        """Whether f shrank or its first bytes changed (handled here)."""
        if size < f.offset or (f.fp_size and size >= f.fp_size
                               and not fingerprint_matches(f.fd, f.fp, f.fp_size)):
            self._truncated(f, size)
            f.fp, f.fp_size = fingerprint(f.fd, size)
            f.size = size
            self._save(f)
            return True
        return False

    def _read_once(self, f: TrackedFile, now_mono: float) -> int:
        """One batch of f. Returns the bytes consumed, or -1 when there is
        nothing more to do with f now."""
        try:
            size = os.fstat(f.fd).st_size
            if self._check_truncation(f, size):
                return TRUNCATED
            if f.fp_size < FINGERPRINT_BYTES and size > f.fp_size:
                f.fp, f.fp_size = fingerprint(f.fd, size)      # a short file's fingerprint grows with it
        except OSError as e:
            self._file_error(f.path, e)
            return -1
        if size != f.size:
            f.size, f.idle_since = size, None
        cat = self.categories.get(f.category)
        if cat is None:
            return -1
        if size <= f.offset:
            return self._idle(f, cat, size, now_mono)
        want = min(max(CHUNK_BYTES, cat.max_line_bytes + 2), size - f.offset)
        try:
            data = os.pread(f.fd, want, f.offset)
        except OSError as e:
            self._file_error(f.path, e)
            return -1
        rows, consumed = self._lines(f, cat, data, final=False)
        if consumed == 0:
            return self._idle(f, cat, size, now_mono)
        self._emit(f, rows, consumed)
        return consumed

    def _idle(self, f: TrackedFile, cat: FileCategory, size: int, now_mono: float) -> int:
        """Nothing complete to read: flush a partial line after its timeout
        (or when the file was rotated away), and let go of a rotated file
        that stayed idle for rotate_wait."""
        if f.idle_since is None:
            f.idle_since = now_mono
            if not f.complete:
                return -1
        idle = now_mono - f.idle_since
        held = size - f.offset
        timeout = cat.partial_timeout_ms if cat.multiline_start is None \
            else min(cat.partial_timeout_ms, cat.multiline_timeout_ms)
        if held > 0 and (f.complete or idle >= timeout / 1000
                         or (f.rotated and idle >= cat.rotate_wait_ms / 1000)):
            data = os.pread(f.fd, min(held, CHUNK_BYTES), f.offset)
            rows, consumed = self._lines(f, cat, data, final=True)
            f.size = size
            self._emit(f, rows, consumed)
            return consumed
        if f.rotated and held <= 0 and idle >= cat.rotate_wait_ms / 1000:
            f.close()
            if f.gone:
                # Deleted or moved out of sight: nothing to keep it known for,
                # and its inode may now go to a new file.
                del self.files[f.key]
                self._save_only(f.key, None)
                return -1
            f.done = True
            f.size = size
            self._save(f)
        return -1

    def _lines(self, f: TrackedFile, cat: FileCategory, data: bytes, final: bool) -> tuple[list[dict], int]:
        """Rows for the complete lines of data (all of it when final: the
        rest is a partial line). Returns (rows, bytes consumed)."""
        if cat.multiline_start is not None and not f.skipping and not f.mid_line:
            return self._records(f, cat, data, final)
        rows: list[dict] = []
        pos, end, limit = 0, len(data), cat.max_line_bytes
        t = int(time.time())
        writer = self.row_base(time=t, source="file", category=cat.name, path=f.path, inode=f.ino, action="line",
                               **self.writer_of(f))
        while pos < end and len(rows) < BATCH_LINES:
            nl = data.find(b"\n", pos)
            if f.skipping:                   # the rest of a line already cut
                stop = end if nl < 0 else nl
                f.dropped += stop - pos
                pos = end if nl < 0 else nl + 1
                f.skipping = nl < 0
                continue
            start = pos
            if nl < 0:
                if end - pos >= limit:       # no newline within max_line_bytes: cut, skip to the newline
                    line, whole, cut = data[pos:pos + limit], True, 1
                    f.dropped += end - pos - limit
                    pos, f.skipping = end, True
                elif final:
                    line, whole, cut = data[pos:end], False, 0
                    pos = end
                else:
                    break
            else:
                line, whole, cut = data[pos:nl], True, 0
                if len(line) > limit:
                    f.dropped += len(line) - limit
                    line, cut = line[:limit], 1
                pos = nl + 1
            row = self._row(f, cat, line, whole, cut, t, writer, f.offset + start)
            if row is not None:
                rows.append(row)
        return rows, pos

    def _records(self, f: TrackedFile, cat: FileCategory, data: bytes, final: bool) -> tuple[list, int]:
        """multiline: a record is a line matching multiline.start and the
        lines after it that do not (a stack trace). A record is held until
        the next one starts, or multiline.timeout_ms passes (final); its
        start is the position saved meanwhile, so a restart reads it whole."""
        rows: list = []
        t = int(time.time())
        writer = self.row_base(time=t, source="file", category=cat.name, path=f.path, inode=f.ino, action="line",
                               **self.writer_of(f))
        pos, start, end = 0, None, None     # the record being gathered: data[start:end]
        pattern, limit = cat.multiline_start, cat.max_line_bytes

        def emit():
            raw = data[start:end].replace(b"\r\n", b"\n")
            cut = int(len(raw) > limit)
            if cut:
                f.dropped += len(raw) - limit
                raw = raw[:limit]
            row = self._row(f, cat, raw, True, cut, t, writer, f.offset + start)
            if row is not None:
                rows.append(row)

        while len(rows) < BATCH_LINES:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            if start is None or pattern.search(data[pos:nl].decode(cat.encoding, errors="replace")):
                if start is not None:
                    emit()
                start = pos
            end = nl
            pos = nl + 1
            if end - start > limit and len(rows) < BATCH_LINES:
                emit()                      # a record this long is cut; what follows is its own
                start = None
        if start is None:
            consumed = pos
        elif final or (start == 0 and len(data) >= CHUNK_BYTES):
            emit()
            consumed = pos
        else:
            consumed = start                # held: the rest of the record may be on its way
        if final and consumed < len(data) and not rows:
            line = data[consumed:]
            row = self._row(f, cat, line, False, 0, t, writer, f.offset + consumed)
            if row is not None:
                rows.append(row)
            consumed = len(data)
        return rows, consumed

    def _row(self, f: TrackedFile, cat: FileCategory, raw: bytes, whole: bool, cut: int, t: int,
             base, offset: int):
        """A log_events row for one line (None when matched_only drops it),
        from `base`, what the lines of the read share (row_base: file, time
        (t), writer and its container).
        partial: the line lacks its end (flushed before its newline) or its
        start (it continues one flushed so)."""
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        partial = f.mid_line or not whole
        f.mid_line = not whole
        try:
            text = raw.decode(cat.encoding)
            replaced = 0
        except UnicodeDecodeError:
            text = raw.decode(cat.encoding, errors="replace")
            replaced = 1
            f.errors += 1
            self.counters.invalid += 1
        f.lines += 1
        self.counters.lines += 1
        self.counters.partial += int(partial)
        self.counters.cut += cut
        rule = severity = fields = None
        for r in cat.rules:
            m = r.pattern.search(text)
            if m:
                rule, severity = r.name, r.severity
                fields = json.dumps(m.groupdict(), separators=(",", ":"), ensure_ascii=False)
                self.counters.matched += 1
                break
        if cat.matched_only and rule is None:
            self.counters.filtered += 1
            return None
        return self.make_row(base, offset=offset, line=text, partial=int(partial), cut=cut, replaced=replaced,
                             rule=rule, severity=severity, fields=fields)

    def _emit(self, f: TrackedFile, rows: list[dict], consumed: int) -> None:
        f.offset += consumed
        f.bytes += consumed
        f.last_read = int(time.time())
        self.output(rows, [(UNIT, f.key, f.saved())])

    def _truncated(self, f: TrackedFile, size: int) -> None:
        """The file shrank under us (copytruncate, or someone emptied it: a
        tamper signal): a `truncated` row, and a copytruncate copy, if there
        is one, continues from where we were."""
        self.counters.truncations += 1
        cat = self.categories.get(f.category)
        copy = next((c for c in self.files.values() if c.copy_of == f.key), None)
        if copy is None:
            copy = self._find_copy(f)
        if copy is not None:
            self.counters.copies += 1
            copy.copy_of = None
            copy.offset = min(f.offset, copy.size)
            copy.mid_line, copy.skipping = f.mid_line, f.skipping
            copy.rotated = copy.complete = True
            self._save(copy)
        row = self.make_row(time=int(time.time()), source="file", category=f.category, path=f.path,
                            inode=f.ino, offset=f.offset, line=None, partial=0, cut=0, replaced=0,
                            action="truncated", rule=None, severity="warning" if cat else None,
                            fields=json.dumps({"size_before": max(f.size, f.offset), "size_after": size,
                                               "continued_in": copy.path if copy else None}),
                            writer_pid=None, writer_path=None)
        f.offset, f.mid_line, f.skipping = 0, False, False
        if copy is not None and copy.size and copy.fd is not None:
            # The copy ends mid-line: the writer's next bytes, now at 0 here, finish that line.
            f.mid_line = os.pread(copy.fd, 1, copy.size - 1) != b"\n"
        self.output([row], [(UNIT, f.key, f.saved())])

    def _find_copy(self, f: TrackedFile) -> TrackedFile | None:
        directory = os.path.dirname(f.path)
        try:
            names = os.listdir(directory)
        except OSError:
            return None
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(COMPRESSED_SUFFIXES):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) == (f.dev, f.ino) \
                    or f"file:{st.st_dev}:{st.st_ino}" in self.files or st.st_size < f.fp_size:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            if not fingerprint_matches(fd, f.fp, f.fp_size):
                os.close(fd)
                continue
            fp, fp_size = fingerprint(fd, st.st_size)
            copy = TrackedFile(dev=st.st_dev, ino=st.st_ino, path=path, category=f.category, fp=fp,
                               fp_size=fp_size, size=st.st_size, seen=time.time(), fd=fd, rotated=True,
                               mtime=st.st_mtime)
            self.files[copy.key] = copy
            return copy
        return None

    def _save(self, f: TrackedFile) -> None:
        self.output([], [(UNIT, f.key, f.saved())])

    def _save_only(self, key: str, value) -> None:
        self.output([], [(UNIT, key, value)])

    def _file_error(self, path: str, error: OSError) -> None:
        self.counters.errors += 1
        if path not in self._error_logged:
            self._error_logged.add(path)
            log.warning("logs: cannot read %s: %s", path, error)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def rows(self) -> list[dict]:
        """The log_files live table."""
        out = []
        for f in sorted(list(self.files.values()), key=lambda f: f.path):     # read from the loop
            state = "copy-pending" if f.copy_of else "done" if f.done else "rotated" if f.rotated \
                else "reading" if f.fd is not None else "known"
            out.append({"path": f.path, "category": f.category, "identity": f"{f.dev}:{f.ino}:{f.fp_size}:{f.fp[:16]}",
                        "inode": f.ino, "offset": f.offset, "size": f.size, "lines": f.lines, "bytes": f.bytes,
                        "state": state, "last_read": f.last_read, "dropped": f.dropped, "errors": f.errors})
        return out

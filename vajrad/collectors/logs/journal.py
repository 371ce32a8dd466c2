"""The journal as a log source (python3-systemd's reader), its cursor saved
like a file offset: committed in the same transaction as the rows it
accounts for, so a restart resumes after the last committed entry.

A saved cursor whose entry is gone (the journal was vacuumed while vajrad
was stopped) is reported with a `cursor_lost` row, and reading resumes from
the oldest entry there is. Where no journal exists (journald not running,
no directory) the category is reported unavailable in status; nothing fails.
"""
from __future__ import annotations

import json
import logging
import os
import time

from vajrad.collectors.logs.settings import JournalCategory
from vajrad.collectors.logs.tail import UNIT

log = logging.getLogger(__name__)

BATCH_ENTRIES = 2000
SYSTEM_JOURNALS = ("/run/log/journal", "/var/log/journal")


def journal_available(directory: str | None) -> bool:
    if directory:
        return os.path.isdir(directory)
    return any(os.path.isdir(d) and os.listdir(d) for d in SYSTEM_JOURNALS)


class _Category:
    def __init__(self, cat: JournalCategory, cursor: str | None, output, make_row):
        from systemd import journal
        self.cat = cat
        self.key = f"journal:{cat.name}"
        self.cursor = cursor
        self.output = output
        self.make_row = make_row
        self.entries = 0
        self.cursor_lost = 0
        self.error: str | None = None
        self.reader = journal.Reader(path=cat.directory) if cat.directory else journal.Reader()
        for unit in cat.units:
            self.reader.add_match(_SYSTEMD_UNIT=unit)
        for field, value in cat.match:
            self.reader.add_match(**{field: value})
        self._position()

    def _position(self) -> None:
        r = self.reader
        if self.cursor is None:
            if self.cat.start_at == "beginning":
                r.seek_head()
            else:
                r.seek_tail()
                r.get_previous()        # the next get_next() is the first new entry
            return
        lost = True
        try:
            r.seek_cursor(self.cursor)
            entry = r.get_next()
            lost = not entry or not r.test_cursor(self.cursor)
        except OSError:
            pass
        if lost:
            # The saved entry was vacuumed: say so, and resume from the oldest entry there is.
            self.cursor_lost += 1
            log.warning("logs: journal category %s: saved cursor is gone (vacuumed); reading from the "
                        "oldest entry", self.cat.name)
            r.seek_head()
            self.output([self.make_row(source="journal", category=self.cat.name, action="cursor_lost",
                                       cursor=self.cursor, severity="warning", partial=0, cut=0, replaced=0,
                                       fields=json.dumps({"saved_cursor": self.cursor}),
                                       time=int(time.time()))], [])

    def read(self) -> bool:
        """One batch of new entries. Returns whether more may be waiting."""
        rows = []
        last = None
        r = self.reader
        r.process()             # takes in new and rotated journal files
        for _ in range(BATCH_ENTRIES):
            entry = r.get_next()
            if not entry:
                break
            last = entry.get("__CURSOR")
            message = entry.get("MESSAGE", "")
            replaced = 0
            if isinstance(message, bytes):
                message = message.decode("utf-8", errors="replace")
                replaced = 1
            elif isinstance(message, list):       # a field repeated in one entry
                message = "\n".join(str(m) for m in message)
            rule = severity = fields = None
            for rl in self.cat.rules:
                m = rl.pattern.search(message)
                if m:
                    rule, severity = rl.name, rl.severity
                    fields = json.dumps(m.groupdict(), separators=(",", ":"), ensure_ascii=False)
                    break
            self.entries += 1
            if self.cat.matched_only and rule is None:
                continue
            ts = entry.get("__REALTIME_TIMESTAMP")
            rows.append(self.make_row(
                time=int(ts.timestamp()) if ts is not None else None, source="journal",
                category=self.cat.name, action="line", line=message, partial=0, cut=0, replaced=replaced,
                rule=rule, severity=severity, fields=fields, unit=entry.get("_SYSTEMD_UNIT"),
                writer_pid=entry.get("_PID"), writer_path=entry.get("_EXE"), cursor=last))
        if last is None:
            return False
        self.cursor = last
        self.output(rows, [(UNIT, self.key, last)])
        return len(rows) >= BATCH_ENTRIES

    def close(self) -> None:
        self.reader.close()


class JournalSource:
    def __init__(self, categories: tuple[JournalCategory, ...], saved: dict, output, make_row):
        self.output = output
        self.make_row = make_row
        self.saved = saved
        self.categories: dict[str, _Category] = {}
        self.unavailable: dict[str, str] = {}
        self.reconfigure(categories)

    def reconfigure(self, categories: tuple[JournalCategory, ...]) -> None:
        wanted = {c.name: c for c in categories}
        for name in list(self.categories):
            if name not in wanted or wanted[name] != self.categories[name].cat:
                self.saved[f"journal:{name}"] = self.categories[name].cursor
                self.categories.pop(name).close()
        self.unavailable = {}
        for name, cat in wanted.items():
            if name in self.categories:
                continue
            if not journal_available(cat.directory):
                self.unavailable[name] = f"no journal at {cat.directory or ' or '.join(SYSTEM_JOURNALS)}"
                log.warning("logs: journal category %s: %s (is journald running?)", name, self.unavailable[name])
                continue
            try:
                self.categories[name] = _Category(cat, self.saved.get(f"journal:{name}"), self.output,
                                                  self.make_row)
            except (ImportError, OSError) as e:
                self.unavailable[name] = str(e)
                log.warning("logs: journal category %s cannot be read: %s", name, e)

    def read(self) -> bool:
        more = False
        for c in self.categories.values():
            more = c.read() or more
        return more

    def close(self) -> None:
        for c in self.categories.values():
            c.close()

    def stats(self) -> dict:
        return {name: {"entries": c.entries, "cursor_lost": c.cursor_lost, "cursor": c.cursor}
                for name, c in self.categories.items()} | {
                name: {"unavailable": why} for name, why in self.unavailable.items()}

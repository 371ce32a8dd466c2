"""The log tailer on real files, without a daemon: identity, positions,
rotation and the hard cases of issue 15, one by one. Restarts are a new
Tailer given the state its predecessor committed (tests/test_logs.py does
the same with real vajrad processes, logrotate and SIGKILL)."""
import gzip
import json
import os
import time

import pytest

from vajrad.collectors.logs import settings
from vajrad.collectors.logs.tail import FINGERPRINT_BYTES, Tailer
from vajrad.tables import TABLES


class Sink:
    """Plays the store: batches in order, state applied as committed."""

    def __init__(self):
        self.batches = []

    def __call__(self, rows, changes):
        self.batches.append((rows, json.loads(json.dumps(changes))))

    def committed(self, upto=None):
        """(rows, state) as the store would hold them after the first `upto` batches."""
        rows, state = [], {}
        for batch_rows, changes in self.batches[:upto]:
            rows += batch_rows
            for _, key, value in changes:
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
        return rows, state

    @property
    def rows(self):
        return self.committed()[0]

    def lines(self):
        return [r["line"] for r in self.rows if r["action"] == "line"]


def config(directory, pattern="*.log", **fields):
    fields.setdefault("start_at", "beginning")
    return settings.parse({"log_files": {"c": {"paths": [f"{directory}/{pattern}"], **fields}}}, "test").files


def tailer(cfg, sink, saved=None):
    return Tailer(cfg, saved or {}, sink, TABLES["log_events"].row)


def step(t, created=frozenset(), now=None):
    t.scan(created=set(created))
    while t.read(now_mono=now):
        pass


def write(path, data, mode="ab"):
    with open(path, mode) as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def restart(sink, cfg, upto=None):
    """A new tailer from what the store committed (all, or the first `upto` batches)."""
    rows, state = sink.committed(upto)
    new = Sink()
    new.batches.append((rows, [("logs", k, v) for k, v in state.items()]))
    return tailer(cfg, new, state), new


def test_lines_rules_fields_and_positions(tmp_path):
    cfg = config(tmp_path, rules=[{"name": "fail", "regex": r"Failed password for (?P<user>\w+)",
                                  "severity": "warning"}])
    log = tmp_path / "auth.log"
    write(log, "one\nFailed password for root\nthree\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    rows = sink.rows
    assert [r["line"] for r in rows] == ["one", "Failed password for root", "three"]
    assert [r["offset"] for r in rows] == [0, 4, 29]
    assert (rows[1]["rule"], rows[1]["severity"], json.loads(rows[1]["fields"])) == \
        ("fail", "warning", {"user": "root"})
    assert rows[0]["rule"] is None and rows[0]["partial"] == 0
    _, state = sink.committed()
    (saved,) = state.values()
    assert saved["offset"] == os.path.getsize(log) and saved["ino"] == os.stat(log).st_ino


def test_matched_only_keeps_matched_lines_and_advances(tmp_path):
    cfg = config(tmp_path, matched_only=True, rules=[{"name": "e", "regex": "ERR", "severity": "error"}])
    write(tmp_path / "a.log", "ok\nERR 1\nok\nERR 2\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    assert sink.lines() == ["ERR 1", "ERR 2"]
    assert t.counters.filtered == 2
    assert next(iter(sink.committed()[1].values()))["offset"] == 18


def test_crlf_invalid_utf8_and_over_long_lines(tmp_path):
    cfg = config(tmp_path, max_line_bytes=64)
    write(tmp_path / "a.log", b"dos line\r\nbad \xff\xfe bytes\n" + b"x" * 100 + b"\nafter\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    rows = sink.rows
    assert [r["line"] for r in rows] == ["dos line", "bad \ufffd\ufffd bytes", "x" * 64, "after"]
    assert [r["replaced"] for r in rows] == [0, 1, 0, 0]
    assert [r["cut"] for r in rows] == [0, 0, 1, 0]
    assert t.counters.invalid == 1 and t.counters.cut == 1
    assert t.files[next(iter(t.files))].dropped == 36


def test_an_over_long_line_without_newline_is_cut_and_its_rest_dropped(tmp_path):
    cfg = config(tmp_path, max_line_bytes=64)
    log = tmp_path / "a.log"
    write(log, b"y" * 200)
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(log, b"y" * 50 + b"\nnext\n")
    step(t)
    assert sink.lines() == ["y" * 64, "next"]
    assert [r["partial"] for r in sink.rows] == [0, 0]


def test_partial_line_is_held_until_its_newline_or_flushed_after_the_timeout(tmp_path):
    cfg = config(tmp_path, partial_timeout_ms=1000)
    log = tmp_path / "a.log"
    write(log, "whole\nhalf")
    sink = Sink()
    t = tailer(cfg, sink)
    now = time.monotonic()
    step(t, now=now)
    step(t, now=now + 0.5)
    assert sink.lines() == ["whole"]                 # held, not yet timed out
    write(log, " done\nnext")
    step(t, now=now + 0.6)
    step(t, now=now + 0.7)
    assert sink.lines() == ["whole", "half done"]
    step(t, now=now + 1.8)                           # "next" waited past the timeout
    assert sink.lines() == ["whole", "half done", "next"]
    assert sink.rows[-1]["partial"] == 1
    write(log, " tail\n")
    step(t, now=now + 1.9)
    assert sink.lines()[-1] == " tail" and sink.rows[-1]["partial"] == 1     # the rest of a flushed line


def test_start_at_end_skips_existing_content_but_not_new_files(tmp_path):
    cfg = config(tmp_path, start_at="end")
    write(tmp_path / "old.log", "before\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(tmp_path / "old.log", "after\n")
    write(tmp_path / "new.log", "created while watched\n")
    step(t, created={str(tmp_path / "new.log")})
    write(tmp_path / "found.log", "existed before discovery\n")
    step(t)                                            # found by a rescan, not seen created
    write(tmp_path / "found.log", "later\n")
    step(t)
    assert sorted(sink.lines()) == ["after", "created while watched", "later"]


def test_compressed_rotated_files_are_ignored(tmp_path):
    cfg = config(tmp_path, pattern="app.log*")
    with gzip.open(tmp_path / "app.log.2.gz", "wb") as f:
        f.write(b"old compressed\n")
    (tmp_path / "app.log.3.xz").write_bytes(b"\xfd7zXZ\x00junk\n")
    (tmp_path / "app.log.4.zst").write_bytes(b"\x28\xb5\x2f\xfdjunk\n")
    write(tmp_path / "app.log", "live\n")
    sink = Sink()
    step(tailer(cfg, sink))
    assert sink.lines() == ["live"]


def test_restart_resumes_exactly_after_the_committed_rows(tmp_path):
    cfg = config(tmp_path)
    log = tmp_path / "a.log"
    write(log, "".join(f"line {i}\n" for i in range(10)))
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(log, "".join(f"line {i}\n" for i in range(10, 20)))
    step(t)
    t.close()
    assert len(sink.batches) >= 2
    for upto in range(len(sink.batches) + 1):       # a crash after any batch's commit
        t2, sink2 = restart(sink, cfg, upto)
        step(t2)
        t2.close()
        assert sink2.lines() == [f"line {i}" for i in range(20)], upto


def test_rename_rotation_reads_the_old_file_to_its_end(tmp_path):
    cfg = config(tmp_path, pattern="app.log", rotate_wait_ms=0)
    log = tmp_path / "app.log"
    writer = open(log, "a", buffering=1)
    writer.write("a1\na2\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    os.rename(log, tmp_path / "app.log.1")           # the writer still has the old file open
    writer.write("a3 after the rename\n")
    write(log, "b1\n")                               # the new generation
    step(t, created={str(log)})
    writer.write("a4 late\n")
    writer.close()
    now = time.monotonic()
    step(t, now=now)
    step(t, now=now + 1)
    assert sink.lines() == ["a1", "a2", "a3 after the rename", "b1", "a4 late"]
    assert {r["path"] for r in sink.rows if r["line"].startswith("a3")} == {str(tmp_path / "app.log.1")}
    assert t.counters.rotations == 1


def test_copytruncate_mid_line_loses_nothing(tmp_path):
    cfg = config(tmp_path, pattern="app.log", rotate_wait_ms=0)
    log = tmp_path / "app.log"
    write(log, "".join(f"line {i} {'z' * 60}\n" for i in range(30)))     # longer than the fingerprint
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(log, "unread 1\nunread 2\nhalf a li")
    # copytruncate: copy, then truncate in place; the writer goes on at 0.
    (tmp_path / "app.log.1").write_bytes(log.read_bytes())
    os.truncate(log, 0)
    write(log, "ne\nnew 1\n")
    now = time.monotonic()
    step(t, now=now)
    step(t, now=now + 2)
    lines = sink.lines()
    assert lines[:30] == [f"line {i} {'z' * 60}" for i in range(30)]
    assert lines[30:] == ["unread 1", "unread 2", "half a li", "ne", "new 1"]
    truncated = [r for r in sink.rows if r["action"] == "truncated"]
    assert len(truncated) == 1 and json.loads(truncated[0]["fields"])["continued_in"] == str(tmp_path / "app.log.1")
    assert [r["partial"] for r in sink.rows if r["line"] in ("half a li", "ne")] == [1, 1]


def test_truncation_reads_from_zero_and_reports_it(tmp_path):
    cfg = config(tmp_path)
    log = tmp_path / "a.log"
    write(log, "first\nsecond\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    os.truncate(log, 0)
    write(log, "again\n")
    step(t)
    assert sink.lines() == ["first", "second", "again"]
    (truncated,) = [r for r in sink.rows if r["action"] == "truncated"]
    assert truncated["offset"] == 13 and truncated["severity"] == "warning"


def test_truncated_and_rewritten_longer_is_still_a_truncation(tmp_path):
    cfg = config(tmp_path)
    log = tmp_path / "a.log"
    write(log, "short\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(log, "different and longer content\n", mode="wb")     # O_TRUNC then write, between reads
    step(t)
    assert sink.lines() == ["short", "different and longer content"]
    assert [r["action"] for r in sink.rows].count("truncated") == 1


def test_delete_and_recreate(tmp_path):
    cfg = config(tmp_path, start_at="end")
    log = tmp_path / "a.log"
    write(log, "old\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(log, "one\n")
    step(t)
    os.unlink(log)
    write(log, "two\n")                  # same path, new file: read from its start
    step(t)
    step(t)
    assert sink.lines() == ["one", "two"]


def test_inode_reuse_is_a_new_file(tmp_path):
    """A saved inode given to another file while we were stopped: its
    fingerprint differs, so it is read from 0, not from the old offset."""
    cfg = config(tmp_path)
    log = tmp_path / "a.log"
    write(log, "x" * 100 + "\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    t.close()
    ino = os.stat(log).st_ino
    os.unlink(log)
    reused = None
    for i in range(200):                 # ext4 hands a freed inode to the next file in the directory
        p = tmp_path / f"try{i}"
        p.write_text("")
        if os.stat(p).st_ino == ino:
            reused = p
            break
        os.unlink(p)
    if reused is None:
        pytest.skip("the file system did not reuse the inode")
    write(reused, "new content\n")
    os.rename(reused, log)
    for p in tmp_path.glob("try*"):
        p.unlink()
    t2, sink2 = restart(sink, cfg)
    step(t2)
    assert sink2.lines() == ["x" * 100, "new content"]


def test_two_files_with_the_same_first_kib_are_two_files(tmp_path):
    cfg = config(tmp_path, rotate_wait_ms=0)
    head = "h" * (FINGERPRINT_BYTES + 10) + "\n"
    write(tmp_path / "kern.log", head + "kern\n")
    write(tmp_path / "ufw.log", head + "ufw\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(tmp_path / "late.log", head + "late\n")    # appears while running
    now = time.monotonic()
    step(t, created={str(tmp_path / "late.log")}, now=now)
    step(t, now=now + 1)
    assert sorted(sink.lines()) == sorted([head[:-1]] * 3 + ["kern", "ufw", "late"])
    t2, sink2 = restart(sink, cfg)
    step(t2)
    assert len(sink2.lines()) == 6          # none read twice after a restart


def test_files_shorter_than_the_fingerprint(tmp_path):
    cfg = config(tmp_path)
    log = tmp_path / "a.log"
    write(log, "a\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(log, "b\n")
    step(t)
    t.close()
    t2, sink2 = restart(sink, cfg)
    write(log, "c\n")
    step(t2)
    assert sink2.lines() == ["a", "b", "c"]
    (f,) = t2.files.values()
    assert f.fp_size == 6


def test_stopped_across_two_rotations(tmp_path):
    cfg = config(tmp_path, pattern="app.log", rotate_wait_ms=0)
    log = tmp_path / "app.log"
    write(log, "g1 a\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    t.close()
    time.sleep(0.01)
    write(log, "g1 b unread\n")
    os.rename(log, tmp_path / "app.log.1")
    write(log, "g2 a\ng2 b\n")
    os.rename(tmp_path / "app.log.1", tmp_path / "app.log.2")
    os.rename(log, tmp_path / "app.log.1")
    write(log, "g3 a\n")
    t2, sink2 = restart(sink, cfg)
    now = time.monotonic()
    step(t2, now=now)
    step(t2, now=now + 1)
    assert sink2.lines() == ["g1 a", "g1 b unread", "g2 a", "g2 b", "g3 a"]
    t2.close()
    t3, sink3 = restart(sink2, cfg)           # and none of it again
    step(t3)
    assert len(sink3.lines()) == 5


def test_symlinked_path_and_a_swapped_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    cfg = config(logs, pattern="current.log", rotate_wait_ms=0)
    write(real / "one.log", "one a\n")
    os.symlink(real / "one.log", logs / "current.log")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(real / "one.log", "one b\n")
    step(t)
    write(real / "two.log", "two a\n")
    os.symlink(real / "two.log", logs / "tmp")
    os.rename(logs / "tmp", logs / "current.log")       # swapped atomically
    now = time.monotonic()
    step(t, now=now)
    step(t, now=now + 1)
    assert sink.lines() == ["one a", "one b", "two a"]


def test_copytruncate_found_by_the_reader_reads_the_copy_first(tmp_path):
    """The truncation is seen while reading, before any scan saw the copy:
    the copy's rest still comes before the new generation's lines."""
    cfg = config(tmp_path, pattern="app.log", rotate_wait_ms=0)
    log = tmp_path / "app.log"
    write(log, "".join(f"line {i} {'z' * 60}\n" for i in range(20)))
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    write(log, "unread\nhalf")
    (tmp_path / "app.log.1").write_bytes(log.read_bytes())
    os.truncate(log, 0)
    write(log, " rest\nnew\n")
    while t.read():             # no scan
        pass
    assert sink.lines()[20:] == ["unread", "half", " rest", "new"]


def test_multiline_records_are_held_until_the_next_start_or_the_timeout(tmp_path):
    cfg = config(tmp_path, multiline={"start": r"^\d{4}-", "timeout_ms": 500})
    log = tmp_path / "a.log"
    write(log, "2025-01-01 boom\nTraceback:\n  at x\n2025-01-01 next\n  more\n")
    sink = Sink()
    t = tailer(cfg, sink)
    now = time.monotonic()
    step(t, now=now)
    assert sink.lines() == ["2025-01-01 boom\nTraceback:\n  at x"]      # the next is held
    (saved,) = sink.committed()[1].values()
    assert saved["offset"] == len("2025-01-01 boom\nTraceback:\n  at x\n")
    t.close()
    t2, sink2 = restart(sink, cfg)                                      # held: read again whole
    step(t2, now=now)
    step(t2, now=now + 1)                                               # timed out
    assert sink2.lines() == ["2025-01-01 boom\nTraceback:\n  at x", "2025-01-01 next\n  more"]
    assert [r["offset"] for r in sink2.rows] == [0, 34]


def test_same_first_kib_at_start_with_start_at_end(tmp_path):
    cfg = config(tmp_path, start_at="end", rotate_wait_ms=0)
    head = "h" * (FINGERPRINT_BYTES + 10) + "\n"
    write(tmp_path / "kern.log", head + "old kern\n")
    write(tmp_path / "ufw.log", head + "old ufw\n")
    sink = Sink()
    t = tailer(cfg, sink)
    now = time.monotonic()
    step(t, now=now)
    write(tmp_path / "kern.log", "new kern\n")
    write(tmp_path / "ufw.log", "new ufw\n")
    step(t, now=now + 1)
    assert sorted(sink.lines()) == ["new kern", "new ufw"]


def test_a_deleted_file_let_go_is_forgotten_so_its_reused_inode_is_a_new_file(tmp_path):
    cfg = config(tmp_path, pattern="app.log", rotate_wait_ms=0)
    log = tmp_path / "app.log"
    write(log, "old " + "o" * 40 + "\n")
    sink = Sink()
    t = tailer(cfg, sink)
    now = time.monotonic()
    step(t, now=now)
    ino = os.stat(log).st_ino
    os.unlink(log)
    step(t, now=now + 1)
    step(t, now=now + 2)          # read to its end, let go: its inode is free
    assert not t.files and not sink.committed()[1]
    write(log, "new\n")
    if os.stat(log).st_ino != ino:
        pytest.skip("the file system did not reuse the inode")
    step(t, now=now + 3)
    assert sink.lines() == ["old " + "o" * 40, "new"]
    assert "truncated" not in [r["action"] for r in sink.rows]


def test_a_rotated_file_ending_mid_line_is_flushed_partial_at_rotate_wait(tmp_path):
    cfg = config(tmp_path, pattern="app.log", rotate_wait_ms=500, partial_timeout_ms=60_000)
    log = tmp_path / "app.log"
    write(log, "whole\ncut sho")
    sink = Sink()
    t = tailer(cfg, sink)
    now = time.monotonic()
    step(t, now=now)
    os.rename(log, tmp_path / "app.log.1")
    write(log, "next generation\n")
    step(t, created={str(log)}, now=now + 0.1)
    step(t, now=now + 0.2)
    assert "cut sho" not in sink.lines()
    step(t, now=now + 1)                 # rotate_wait passed, long before partial_timeout
    assert sink.lines() == ["whole", "next generation", "cut sho"] or \
        sink.lines() == ["whole", "cut sho", "next generation"]
    assert [r["partial"] for r in sink.rows if r["line"] == "cut sho"] == [1]


def test_old_rotated_siblings_are_judged_once(tmp_path, monkeypatch):
    cfg = config(tmp_path, pattern="app.log")
    for i in range(1, 4):
        write(tmp_path / f"app.log.{i}", f"old {i}\n")
    write(tmp_path / "app.log", "live\n")
    sink = Sink()
    t = tailer(cfg, sink)
    step(t)
    calls = []
    real = Tailer._copy_original
    monkeypatch.setattr(Tailer, "_copy_original", lambda self, p, st: calls.append(p) or real(self, p, st))
    for _ in range(3):
        step(t)
    assert len(calls) <= 3 and sink.lines() == ["live"]

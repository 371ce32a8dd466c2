"""Log-file benchmark (issue 15): one writer appends `rate` lines/s of
`size` bytes for `duration` s, renaming the file away every `rotate_every`
s (and reopening, as logrotate's `create` with a HUP does), while vajrad
follows it with one regex rule. Reports lines lost and repeated, the delay
until a line is committed (sampled: each poll of the store sees the new
lines' write times), and vajrad's CPU; then the same workload with
rsyslog's imfile (inotify mode) reading the same way, side by side.

Fluent Bit's tail input, the issue's anchor, is not packaged in Debian 12
(`apt-cache policy fluent-bit`: no candidate), so rsyslog's imfile stands in.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exec_bench import Daemon, cpu_seconds, percentile

WRITER = r"""
import os, sys, time
path, rate, size, duration, rotate_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
burst = max(1, rate // 200)
pad = "x" * size
n = 0
t0 = time.monotonic()
next_rotation = t0 + rotate_every
generation = 0
while True:
    now = time.monotonic()
    if now - t0 >= duration:
        break
    if now >= next_rotation:
        generation += 1
        os.rename(path, f"{path}.{generation}")
        os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        next_rotation += rotate_every
    stamp = f"{time.time():.6f}"
    chunk = []
    for i in range(n, n + burst):
        head = f"seq={i:010d} t={stamp} level={'ERROR' if i % 100 == 0 else 'INFO'} "
        chunk.append(head + pad[:size - len(head) - 1] + "\n")
    os.write(fd, "".join(chunk).encode())
    n += burst
    ahead = n / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
print(n)
"""
RULE = {"name": "errors", "regex": r"seq=(?P<seq>\d+) t=\S+ level=(?P<level>ERROR)", "severity": "error"}


def _parse(line: str) -> tuple[int, float]:
    return int(line[4:14]), float(line[17:34])


def _write(work: str, rate: int, size: int, duration: float, rotate_every: float) -> subprocess.Popen:
    script = os.path.join(work, "writer.py")
    Path(script).write_text(WRITER)
    return subprocess.Popen([sys.executable, script, os.path.join(work, "logs", "app.log"), str(rate), str(size),
                             str(duration), str(rotate_every)], stdout=subprocess.PIPE, text=True)


def _summary(name, written, seen_seqs_count, distinct, delays, cpu, wall) -> dict:
    return {"reader": name, "lines_written": written, "lines_stored": seen_seqs_count,
            "lines_lost": written - distinct, "lines_repeated": seen_seqs_count - distinct,
            "visible_p50_ms": percentile(delays, 50), "visible_p99_ms": percentile(delays, 99),
            "visible_max_ms": max(delays) if delays else None, "delay_samples": len(delays),
            "cpu_seconds": round(cpu, 2), "cpu_percent_of_one_core": round(100 * cpu / wall, 1)}


def run_vajrad(args) -> dict:
    work = tempfile.mkdtemp(prefix="vajra-logs-bench-")
    os.chmod(work, 0o700)
    try:
        logdir = os.path.join(work, "logs")
        os.makedirs(logdir)
        Path(logdir, "app.log").touch()
        cfg = os.path.join(work, "vajra.conf")
        Path(cfg).write_text(json.dumps({"options": {}, "log_files": {"bench": {
            "paths": [f"{logdir}/app.log"], "start_at": "beginning", "rules": [RULE]}}}))
        d = Daemon(work, "--enable_bpf_events=false", "--enable_file_events=false", "--events_max=0",
                   "--events_expiry=0", f"--config_path={cfg}").start()
        db = d.database
        cpu0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
        writer = _write(work, args.log_rate, args.log_size, args.log_duration, args.log_rotate_every)
        delays: list[float] = []
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        con.execute("PRAGMA busy_timeout=5000")
        last = 0
        written = None
        settle_until = None
        while True:
            time.sleep(0.1)
            now = time.time()
            top = con.execute("SELECT MAX(eid) FROM log_events").fetchone()[0] or 0
            for (line,) in con.execute("SELECT line FROM log_events WHERE eid > ? AND eid <= ? AND eid % 97 = 0",
                                       (last, top)):
                delays.append((now - _parse(line)[1]) * 1000)
            last = top
            if written is None and writer.poll() is not None:
                written = int(writer.stdout.read())
            if written is not None:
                count = con.execute("SELECT COUNT(*) FROM log_events WHERE action = 'line'").fetchone()[0]
                if count >= written:
                    break
                settle_until = settle_until or time.monotonic() + 30
                if time.monotonic() > settle_until:
                    break
        wall = time.monotonic() - t0
        cpu = cpu_seconds(d.proc.pid) - cpu0
        stored, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT substr(line, 5, 10)) FROM log_events "
                                       "WHERE action = 'line'").fetchone()
        ordered = [int(s) for (s,) in con.execute("SELECT substr(line, 5, 10) FROM log_events "
                                                   "WHERE action = 'line' ORDER BY eid")]
        matched = con.execute("SELECT COUNT(*) FROM log_events WHERE rule = 'errors'").fetchone()[0]
        con.close()
        status = d.call("status")["collectors"]["logs"]
        d.stop()
        out = _summary("vajrad", written, stored, distinct, delays, cpu, wall)
        out.update(in_order=ordered == sorted(ordered), rule_matches=matched,
                   rule_matches_expected=sum(1 for i in range(written) if i % 100 == 0),
                   rotations=status.get("rotations"), backpressure_waits=status.get("backpressure_waits"))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


RSYSLOG_CONF = """
global(workDirectory="{work}/rs")
module(load="imfile" mode="inotify")
template(name="raw" type="string" string="%msg%\\n")
input(type="imfile" File="{logdir}/app.log" Tag="app" freshStartTail="off" reopenOnTruncate="on"
      ruleset="out")
ruleset(name="out") {{
  if re_match($msg, "level=ERROR") then {{ action(type="omfile" file="{work}/matched.log" template="raw") }}
  action(type="omfile" file="{work}/out.log" template="raw" asyncWriting="off" flushOnTXEnd="on")
}}
"""


def run_rsyslog(args) -> dict:
    rsyslogd = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    if not os.path.exists(rsyslogd):
        return {"reader": "rsyslog imfile", "skipped": "rsyslog is not installed (apt-get install rsyslog)"}
    work = tempfile.mkdtemp(prefix="vajra-logs-bench-rs-")
    try:
        logdir = os.path.join(work, "logs")
        os.makedirs(logdir)
        os.makedirs(os.path.join(work, "rs"))
        Path(logdir, "app.log").touch()
        conf = os.path.join(work, "rsyslog.conf")
        Path(conf).write_text(RSYSLOG_CONF.format(work=work, logdir=logdir))
        out = os.path.join(work, "out.log")
        proc = subprocess.Popen([rsyslogd, "-n", "-f", conf, "-i", os.path.join(work, "rsyslogd.pid")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        if proc.poll() is not None:
            return {"reader": "rsyslog imfile", "skipped": proc.stderr.read().decode()[-500:]}
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        writer = _write(work, args.log_rate, args.log_size, args.log_duration, args.log_rotate_every)
        delays: list[float] = []
        seqs: list[int] = []
        pos = 0
        rest = b""
        written = None
        settle_until = None
        while True:
            time.sleep(0.1)
            now = time.time()
            try:
                with open(out, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            pos += len(data)
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            for i, raw in enumerate(data[:cut].split(b"\n")[:-1]):
                line = raw.decode(errors="replace")
                try:
                    seq, t = _parse(line)
                except ValueError:
                    continue
                seqs.append(seq)
                if seq % 97 == 0:
                    delays.append((now - t) * 1000)
            if written is None and writer.poll() is not None:
                written = int(writer.stdout.read())
            if written is not None:
                if len(seqs) >= written:
                    break
                settle_until = settle_until or time.monotonic() + 30
                if time.monotonic() > settle_until:
                    break
        wall = time.monotonic() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        result = _summary("rsyslog imfile (inotify)", written, len(seqs), len(set(seqs)), delays, cpu, wall)
        result["in_order"] = seqs == sorted(seqs)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args) -> dict:
    workload = {"lines_per_s": args.log_rate, "line_bytes": args.log_size, "seconds": args.log_duration,
                "rename_rotation_every_s": args.log_rotate_every, "rules": 1,
                "fluent_bit": "not in Debian 12 (no fluent-bit package); rsyslog's imfile compared instead"}
    return {"workload": workload, "vajrad": run_vajrad(args), "rsyslog_imfile": run_rsyslog(args)}

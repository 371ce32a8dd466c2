"""Health commands and signature databases: what a product says about itself.

A health command runs without a shell, with a timeout, its output capped; a
command that hangs, fails to start, exits non-zero where that means nothing,
or prints something its parser does not recognise gives `unknown` with the
reason, never a stuck collector.
"""
from __future__ import annotations

import asyncio
import calendar
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field

from vajrad.collectors.products.catalogue import Health, Signatures

OUTPUT_MAX = 1 << 20          # bytes of a command's output read at most
HEADER_BYTES = 512            # a ClamAV .cvd/.cld header


@dataclass
class Verdict:
    """What one health check found: ok (protecting), a problem (degraded) or
    unknown (the check itself failed), with facts for the details column."""
    state: str                       # "ok", "degraded" or "unknown"
    reason: str = ""
    facts: dict = field(default_factory=dict)


class Garbage(ValueError):
    """The command's output is not what its parser knows."""


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def parse_output(parser: str, status: int, out: str) -> Verdict:
    if parser == "exit_status":
        return Verdict("ok") if status == 0 else Verdict("degraded", f"exited with {status}: {_short(out)}")
    if status != 0:
        return Verdict("unknown", f"exited with {status}: {_short(out)}")
    if parser == "mdatp":
        # `mdatp health`: "healthy : true", "real_time_protection_enabled : true", ...
        values = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                values[key.strip()] = value.strip().strip('"')
        if "healthy" not in values:
            raise Garbage("no 'healthy' field")
        facts = {k: values[k] for k in ("healthy", "real_time_protection_enabled", "definitions_status",
                                        "definitions_version") if k in values}
        if values["healthy"] != "true":
            return Verdict("degraded", f"mdatp reports healthy={values['healthy']}", facts)
        if values.get("real_time_protection_enabled", "true") != "true":
            return Verdict("degraded", "real-time protection is disabled", facts)
        return Verdict("ok", "", facts)
    if parser == "falconctl_rfm":
        m = re.search(r"rfm-state\s*=\s*(true|false)", out)
        if not m:
            raise Garbage("no rfm-state=true|false")
        if m.group(1) == "true":
            return Verdict("degraded", "sensor in reduced-functionality mode (detects nothing)",
                           {"rfm_state": True})
        return Verdict("ok", "", {"rfm_state": False})
    if parser == "nft_ruleset":
        try:
            doc = json.loads(out)
            items = doc["nftables"]
        except (ValueError, KeyError, TypeError):
            raise Garbage("not nft's JSON ruleset") from None
        if not isinstance(items, list):
            raise Garbage("not nft's JSON ruleset")
        rules = sum(1 for i in items if isinstance(i, dict) and "rule" in i)
        tables = sum(1 for i in items if isinstance(i, dict) and "table" in i)
        facts = {"rules": rules, "tables": tables,
                 "ruleset_sha256": hashlib.sha256(out.encode()).hexdigest()}
        if rules == 0:
            return Verdict("degraded", "the nftables ruleset has no rules", facts)
        return Verdict("ok", "", facts)
    if parser == "iptables_save":
        lines = out.splitlines()
        if lines and not any(line.startswith(("*", "#", ":", "-A", "COMMIT")) for line in lines):
            raise Garbage("not iptables-save output")
        rules = [line for line in lines if line.startswith("-A ")]
        facts = {"rules": len(rules),
                 "ruleset_sha256": hashlib.sha256("\n".join(rules).encode()).hexdigest()}
        if not rules:
            return Verdict("degraded", "no iptables rules are set", facts)
        return Verdict("ok", "", facts)
    if parser == "fail2ban_ping":
        if "pong" in out:
            return Verdict("ok")
        raise Garbage("no pong")
    if parser == "ufw_status":
        m = re.search(r"Status:\s*(active|inactive)", out)
        if not m:
            raise Garbage("no Status: active|inactive")
        if m.group(1) != "active":
            return Verdict("degraded", "ufw is inactive", {"status": m.group(1)})
        return Verdict("ok", "", {"status": "active"})
    raise Garbage(f"no parser {parser}")


async def run(health: Health) -> Verdict:
    """Runs the command and parses its output; never raises, never hangs
    longer than the timeout (the process is killed)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *health.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return Verdict("unknown", f"health command {health.command[0]} cannot run: {e.strerror}")
    try:
        out = await asyncio.wait_for(proc.stdout.read(OUTPUT_MAX), health.timeout)
        status = await asyncio.wait_for(proc.wait(), max(0.1, health.timeout))
    except asyncio.TimeoutError:
        _kill_group(proc)
        await proc.wait()
        return Verdict("unknown", f"health command {health.command[0]} timed out after {health.timeout:g} s")
    finally:
        if proc.returncode is None:
            _kill_group(proc)
            await proc.wait()
    text = out.decode("utf-8", "replace")
    try:
        return parse_output(health.parser, status, text)
    except Garbage as e:
        return Verdict("unknown", f"health command {health.command[0]} printed unexpected output "
                                  f"({e}): {_short(text, 60)!r}")


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, 9)      # its own session: children go too
    except ProcessLookupError:
        pass


# --- signature databases ------------------------------------------------------------------
def clamav_header(path: str) -> dict:
    """The header of a ClamAV .cvd/.cld: 512 bytes,
    `ClamAV-VDB:<build time>:<version>:<signatures>:<functionality level>:<md5>:<dsig>:<builder>:<unix time>`.
    Raises ValueError when the file is not one."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    text = head.decode("ascii", "replace").rstrip("\0 ")
    parts = text.split(":")
    if len(parts) < 9 or parts[0] != "ClamAV-VDB":
        raise ValueError(f"{path} has no ClamAV-VDB header")
    try:
        version = int(parts[2])
    except ValueError:
        raise ValueError(f"{path}: bad version {parts[2]!r}") from None
    built = None
    try:
        built = int(parts[8].split()[0])
    except (ValueError, IndexError):
        pass
    if built is None:          # older headers: only "29 Nov 2026 07-19 +0000"
        try:
            built = calendar.timegm(time.strptime(parts[1].rsplit(" ", 1)[0], "%d %b %Y %H-%M"))
        except ValueError:
            raise ValueError(f"{path}: no build time") from None
    return {"version": version, "time": built, "signatures": int(parts[3]) if parts[3].isdigit() else None}


def signatures(sig: Signatures, now: float | None = None) -> tuple[dict | None, str]:
    """(newest database's version and time, problem) for a product's signature files."""
    now = time.time() if now is None else now
    newest, problems = None, []
    for path in sig.paths:
        if not os.path.exists(path):
            continue
        try:
            header = clamav_header(path)
        except (OSError, ValueError) as e:
            problems.append(str(e))
            continue
        if newest is None or header["time"] > newest["time"]:
            newest = header
    if newest is None:
        return None, "; ".join(problems) or f"no signature database ({', '.join(sig.paths)})"
    age_h = (now - newest["time"]) / 3600
    newest["up_to_date"] = age_h <= sig.max_age_hours
    if not newest["up_to_date"]:
        return newest, f"signatures are {age_h:.0f} h old (limit {sig.max_age_hours:g} h)"
    return newest, ""

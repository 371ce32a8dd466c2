"""The kernel's audit state around a bench that runs auditd: read it, and put
it back. Once auditing has been on, the kernel keeps per-syscall audit
bookkeeping on every new process until a reboot or `-a never,task`, so a bench
that ran auditd leaves auditing off with that rule loaded (and lifts the rule
while its auditd runs, since it would hide new processes from auditd's rules)."""
from __future__ import annotations

import subprocess

NEVER_TASK = "-a never,task"


def auditctl(*args: str, check: bool = True) -> str:
    r = subprocess.run(["auditctl", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"auditctl {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def audit_status() -> dict[str, str]:
    out = {}
    for line in auditctl("-s").splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def audit_rules() -> list[str]:
    return [r for r in auditctl("-l").splitlines() if r.strip() and r.strip() != "No rules"]


def lift_never_task() -> None:
    """For the auditd a bench runs: new processes must reach its rules."""
    if NEVER_TASK in audit_rules():
        auditctl("-d", "never,task")


def restore_audit(before: dict[str, str], key: str) -> None:
    """The bench's rules (those with `key`) gone, auditing off, never,task
    loaded, the backlog limit and (when they were 0) the lost and
    backlog-wait counters as they were. Safe to call twice."""
    auditctl("-D", "-k", key, check=False)
    auditctl("-e", "0", check=False)
    if "backlog_limit" in before:
        auditctl("-b", before["backlog_limit"], check=False)
    if before.get("lost") == "0":
        auditctl("--reset-lost", check=False)
    if before.get("backlog_wait_time_actual") == "0":
        auditctl("--reset_backlog_wait_time_actual", check=False)
    if NEVER_TASK not in audit_rules():
        auditctl(*NEVER_TASK.split())

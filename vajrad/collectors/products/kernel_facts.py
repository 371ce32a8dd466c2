"""Kernel-level facts, as rows of security_products: the active LSMs,
AppArmor, SELinux, kernel lockdown, the audit subsystem and the BPF
programs attached (Vajra's own among them).

Each fact is read from the kernel's own files or a netlink query; where a
source is missing the row says which and is `unknown`, never guessed.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess

SECURITYFS = "/sys/kernel/security"
NETLINK_AUDIT = 9
AUDIT_GET, AUDIT_LIST_RULES = 1000, 1013
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
AUDIT_STATUS_FIELDS = ("mask", "enabled", "failure", "pid", "rate_limit", "backlog_limit", "lost", "backlog")
FAILURE_MODES = {0: "silent", 1: "printk", 2: "panic"}
BPFTOOL_TIMEOUT = 5.0


def fact(name: str, kind: str, state: str, reason: str = "", **details) -> dict:
    """One kernel row: the values the collector turns into a security_products row."""
    return {"name": name, "vendor": "Linux kernel", "type": kind, "state": state, "reason": reason,
            "details": details}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def securityfs_mounted() -> bool:
    return os.path.ismount(SECURITYFS) or os.path.exists(os.path.join(SECURITYFS, "lsm"))


def lsm_fact() -> dict:
    text = _read(os.path.join(SECURITYFS, "lsm"))
    if text is None:
        return fact("kernel-lsm", "lsm", "unknown",
                    f"securityfs is not mounted at {SECURITYFS}: the active LSMs cannot be read")
    lsms = [x for x in text.split(",") if x]
    # the BPF LSM enforces nothing until a program is attached to it; landlock and
    # yama restrict only what processes ask for themselves
    enforcing = [x for x in lsms if x in ("apparmor", "selinux", "smack", "tomoyo")]
    if not enforcing:
        return fact("kernel-lsm", "lsm", "degraded", "no access-control LSM is active (only "
                    + (", ".join(lsms) or "none") + ")", lsms=lsms)
    return fact("kernel-lsm", "lsm", "protecting", "", lsms=lsms)


def active_lsms() -> list[str] | None:
    text = _read(os.path.join(SECURITYFS, "lsm"))
    return None if text is None else [x for x in text.split(",") if x]


def lsm_active(name: str, lsms: list[str] | None) -> bool | None:
    """Whether an LSM is active: from securityfs's list, else from the LSM's
    own files (AppArmor's module parameter, selinuxfs); None when unknowable."""
    if lsms is not None:
        return name in lsms
    if name == "apparmor":
        enabled = _read("/sys/module/apparmor/parameters/enabled")
        return enabled == "Y"
    if name == "selinux":
        return os.path.exists("/sys/fs/selinux/enforce")
    return None


def apparmor_fact() -> dict:
    enabled = _read("/sys/module/apparmor/parameters/enabled")
    if enabled is None:
        return fact("kernel-apparmor", "lsm", "not_installed", "the kernel has no AppArmor (no /sys/module/apparmor)")
    if enabled != "Y":
        return fact("kernel-apparmor", "lsm", "stopped", "AppArmor is disabled in the kernel", enabled=False)
    profiles = _read(os.path.join(SECURITYFS, "apparmor", "profiles"))
    if profiles is None:
        return fact("kernel-apparmor", "lsm", "unknown",
                    f"AppArmor is enabled but {SECURITYFS}/apparmor is not readable (securityfs not mounted?)",
                    enabled=True)
    modes: dict[str, int] = {}
    complain = []
    for line in profiles.splitlines():
        name, _, mode = line.rpartition(" (")
        mode = mode.rstrip(")")
        modes[mode] = modes.get(mode, 0) + 1
        if mode == "complain":
            complain.append(name)
    details = {"enabled": True, "enforce": modes.get("enforce", 0), "complain": modes.get("complain", 0),
               "complain_profiles": sorted(complain)[:50]}
    if not modes.get("enforce"):
        return fact("kernel-apparmor", "lsm", "degraded", "no AppArmor profile is in enforce mode", **details)
    return fact("kernel-apparmor", "lsm", "protecting", "", **details)


def selinux_fact() -> dict:
    enforce = _read("/sys/fs/selinux/enforce")
    if enforce is None:
        return fact("kernel-selinux", "lsm", "not_installed", "SELinux is not active (no /sys/fs/selinux)")
    mode = "enforcing" if enforce == "1" else "permissive"
    if mode != "enforcing":
        return fact("kernel-selinux", "lsm", "degraded", "SELinux is permissive", mode=mode)
    return fact("kernel-selinux", "lsm", "protecting", "", mode=mode)


def lockdown_fact() -> dict:
    text = _read(os.path.join(SECURITYFS, "lockdown"))
    if text is None:
        return fact("kernel-lockdown", "lsm", "unknown",
                    f"no {SECURITYFS}/lockdown (securityfs not mounted, or no lockdown LSM)")
    mode = next((w.strip("[]") for w in text.split() if w.startswith("[")), "unknown")
    if mode == "none":
        return fact("kernel-lockdown", "lsm", "degraded", "kernel lockdown is off", mode=mode)
    return fact("kernel-lockdown", "lsm", "protecting", "", mode=mode)


# --- audit -------------------------------------------------------------------------
def _audit_request(sock: socket.socket, kind: int, seq: int) -> list[tuple[int, bytes]]:
    """Sends one request, returns the replies (type, payload) until the kernel is done."""
    sock.send(struct.pack("=IHHII", 16, kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0))
    replies: list[tuple[int, bytes]] = []
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, mtype, _flags, rseq, _pid = struct.unpack_from("=IHHII", data, offset)
            payload = data[offset + 16: offset + length]
            offset += (length + 3) & ~3
            if length < 16 or rseq != seq:
                if length < 16:
                    return replies
                continue
            if mtype == NLMSG_ERROR:
                err = struct.unpack_from("=i", payload)[0]
                if err != 0:
                    raise OSError(-err, os.strerror(-err))
                if kind == AUDIT_GET and replies:
                    return replies
                continue
            if mtype == NLMSG_DONE:
                return replies
            replies.append((mtype, payload))
            if kind == AUDIT_GET:
                return replies


def audit_status() -> dict:
    """The kernel's audit status and rule count, over netlink (what `auditctl -s` prints)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT) as sock:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        replies = _audit_request(sock, AUDIT_GET, 1)
        if not replies:
            raise OSError(0, "no reply to AUDIT_GET")
        values = dict(zip(AUDIT_STATUS_FIELDS, struct.unpack_from("=8I", replies[0][1])))
        rules = [r for r in _audit_request(sock, AUDIT_LIST_RULES, 2) if r[0] == AUDIT_LIST_RULES]
    values["rules"] = len(rules)
    return values


def audit_fact() -> dict:
    try:
        s = audit_status()
    except OSError as e:
        return fact("kernel-audit", "audit", "unknown", f"audit netlink query failed: {e.strerror or e}")
    details = {"enabled": s["enabled"], "locked": s["enabled"] == 2,
               "failure": FAILURE_MODES.get(s["failure"], str(s["failure"])), "rules": s["rules"],
               "backlog": s["backlog"], "backlog_limit": s["backlog_limit"], "lost": s["lost"],
               "auditd_pid": s["pid"]}
    if s["enabled"] == 0:
        return fact("kernel-audit", "audit", "stopped", "the audit subsystem is disabled", **details)
    if s["rules"] == 0:
        return fact("kernel-audit", "audit", "degraded", "no audit rules are loaded", **details)
    return fact("kernel-audit", "audit", "protecting", "", **details)


# --- BPF -------------------------------------------------------------------------
def _bpftool(*args: str):
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, timeout=BPFTOOL_TIMEOUT, check=True).stdout
    return json.loads(out or b"[]")


def bpf_fact(own_pid: int, expected_own: int | None) -> dict:
    """Programs loaded, and this daemon's attached ones (from `bpftool perf`,
    which lists tracepoint attachments by holder pid). expected_own: how many
    of ours were attached when the collectors started (None: not known yet)."""
    try:
        programs = _bpftool("prog", "show")
        perf = _bpftool("perf", "show")
    except FileNotFoundError:
        return fact("kernel-bpf", "edr", "unknown", "bpftool is not installed")
    except (subprocess.SubprocessError, ValueError) as e:
        return fact("kernel-bpf", "edr", "unknown", f"bpftool failed: {e}")
    own = [p for p in perf if isinstance(p, dict) and p.get("pid") == own_pid]
    details = {"programs": len(programs), "attached": len(perf), "vajra_attached": len(own),
               "vajra_expected": expected_own}
    if expected_own and len(own) < expected_own:
        return fact("kernel-bpf", "edr", "degraded",
                    f"{expected_own - len(own)} of Vajra's {expected_own} BPF attachments are gone", **details)
    return fact("kernel-bpf", "edr", "protecting", "", **details)


def collect(own_pid: int, expected_own: int | None) -> list[dict]:
    """Every kernel fact; blocking (run it off the event loop)."""
    return [lsm_fact(), apparmor_fact(), selinux_fact(), lockdown_fact(), audit_fact(),
            bpf_fact(own_pid, expected_own)]

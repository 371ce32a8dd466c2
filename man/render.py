"""Writes man/vajrad.8 and man/vajractl.1 from the programs' own --help, so
the pages cannot drift from the code (tests/test_packaging.py fails when
they are stale):

    python3 man/render.py          # from the checkout root
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATE = "2025-11-29"


def _run(*argv: str) -> str:
    # A fixed width: argparse wraps to $COLUMNS.
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(HERE.parent))
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True,
                          cwd=HERE.parent, env=env).stdout


def esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n"))


def version() -> str:
    return _run("-m", "vajrad", "--version").split()[-1]


def vajrad_flags() -> list[tuple[str, str]]:
    """(--name=default, help) from `vajrad --help`."""
    flags, current = [], None
    for line in _run("-m", "vajrad", "--help").splitlines():
        if re.match(r"^  --", line):
            current = [line.strip(), ""]
            flags.append(current)
        elif current is not None and line.startswith("      "):
            current[1] = (current[1] + " " + line.strip()).strip()
    return [(a, b) for a, b in flags]


def vajrad_page() -> str:
    out = [f'.TH VAJRAD 8 "{DATE}" "vajra {version()}" "System Administration"',
           ".SH NAME", "vajrad \\- eBPF security telemetry daemon",
           ".SH SYNOPSIS", ".B vajrad", "[\\fB\\-\\-\\fIflag\\fB=\\fIvalue\\fR ...]",
           ".SH DESCRIPTION",
           esc("vajrad collects process, socket and file events in the kernel with eBPF (BCC, "
               "tracepoints only), stores them in an embedded SQLite store and serves them over a "
               "JSON-lines Unix socket and over D-Bus (org.vajra.Vajra1). Column names follow "
               "osquery's tables. It runs as the systemd service vajrad.service (Type=notify): it "
               "sends READY=1 once its collectors are attached and its socket listens, WATCHDOG=1 "
               "while it is healthy, and STOPPING=1 on the way down."),
           ".PP",
           esc("Flags follow osquery's style: --name=value, --name value, --name for true and "
               "--noname for false. Each flag except --config_path is also a key under \"options\" "
               "in the configuration file; a flag wins over the file."),
           ".SH OPTIONS"]
    for flag, text in vajrad_flags():
        out += [".TP", f"\\fB{esc(flag)}\\fR", esc(text)]
    out += [".TP", "\\fB\\-\\-help\\fR", "Print the flags with their defaults and exit.",
            ".TP", "\\fB\\-\\-version\\fR", "Print the version and exit.",
            ".SH SIGNALS",
            ".TP", ".B SIGHUP",
            esc("Re-read the configuration file. Flags given at start still win; a file that does "
                "not validate is logged and the running configuration stays. `systemctl reload "
                "vajrad` does this and waits until it is done."),
            ".TP", ".B SIGTERM", esc("Stop: flush the event store and exit 0."),
            ".SH EXIT STATUS",
            esc("0 after a clean stop, 2 for a configuration error (the message names the key), "
                "1 when a collector or the kernel prevents start-up (the message says what to install)."),
            ".SH FILES",
            ".TP", ".I /etc/vajra/vajra.conf", esc("JSON configuration in osquery's shape."),
            ".TP", ".I /var/lib/vajra/events.db", esc("The event store."),
            ".TP", ".I /run/vajra/vajra.sock", esc("The JSON-lines API socket (root and group vajra)."),
            ".TP", ".I /usr/share/vajra/bpf/", esc("The BPF programs BCC compiles at start-up."),
            ".TP", ".I /usr/share/dbus-1/system.d/org.vajra.Vajra1.conf",
            esc("Who may own and call org.vajra.Vajra1 on the system bus."),
            ".SH SEE ALSO",
            "\\fBvajractl\\fR(1), \\fBsystemctl\\fR(1), \\fBbusctl\\fR(1), "
            "\\fI/usr/share/doc/vajra/\\fR"]
    return "\n".join(out) + "\n"


def vajractl_commands() -> list[tuple[str, str]]:
    top = _run("-m", "vajrad.client.ctl", "--help")
    names = re.search(r"\{([a-z,]+)\}", top).group(1).split(",")
    return [(n, _run("-m", "vajrad.client.ctl", n, "--help")) for n in names]


def vajractl_page() -> str:
    out = [f'.TH VAJRACTL 1 "{DATE}" "vajra {version()}" "User Commands"',
           ".SH NAME", "vajractl \\- query a running vajrad",
           ".SH SYNOPSIS", ".B vajractl", "[\\fB\\-\\-socket\\fR \\fIPATH\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
           ".SH DESCRIPTION",
           esc("vajractl talks to vajrad over its JSON-lines socket (default: $VAJRA_SOCKET or "
               "/run/vajra/vajra.sock). Root and members of group vajra may use it; others are "
               "refused. It exits 1 with a clear message when vajrad is not running or the socket "
               "refuses the user."),
           ".SH COMMANDS"]
    for name, text in vajractl_commands():
        out += [".SS " + name, ".nf", esc(text.rstrip()), ".fi"]
    out += [".SH EXAMPLES", ".nf",
            esc("vajractl status\nvajractl events --follow\n"
                "vajractl events --table bpf_process_events --since 300 --json\n"
                "vajractl tree $$\nvajractl query \"SELECT path, cmdline FROM bpf_process_events LIMIT 5\""),
            ".fi",
            ".SH SEE ALSO", "\\fBvajrad\\fR(8), \\fI/usr/share/doc/vajra/\\fR"]
    return "\n".join(out) + "\n"


def extension_page() -> str:
    usage = _run("-m", "vajrad.osquery", "--help")
    out = [f'.TH VAJRA\\-OSQUERY\\-EXTENSION 1 "{DATE}" "vajra {version()}" "User Commands"',
           ".SH NAME", "vajra-osquery-extension, vajra.ext \\- Vajra's tables in osquery",
           ".SH SYNOPSIS", ".B vajra.ext", "\\fB\\-\\-socket\\fR \\fIPATH\\fR [\\fIOPTIONS\\fR]",
           ".SH DESCRIPTION",
           esc("An osquery extension that registers Vajra's tables (bpf_process_events, "
               "bpf_socket_events, bpf_file_events, file_events and the live tables) with osquery's "
               "extension manager and answers osquery's queries from vajrad's socket. osquery "
               "autoloads only files ending in .ext, hence the second name; the package lists "
               "/usr/bin/vajra.ext in /etc/osquery/extensions.load, osqueryd's default autoload file. "
               "osquery starts it with --socket, --timeout and --interval; the other options are "
               "for running it by hand."),
           ".SH OPTIONS", ".nf", esc(usage.rstrip()), ".fi",
           ".SH FILES", ".TP", ".I /etc/osquery/extensions.load", esc("osquery's autoload list."),
           ".SH SEE ALSO", "\\fBvajrad\\fR(8), \\fBvajractl\\fR(1), \\fI/usr/share/doc/vajra/osquery.md.gz\\fR"]
    return "\n".join(out) + "\n"


PAGES = {"vajrad.8": vajrad_page, "vajractl.1": vajractl_page,
         "vajra-osquery-extension.1": extension_page}

if __name__ == "__main__":
    for name, render in PAGES.items():
        (HERE / name).write_text(render())

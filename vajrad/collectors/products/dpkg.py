"""A small reader of dpkg's database (/var/lib/dpkg/status): which packages
are installed, at which version. python3-apt would do, but it loads the
whole apt cache for a question this file answers in a few milliseconds."""
from __future__ import annotations

import os
from dataclasses import dataclass

STATUS = "/var/lib/dpkg/status"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    status: str          # the Status field, e.g. "install ok installed"

    @property
    def installed(self) -> bool:
        # "installed" and the half-removed states that still leave files behind are
        # different facts: only a fully installed package counts.
        return self.status.split()[-1:] == ["installed"]


def parse(text: str, wanted: set[str] | None = None) -> dict[str, Package]:
    """Packages (those in `wanted`, or all) from the status file's text. The
    file is RFC 822-like stanzas; continuation lines start with a space."""
    found: dict[str, Package] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if not line or line[0] in " \t":
                continue
            key, sep, value = line.partition(":")
            if sep and key in ("Package", "Status", "Version", "Architecture"):
                fields[key] = value.strip()
        name = fields.get("Package")
        if not name or (wanted is not None and name not in wanted):
            continue
        pkg = Package(name, fields.get("Version", ""), fields.get("Status", ""))
        # Multi-arch: an installed instance wins over a removed one of another arch.
        if name not in found or (pkg.installed and not found[name].installed):
            found[name] = pkg
    return found


class DpkgDatabase:
    """The status file, re-read only when it changes (dpkg rewrites it whole)."""

    def __init__(self, path: str = STATUS):
        self.path = path
        self._stamp: tuple | None = None
        self._packages: dict[str, Package] = {}

    def packages(self, wanted: set[str]) -> dict[str, Package]:
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                self._packages = parse(f.read())
            self._stamp = stamp
        return {n: p for n, p in self._packages.items() if n in wanted}

"""The request shapes the socket API and D-Bus share with their clients.

Both the daemon's surfaces and the clients (vajractl, the osquery shim)
import this; it imports nothing of either, so a client never loads the
daemon's service or store.
"""
from __future__ import annotations

from typing import Any


def event_list_params(flt: dict, table: str | None = None, limit: int | None = None,
                      cursor: str | None = None, columns: list[str] | None = None) -> dict:
    """event/list params, leaving out what is unset (empty or zero means default)."""
    params: dict[str, Any] = {"filter": flt}
    for key, value in (("table", table), ("limit", limit), ("cursor", cursor), ("columns", columns)):
        if value:
            params[key] = value
    return params

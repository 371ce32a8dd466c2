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


# Alert triage (the alerts unit; alert/update and UpdateAlert).
ALERT_STATUSES = ("open", "acknowledged", "closed")
CLOSE_REASONS = ("false_positive", "duplicate", "true_positive", "benign_positive", "other")
# from -> the statuses it may become; anything else is refused.
ALERT_TRANSITIONS = {"open": ("acknowledged", "closed"),
                     "acknowledged": ("open", "closed"),
                     "closed": ("open",)}
SEVERITIES = ("info", "low", "medium", "high", "critical")
MAX_COMMENT = 4096


def alert_update_params(eid: int, status: str, close_reason: str | None = None,
                        comment: str | None = None) -> dict:
    """alert/update params, leaving out what is unset."""
    params: dict[str, Any] = {"eid": eid, "status": status}
    if close_reason:
        params["close_reason"] = close_reason
    if comment is not None:
        params["comment"] = comment
    return params

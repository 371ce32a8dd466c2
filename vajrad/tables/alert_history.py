"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import BIGINT, TEXT, Column, Table

TABLE = Table.events(
    "alert_history",
    "Every triage change of an alert (alert/update, UpdateAlert, vajractl alert): who, when, "
    "from which status to which, why. time is when.",
    (
        Column("alert_eid", BIGINT, "eid of the alert (in alerts)"),
        Column("rule_id", TEXT, "The alert's rule"),
        Column("from_status", TEXT, "Status before the change"),
        Column("to_status", TEXT, "Status after it"),
        Column("status_by", BIGINT, "uid of the caller (socket peer credentials, or the D-Bus sender's)"),
        Column("close_reason", TEXT, "The close reason given (to closed)"),
        Column("comment", TEXT, "The comment given"),
    ),
    summary=("alert_eid", "rule_id", "from_status", "to_status", "status_by", "close_reason"),
)

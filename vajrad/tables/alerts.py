"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import BIGINT, INTEGER, TEXT, Column, Table

TABLE = Table.events(
    "alerts",
    "Detections: a rule (docs/alerts.md) matched rows of an event table. Matches of one rule with "
    "the same group_by values within its suppress_for window are one alert (hit_count, last_seen). "
    "is_open is 1 while the alert awaits triage (status open); the matching events are is_open too "
    "until then. time is first_seen.",
    (
        Column("rule_id", TEXT, "The rule's id"),
        Column("rule_version", INTEGER, "The rule's version when the alert opened"),
        Column("rule_name", TEXT, "The rule's name"),
        Column("severity", TEXT, "info, low, medium, high or critical"),
        Column("mitre", TEXT, "JSON array of MITRE ATT&CK technique ids"),
        Column("event_table", TEXT, "The table the rule reads"),
        Column("first_eid", BIGINT, "eid (in event_table) of the first matching row"),
        Column("last_eid", BIGINT, "eid of the last matching row"),
        Column("first_seen", BIGINT, "Time of the first matching row, unix seconds"),
        Column("last_seen", BIGINT, "Time of the last matching row, unix seconds"),
        Column("hit_count", BIGINT, "Matching rows counted in this alert"),
        Column("group_key", TEXT, "JSON array of the rule's group_by values (null for NULL); [] without group_by"),
        Column("status", TEXT, "open, acknowledged or closed"),
        Column("status_by", BIGINT, "uid of who last changed status (NULL while never triaged)"),
        Column("status_at", BIGINT, "When status last changed, unix seconds"),
        Column("close_reason", TEXT, "closed: false_positive, duplicate, true_positive, benign_positive or other"),
        Column("comment", TEXT, "The triager's comment"),
    ),
    summary=("severity", "status", "rule_id", "hit_count", "event_table", "first_eid", "group_key"),
)

"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import BIGINT, INTEGER, TEXT, Column, Table

TABLE = Table.events(
    "security_product_events",
    "A change of a security product's state (see security_products): stopped, started, uninstalled, "
    "binary replaced, audit rules flushed, firewall flushed, ... with the process that caused it, "
    "found from Vajra's own process and file events.",
    (
        Column("name", TEXT, "Product name (kernel-* for kernel facts)"),
        Column("type", TEXT, "The product's type"),
        Column("change", TEXT, "stopped, started, failed, masked, disabled, enabled, uninstalled, installed, "
                               "binary_replaced, config_changed, signatures_out_of_date, lsm_disabled, "
                               "profile_complain, audit_rules_flushed, audit_disabled, firewall_flushed, "
                               "bpf_detached, degraded, recovered, unknown; signal: a signal sent to one of its processes "
                               "(recorded in the kernel, with the sender as actor)"),
        Column("old_state", TEXT, "State before"),
        Column("new_state", TEXT, "State after"),
        Column("reason", TEXT, "What changed, in words"),
        Column("severity", TEXT, "high (protection lost), medium (weakened), low (restored or informational)"),
        Column("actor_found", INTEGER, "1 when the process that caused the change is known, 0 when not"),
        Column("actor_source", TEXT, "How the actor was found: signal (the kernel saw it send the signal "
                                     "that ended the product's process, bpf/signal.bpf.c), exec (a command naming the product, seen "
                                     "in bpf_process_events), file (bpf_file_events/file_events on its "
                                     "path), or none"),
        Column("pid", BIGINT, "The actor's process ID"),
        Column("path", TEXT, "The actor's executable"),
        Column("cmdline", TEXT, "The actor's command line"),
        Column("uid", BIGINT, "The actor's real user ID"),
        Column("ancestry", TEXT, "JSON array of the actor's ancestors, [0] the immediate parent"),
        Column("actor_eid", BIGINT, "eid of the bpf_process_events (or bpf_file_events) row behind the actor"),
        Column("target_pid", BIGINT, "The product's process the change is about (the one that exited), 0 if none"),
        Column("signal", INTEGER, "Signal sent to (signal rows) or that ended (from its exit status) the "
                                  "product's process; 0 if none"),
    ),
    notes={
        "first evaluation": "the states found when vajrad starts are the baseline: no rows.",
    },
    summary=("name", "change", "old_state", "new_state", "pid", "path", "cmdline"),
)

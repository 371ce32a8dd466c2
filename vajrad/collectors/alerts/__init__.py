"""Alerts unit: detection rules (YAML, docs/alerts.md) evaluated over the
committed rows of the event tables, with a triage lifecycle. It fills
`alerts` and `alert_history`, writes through the store's transactions
(EventStore.transact), and provides "alert_triage" (alert/update, UpdateAlert)."""
from vajrad.config import Option
from vajrad.units import Unit, UnitContext

DEFAULT_RULES_PATH = "/etc/vajra/rules.d"


def _build(ctx: UnitContext):
    from vajrad.collectors.alerts.engine import AlertEngine
    from vajrad.collectors.alerts.rules import PACKAGED_RULES
    from vajrad.tables import TABLES
    cfg = ctx.config
    dirs = [PACKAGED_RULES, *(p for p in cfg.rules_path.split(":") if p)]
    engine = AlertEngine(ctx.need("store"), TABLES, dirs, cfg.alerts_interval_ms, ctx.need("host_identifier"))
    ctx.provide("alert_triage", engine.update_alert)
    return engine


UNIT = Unit(
    name="alerts",
    description="Detection rules over the event tables, with open/acknowledged/closed triage.",
    tables=("alerts", "alert_history"),
    factory=_build,
    wanted=lambda cfg: cfg.enable_alerts and not cfg.disable_events,
    needs=("store", "host_identifier"),
    provides=("alert_triage",),
    options=(
        Option("enable_alerts", bool, True,
               "Evaluate detection rules (the packaged defaults and --rules_path) over committed events; "
               "matches become alerts (docs/alerts.md)."),
        Option("rules_path", str, DEFAULT_RULES_PATH,
               "Directories (colon-separated) of YAML rule files, read after the packaged defaults: a rule "
               "with a default's id replaces it. SIGHUP reads them again.", reloadable=True),
        Option("alerts_interval_ms", int, 200,
               "Rules are evaluated at most this often, over every row committed since.",
               minimum=10, maximum=60_000),
    ),
)

"""Security-product unit: which security products are installed, whether
they protect, and every change of that, with the process that caused it
(security_products, security_product_events).

The catalogue is data (catalogue/*.json, one file per product, shipped in
the package), extended by the config file's `security_products` list in the
same format. The unit reads committed bpf_process_events and file events
(observe) for real-time changes and attribution; without them it still
fills both tables from inotify and its reconcile pass, with no actor.
"""
from vajrad.config import Option
from vajrad.units import Section, Unit, UnitContext


def _parse_catalogue(doc: dict, source: str):
    from vajrad.collectors.products import catalogue
    return catalogue.parse_section(doc, source)


def _build(ctx: UnitContext):
    from vajrad.collectors.products.catalogue import merged
    from vajrad.collectors.products.collector import ProductsCollector
    cfg = ctx.config
    signal_watch = None
    if cfg.enable_bpf_events:
        from vajrad.collectors.products.signals import SignalWatch
        kenv = ctx.need("kernel")
        signal_watch = lambda on_signal: SignalWatch(kenv, cfg.bpf_output, on_signal)  # noqa: E731
    return ProductsCollector(merged(cfg.security_products), cfg.security_products_reconcile_interval,
                             bpf_enabled=cfg.enable_bpf_events,
                             describe_process=ctx.services.find("describe_process"),
                             signal_watch=signal_watch)


UNIT = Unit(
    name="products",
    description="Security products: inventory, live state and tamper events (security_products, "
                "security_product_events).",
    tables=("security_products", "security_product_events"),
    factory=_build,
    wanted=lambda cfg: cfg.enable_security_products and not cfg.disable_events,
    needs=("kernel",),          # used only with eBPF: the kill-signal program (bpf/signal.bpf.c)
    options=(
        Option("enable_security_products", bool, True,
               "Serve security_products (the catalogue's products and the kernel's protections, live) "
               "and record security_product_events (changes of their state, with the process behind them)."),
        Option("security_products_reconcile_interval", int, 60,
               "Seconds between full re-evaluations of every product (health commands included); "
               "changes seen in events are evaluated at once.", minimum=1, maximum=86400, reloadable=True),
    ),
    section=Section("security_products", ("security_products",), _parse_catalogue),
)

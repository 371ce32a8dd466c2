"""Unit declarations: the registry fits together, and the daemon's wiring
follows the declarations (no root needed)."""
import subprocess
import sys

import pytest

from vajrad import config, units
from vajrad.collectors.registry import CATALOGUE, UNITS
from vajrad.daemon import DAEMON_SERVICES
from vajrad.tables import TABLES


def test_every_table_is_filled_by_exactly_one_unit():
    declared = [t for u in UNITS for t in u.tables]
    assert sorted(declared) == sorted(TABLES), "a table without a unit, or a unit naming an unknown table"
    assert len(declared) == len(set(declared))


def test_the_registry_passes_its_own_checks():
    units.check(UNITS, DAEMON_SERVICES)
    order = [u.name for u in units.build_order(list(UNITS))]
    for u in UNITS:
        for need in u.needs:
            provider = next((p for p in UNITS if need in p.provides), None)
            if provider is not None:
                assert order.index(provider.name) < order.index(u.name), (u.name, need)


def _unit(name, **kw):
    base = dict(description="", tables=(), factory=lambda ctx: None, wanted=lambda cfg: True)
    base.update(kw)
    return units.Unit(name=name, **base)


@pytest.mark.parametrize("declared, message", [
    ((_unit("a"), _unit("a")), "two units are named a"),
    ((_unit("a", tables=("t",)), _unit("b", tables=("t",))), "table t is declared by units a and b"),
    ((_unit("a", needs=("nothing",)),), "needs 'nothing', which no unit provides"),
    ((_unit("a", options=(config.Option("x", int, 1, ""),)),
      _unit("b", options=(config.Option("x", int, 2, ""),))), "option or section x is declared by units a and b"),
])
def test_bad_declarations_are_named(declared, message):
    with pytest.raises(units.UnitError) as e:
        units.check(declared, ())
    assert message in str(e.value)


def test_build_order_follows_needs_and_refuses_cycles():
    late = _unit("late", needs=("early_thing",))
    early = _unit("early", provides=("early_thing",))
    assert [u.name for u in units.build_order([late, early])] == ["early", "late"]
    a = _unit("a", needs=("b_thing",), provides=("a_thing",))
    b = _unit("b", needs=("a_thing",), provides=("b_thing",))
    with pytest.raises(units.UnitError, match="cycle"):
        units.build_order([a, b])


def test_a_factory_may_use_and_provide_only_what_it_declares():
    services = units.Services({"kernel": lambda: "kenv"})
    unit = _unit("u", needs=("kernel",), provides=("cache",))
    ctx = units.UnitContext(unit, None, services)
    assert ctx.need("kernel") == "kenv"
    ctx.provide("cache", 42)
    assert services.get("cache") == 42
    with pytest.raises(units.UnitError, match="without declaring it in needs"):
        ctx.need("cache")
    with pytest.raises(units.UnitError, match="provides 'other' without declaring it"):
        ctx.provide("other", 1)


def test_an_optional_service_is_used_when_provided_and_built_first():
    consumer = _unit("consumer", optional=("resolver",))
    provider = _unit("provider", provides=("resolver",))
    # The provider comes first whatever the order given, when both are built.
    assert [u.name for u in units.build_order([consumer, provider])] == ["provider", "consumer"]
    assert [u.name for u in units.build_order([consumer])] == ["consumer"]
    services = units.Services()
    ctx = units.UnitContext(consumer, None, services)
    assert ctx.want("resolver") is None           # not built: the unit does without
    services.provide("resolver", "r")
    assert ctx.want("resolver") == "r"
    with pytest.raises(units.UnitError, match="without declaring it in optional"):
        ctx.want("other")
    with pytest.raises(units.UnitError, match="without declaring it in needs"):
        ctx.need("resolver")                      # optional is not a need
    units.check((consumer, provider), ())
    with pytest.raises(units.UnitError, match="optionally uses 'resolver', which no unit provides"):
        units.check((consumer,), ())


def test_unit_options_and_sections_reach_flags_and_the_file(tmp_path):
    """Options declared by a unit are flags and file options like the daemon's own,
    and its section is parsed by the unit's own parser."""
    for u in UNITS:
        for o in u.options:
            assert o in CATALOGUE.options
    cfg = tmp_path / "c.conf"
    cfg.write_text('{"options": {"read_max": 10}, "file_paths": {"etc": ["/etc/%%"]}}')
    c = config.load([f"--config_path={cfg}", "--enable_socket_events=false"], CATALOGUE)
    assert c.read_max == 10 and c.enable_socket_events is False
    assert [r.category for r in c.fim.includes] == ["etc"]


def test_declarations_import_nothing_heavy():
    """Parsing flags and writing docs must not load BCC or the collectors."""
    code = ("import sys; import vajrad.collectors.registry, vajrad.docgen; "
            "heavy = [m for m in ('bcc', 'vajrad.collectors.process.bpf_process_events', "
            "'vajrad.kernel.program', 'pyinotify') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("client, forbidden", [
    ("vajrad.osquery.extension", ("vajrad.serve", "vajrad.store", "vajrad.collectors", "sqlite3")),
    ("vajrad.client.ctl", ("vajrad.serve", "vajrad.store", "vajrad.collectors", "vajrad.daemon")),
])
def test_clients_import_nothing_of_the_daemon(client, forbidden):
    """Layers point down: the shim and vajractl never load the service, the store or a collector."""
    code = (f"import sys, {client}; print([m for m in sys.modules "
            f"if any(m == f or m.startswith(f + '.') for f in {forbidden!r})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""What a collector unit declares, and how the daemon puts units together.

A unit is one source of activity (process auditing, sockets, file
integrity, ...). It declares, in its package's `__init__.py`, everything the
daemon needs to know about it: its name, the tables it fills, its options and
config-file section, what it needs from other units, what it provides to
them, when it is wanted, and a factory. The daemon builds units from
`vajrad.collectors.registry` and knows none of their insides; flag parsing,
config validation, `vajrad --help` and docs/flags.md follow the declarations.

Declarations import nothing heavy: the factory imports the collector's module
when it is called, so parsing flags or generating docs never loads BCC.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from vajrad.config import Config, Option
from vajrad.errors import VajraError

if TYPE_CHECKING:
    from vajrad.collectors.base import Collector


class UnitError(VajraError):
    """A unit declaration, or the way units fit together, is wrong."""


@dataclass(frozen=True)
class Section:
    """Top-level keys of the config file a unit owns (besides `options`), and
    how they become one value, reachable as `config.<name>`."""
    name: str
    keys: tuple[str, ...]
    # (the whole document, where it came from) -> the value; raises ConfigError
    # naming the key.
    parse: Callable[[dict, str], Any]


@dataclass(frozen=True)
class Unit:
    name: str
    description: str
    tables: tuple[str, ...]
    # (context) -> a Collector; called only when `wanted(config)` holds.
    factory: Callable[["UnitContext"], "Collector"]
    wanted: Callable[[Config], bool]
    options: tuple[Option, ...] = ()
    section: Section | None = None
    # Services this unit needs from others (or from the daemon's own, see
    # `Services`), and those it provides once built.
    needs: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    # Services this unit uses when a unit providing them runs, and does
    # without otherwise (e.g. container_resolver); the provider, when built
    # at all, is built first.
    optional: tuple[str, ...] = ()
    # Whether a reload (SIGHUP) that makes the unit wanted starts it; one that
    # is running is never stopped by a reload.
    starts_on_reload: bool = False


class Services:
    """Named objects units share: the daemon's (built on first use by a
    provider function) and those units provide as they are built."""

    def __init__(self, providers: dict[str, Callable[[], Any]] | None = None):
        self._providers = dict(providers or {})
        self._values: dict[str, Any] = {}

    def provide(self, name: str, value: Any) -> None:
        self._values[name] = value

    def has(self, name: str) -> bool:
        return name in self._values or name in self._providers

    def get(self, name: str) -> Any:
        if name not in self._values:
            provider = self._providers.get(name)
            if provider is None:
                raise UnitError(f"no unit provides {name!r}")
            self._values[name] = provider()
        return self._values[name]

    def find(self, name: str, default: Any = None) -> Any:
        """A service that units built so far provide, or default (never built here)."""
        return self._values.get(name, default)


@dataclass
class UnitContext:
    """What a factory is given: the configuration and the shared services."""
    unit: Unit
    config: Config
    services: Services
    provided: dict[str, Any] = field(default_factory=dict)

    def need(self, name: str) -> Any:
        if name not in self.unit.needs:
            raise UnitError(f"unit {self.unit.name} uses {name!r} without declaring it in needs")
        return self.services.get(name)

    def want(self, name: str, default: Any = None) -> Any:
        """An optional service: its value when a unit built before this one
        provides it, else default."""
        if name not in self.unit.optional:
            raise UnitError(f"unit {self.unit.name} wants {name!r} without declaring it in optional")
        return self.services.find(name, default)

    def provide(self, name: str, value: Any) -> None:
        if name not in self.unit.provides:
            raise UnitError(f"unit {self.unit.name} provides {name!r} without declaring it")
        self.provided[name] = value
        self.services.provide(name, value)


def check(units: tuple[Unit, ...], daemon_services: tuple[str, ...]) -> None:
    """Every declaration fits: unique names, tables filled by one unit, needs
    that someone provides, option and section keys not claimed twice."""
    seen: dict[str, str] = {}
    providers = set(daemon_services)
    for unit in units:
        if unit.name in seen:
            raise UnitError(f"two units are named {unit.name}")
        seen[unit.name] = unit.name
        providers.update(unit.provides)
    tables: dict[str, str] = {}
    keys: dict[str, str] = {}
    for unit in units:
        for t in unit.tables:
            if t in tables:
                raise UnitError(f"table {t} is declared by units {tables[t]} and {unit.name}")
            tables[t] = unit.name
        for need in unit.needs:
            if need not in providers:
                raise UnitError(f"unit {unit.name} needs {need!r}, which no unit provides")
        for want in unit.optional:          # a typo would silently never be provided
            if want not in providers:
                raise UnitError(f"unit {unit.name} optionally uses {want!r}, which no unit provides")
        names = [o.name for o in unit.options] + list(unit.section.keys if unit.section else ())
        for k in names:
            if k in keys:
                raise UnitError(f"option or section {k} is declared by units {keys[k]} and {unit.name}")
            keys[k] = unit.name


def build_order(units: list[Unit]) -> list[Unit]:
    """Units ordered so that each comes after those providing what it needs
    (among `units`); a cycle is a declaration error."""
    by_service = {s: u for u in units for s in u.provides}
    done: list[Unit] = []
    visiting: set[str] = set()

    def visit(unit: Unit) -> None:
        if unit in done:
            return
        if unit.name in visiting:
            raise UnitError(f"units depend on each other in a cycle through {unit.name}")
        visiting.add(unit.name)
        for need in unit.needs + unit.optional:
            dep = by_service.get(need)
            if dep is not None and dep is not unit:
                visit(dep)
        visiting.discard(unit.name)
        done.append(unit)

    for unit in units:
        visit(unit)
    return done

"""Unit states from systemd over D-Bus (org.freedesktop.systemd1), kept
current by its PropertiesChanged signals, so that a stop, a failure or a
mask is seen when systemd reports it rather than at the next round.

Used only when systemd runs (`booted()`); elsewhere the collector reads
unit-file states from the unit files and active states from processes.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
UNIT_PROPS = ("LoadState", "ActiveState", "SubState", "UnitFileState")
CALL_TIMEOUT_S = 5.0
MANAGER_SIGNALS = ("UnitFilesChanged", "Reloading")


def booted() -> bool:
    """sd_booted(): systemd is the init system."""
    return os.path.isdir("/run/systemd/system")


class SystemdUnits:
    """The catalogue's units as systemd sees them: {unit: {LoadState,
    ActiveState, SubState, UnitFileState, MainPID}}; on_change() after each
    change systemd signals."""

    def __init__(self, address: str | None, on_change: Callable[[], None]):
        self.address = address          # None: the system bus
        self.on_change = on_change
        self.states: dict[str, dict] = {}
        self.signals = 0
        self.reloads = 0                     # UnitFilesChanged/Reloading signals seen
        self._paths: dict[str, str] = {}     # object path -> unit
        self._bus: MessageBus | None = None
        self._tasks: set[asyncio.Task] = set()

    async def _call(self, path: str, interface: str, member: str, signature: str = "", body=()):
        reply = await asyncio.wait_for(self._bus.call(Message(
            destination=SYSTEMD, path=path, interface=interface, member=member,
            signature=signature, body=list(body))), CALL_TIMEOUT_S)
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name}: {reply.body[0] if reply.body else ''}")
        return reply.body

    async def start(self, units: list[str]) -> None:
        bus = MessageBus(bus_address=self.address) if self.address else MessageBus(bus_type=BusType.SYSTEM)
        self._bus = await bus.connect()
        self._bus.add_message_handler(self._on_message)
        await self._bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                     interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                                     body=[f"type='signal',interface='{PROPERTIES}',member='PropertiesChanged'"]))
        # LoadState (masked) and UnitFileState (enabled, disabled) are not
        # signalled with PropertiesChanged: systemd announces a mask, disable
        # or enable with the manager's UnitFilesChanged (and a daemon-reload
        # with Reloading), after which every watched unit is read again.
        for member in MANAGER_SIGNALS:
            await self._bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                body=[f"type='signal',interface='{MANAGER}',member='{member}',path='{MANAGER_PATH}'"]))
        await self._call(MANAGER_PATH, MANAGER, "Subscribe")      # systemd signals only to subscribers
        await self.watch(units)

    async def watch(self, units: list[str]) -> None:
        """Loads and reads the units not watched yet (at start, and for units
        a reloaded catalogue adds)."""
        known = set(self._paths.values())
        for unit in units:
            if unit in known or self._bus is None:
                continue
            try:
                [path] = await self._call(MANAGER_PATH, MANAGER, "LoadUnit", "s", [unit])
            except (RuntimeError, TimeoutError, asyncio.TimeoutError) as e:
                log.warning("systemd: cannot load unit %s: %s", unit, e)
                continue
            self._paths[path] = unit
            await self._refresh(unit, path)

    async def _refresh(self, unit: str, path: str) -> None:
        [props] = await self._call(path, PROPERTIES, "GetAll", "s", [UNIT])
        state = {k: props[k].value for k in UNIT_PROPS if k in props}
        state["MainPID"] = 0
        if unit.endswith(".service"):
            try:
                [pid] = await self._call(path, PROPERTIES, "Get", "ss", [SERVICE, "MainPID"])
                state["MainPID"] = int(pid.value)
            except RuntimeError:
                pass
        self.states[unit] = state

    async def refresh_all(self) -> None:
        """Reads every watched unit again (what no PropertiesChanged carries)."""
        for path, unit in list(self._paths.items()):
            try:
                await self._refresh(unit, path)
            except (RuntimeError, TimeoutError, asyncio.TimeoutError) as e:
                log.warning("systemd: cannot read unit %s: %s", unit, e)

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL and msg.interface == MANAGER and msg.path == MANAGER_PATH \
                and msg.member in MANAGER_SIGNALS:
            if msg.member == "Reloading" and msg.body and msg.body[0]:
                return False        # the reload starts; units are read when it has ended
            self.reloads += 1
            self._spawn(self._refresh_all_then_report())
            return False
        if msg.message_type != MessageType.SIGNAL or msg.member != "PropertiesChanged" \
                or msg.path not in self._paths:
            return False
        unit = self._paths[msg.path]
        interface, changed, invalidated = msg.body[0], msg.body[1], msg.body[2]
        if interface not in (UNIT, SERVICE):
            return False
        state = self.states.setdefault(unit, {"MainPID": 0})
        for key, value in changed.items():
            if key in UNIT_PROPS or key == "MainPID":
                state[key] = value.value
        self.signals += 1
        if set(invalidated) & (set(UNIT_PROPS) | {"MainPID"}):
            # systemd names some properties without their value: read them again
            self._spawn(self._refresh_then_report(unit, msg.path))
        else:
            self.on_change()
        return False

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_all_then_report(self) -> None:
        await self.refresh_all()
        self.on_change()

    async def _refresh_then_report(self, unit: str, path: str) -> None:
        try:
            await self._refresh(unit, path)
        except (RuntimeError, TimeoutError, asyncio.TimeoutError) as e:
            log.warning("systemd: cannot read unit %s: %s", unit, e)
        self.on_change()

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

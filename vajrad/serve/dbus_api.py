"""org.vajra.Vajra1 on D-Bus, through dbus-next.

Types are D-Bus native so that busctl can call and print everything:
status is a{sv}, events are aa{sv} with integers as x, text as s and
is_open as b. A column with no value is left out of its event dict.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.constants import NameFlag, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method

from vajrad import __version__
from vajrad.errors import RequestError, VajraError
from vajrad.schema import Table
from vajrad.protocol import event_list_params
from vajrad.serve.service import VajraService

log = logging.getLogger(__name__)

BUS_NAME = "org.vajra.Vajra1"
OBJECT_PATH = "/org/vajra/Vajra1"
INTERFACE = "org.vajra.Vajra1"
ERR_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
ERR_FAILED = "org.vajra.Vajra1.Error.Failed"
PROPERTIES_INTERVAL = 1.0     # PropertiesChanged at most once per this many seconds


def to_variant(value: Any) -> Variant:
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value) if -(1 << 63) <= value < (1 << 63) else Variant("t", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, dict):
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [to_variant(v) for v in value])
    return Variant("s", str(value))


def to_vardict(d: dict) -> dict[str, Variant]:
    return {str(k): to_variant(v) for k, v in d.items() if v is not None}


def from_vardict(d: dict[str, Variant]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, Variant) else v) for k, v in d.items()}


def event_to_dbus(row: dict, tables: dict[str, Table]) -> dict[str, Variant]:
    spec = tables[row["table"]]
    out = {"table": Variant("s", row["table"])}
    for col in spec.columns:
        value = row.get(col.name)
        if value is None:
            continue
        if col.name == "is_open":
            out[col.name] = Variant("b", bool(value))
        elif col.is_integer:
            out[col.name] = Variant("x", int(value))
        elif col.sqlite_type == "REAL":
            out[col.name] = Variant("d", float(value))
        else:
            out[col.name] = Variant("s", str(value))
    return out


class VajraInterface(ServiceInterface):
    def __init__(self, service: VajraService, counters: Callable[[], tuple[int, int]]):
        super().__init__(INTERFACE)
        self.service = service
        self._counters = counters

    @method()
    def Ping(self) -> "s":
        return self.service.ping()

    @method()
    def GetStatus(self) -> "a{sv}":
        return to_vardict(self.service.status())

    @method()
    def ReadTable(self, table: "s") -> "aa{sv}":
        try:
            rows = self.service.read_table({"table": table})["rows"]
        except RequestError as e:
            raise DBusError(ERR_INVALID_ARGS, str(e)) from None
        return [to_vardict(r) for r in rows]

    # Declared for introspection; calls are answered asynchronously by
    # DbusService._dispatch, since dbus-next 0.2 runs @method bodies on the loop.
    @method()
    def ListEvents(self, filter: "a{sv}", table: "s", limit: "u", cursor: "s") -> "aa{sv}s":
        raise DBusError(ERR_FAILED, "ListEvents is dispatched asynchronously")

    @method()
    def UpdateAlert(self, eid: "t", status: "s", close_reason: "s", comment: "s") -> "a{sv}":
        raise DBusError(ERR_FAILED, "UpdateAlert is dispatched asynchronously")

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def EventsCaptured(self) -> "t":
        return self._counters()[0]

    @dbus_property(access=PropertyAccess.READ)
    def EventsLost(self) -> "t":
        return self._counters()[1]


class DbusService:
    def __init__(self, bus_setting: str, service: VajraService,
                 counters: Callable[[], tuple[int, int]]):
        self.bus_setting = bus_setting
        self.service = service
        self.counters = counters
        self.bus: MessageBus | None = None
        self.iface = VajraInterface(service, counters)
        self.state = "disabled" if bus_setting == "none" else "stopped"
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self.bus_setting == "none":
            return
        try:
            if self.bus_setting == "system":
                bus = MessageBus(bus_type=BusType.SYSTEM)
            elif self.bus_setting == "session":
                bus = MessageBus(bus_type=BusType.SESSION)
            else:
                bus = MessageBus(bus_address=self.bus_setting)
            self.bus = await asyncio.wait_for(bus.connect(), 5)
            self.bus.add_message_handler(self._dispatch)
            self.bus.export(OBJECT_PATH, self.iface)
            reply = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
            if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
                raise VajraError(f"could not own {BUS_NAME}: {reply.name}")
        except (OSError, asyncio.TimeoutError, DBusError, VajraError, ValueError) as e:
            log.warning("D-Bus (%s) unavailable, running without it: %s", self.bus_setting, e)
            self.state = f"unavailable: {e}"
            if self.bus:
                self.bus.disconnect()
                self.bus = None
            return
        self.state = "running"
        self._task = asyncio.create_task(self._announce_properties())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self.bus:
            self.bus.disconnect()
            self.bus = None
        self.state = "stopped"

    def _dispatch(self, msg: Message):
        if (msg.message_type != MessageType.METHOD_CALL or msg.interface != INTERFACE
                or msg.path != OBJECT_PATH or msg.member not in ("ListEvents", "UpdateAlert")):
            return None
        handler = self._list_events if msg.member == "ListEvents" else self._update_alert
        task = asyncio.create_task(handler(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _list_events(self, msg: Message) -> None:
        try:
            if msg.signature != "a{sv}sus":
                raise RequestError(f"ListEvents takes (a{{sv}} filter, s table, u limit, s cursor), "
                                   f"got signature {msg.signature!r}", "signature")
            flt, table, limit, cursor = msg.body
            params = event_list_params(from_vardict(flt), table, limit, cursor)
            result = await self.service.list_events(params)
            events = [event_to_dbus(e, self.service.tables) for e in result["events"]]
            reply = Message.new_method_return(msg, "aa{sv}s", [events, result["cursor"]])
        except RequestError as e:
            reply = Message.new_error(msg, ERR_INVALID_ARGS, str(e))
        except Exception as e:
            log.exception("D-Bus ListEvents failed")
            reply = Message.new_error(msg, ERR_FAILED, str(e))
        if self.bus:
            self.bus.send(reply)

    async def _sender_uid(self, sender: str) -> int:
        """The caller's uid, as the bus daemon knows it (never from the call)."""
        reply = await asyncio.wait_for(self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
            member="GetConnectionUnixUser", signature="s", body=[sender])), 5)
        if reply.message_type != MessageType.METHOD_RETURN:
            raise VajraError(f"the bus did not tell the caller's uid: {reply.body}")
        return int(reply.body[0])

    async def _update_alert(self, msg: Message) -> None:
        try:
            if msg.signature != "tsss":
                raise RequestError(f"UpdateAlert takes (t eid, s status, s close_reason, s comment), "
                                   f"got signature {msg.signature!r}", "signature")
            eid, status, reason, comment = msg.body
            params = {"eid": eid, "status": status}
            if reason:
                params["close_reason"] = reason
            if comment:
                params["comment"] = comment
            uid = await self._sender_uid(msg.sender)
            alert = await self.service.update_alert(params, uid)
            reply = Message.new_method_return(msg, "a{sv}", [to_vardict(alert)])
        except RequestError as e:
            reply = Message.new_error(msg, ERR_INVALID_ARGS, str(e))
        except Exception as e:
            log.exception("D-Bus UpdateAlert failed")
            reply = Message.new_error(msg, ERR_FAILED, str(e))
        if self.bus:
            self.bus.send(reply)

    async def _announce_properties(self) -> None:
        last = None
        while True:
            await asyncio.sleep(PROPERTIES_INTERVAL)
            now = self.counters()
            if now != last:
                self.iface.emit_properties_changed({"EventsCaptured": now[0], "EventsLost": now[1]})
                last = now

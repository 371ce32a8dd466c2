"""org.vajra.Vajra1 on D-Bus, through dbus-next.

Types are D-Bus native so that busctl can call and print everything:
status is a{sv}, events are aa{sv} with integers as x, text as s and
is_open as b. A column with no value is left out of its event dict.
"""
from __future__ import annotations

import array
import asyncio
import logging
import socket
import time
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
from vajrad.serve.wire import RateLimitedLog, shown

log = logging.getLogger(__name__)

BUS_NAME = "org.vajra.Vajra1"
OBJECT_PATH = "/org/vajra/Vajra1"
INTERFACE = "org.vajra.Vajra1"
ERR_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
ERR_FAILED = "org.vajra.Vajra1.Error.Failed"
ERR_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
ERR_UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
ERR_UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
ERR_PROPERTY_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"
PROPERTIES = "org.freedesktop.DBus.Properties"
PROPERTY_NAMES = ("Version", "EventsCaptured", "EventsLost")
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


class _LibraryErrorLimit(logging.Filter):
    """dbus-next logs each error a handler raises, traceback included, on the
    root logger; a client can provoke those at will. At most `burst` such
    records per minute get through, then one that says how many did not."""

    PREFIXES = ("got unexpected error processing a message", "A message handler raised an exception")

    def __init__(self, burst: int = 5, period: float = 60.0):
        super().__init__()
        self.burst, self.period = burst, period
        self.window_start, self.in_window, self.suppressed = -period, 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.PREFIXES):
            return True
        now = time.monotonic()
        if now - self.window_start >= self.period:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return False
        self.in_window += 1
        if self.suppressed:
            record.msg += f" ({self.suppressed} similar records not logged)"
            self.suppressed = 0
        return True


_library_error_limit = _LibraryErrorLimit()


def tolerate_full_socket(bus: MessageBus) -> MessageBus:
    """Makes dbus-next 0.2's writer wait when the bus socket is full.

    Its write callback sends message after message until the queue is empty;
    when send() meets a full socket buffer (EAGAIN: large replies, or a bus
    slow to read) it takes the BlockingIOError for a broken connection and
    disconnects, and vajrad is silently gone from the bus. Found by
    tests/test_fuzz.py. This is that callback with EAGAIN meaning "wait until
    writable", which the loop's writer registration already does."""
    writer = getattr(bus, "_writer", None)
    if writer is None or not all(hasattr(writer, a) for a in ("buf", "messages", "sock", "offset", "fut")):
        return bus        # another dbus-next: leave it as it is
    from dbus_next.aio import message_bus as impl

    def write_callback() -> None:
        try:
            while True:
                if writer.buf is None:
                    if writer.messages.qsize() == 0:
                        writer.loop.remove_writer(writer.fd)
                        return
                    buf, unix_fds, fut = writer.messages.get_nowait()
                    writer.unix_fds, writer.buf, writer.offset, writer.fut = unix_fds, memoryview(buf), 0, fut
                try:
                    if writer.unix_fds and writer.negotiate_unix_fd:
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", writer.unix_fds))]
                        writer.offset += writer.sock.sendmsg([writer.buf[writer.offset:]], ancdata)
                        writer.unix_fds = None
                    else:
                        writer.offset += writer.sock.send(writer.buf[writer.offset:])
                except BlockingIOError:
                    return            # called again once the socket is writable
                if writer.offset >= len(writer.buf):
                    writer.buf = None
                    impl._future_set_result(writer.fut, None)
                else:
                    return
        except Exception as e:
            impl._future_set_exception(writer.fut, e)
            writer.bus._finalize(e)

    writer.write_callback = write_callback
    return bus


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

    # ReadTable and ListEvents are declared for introspection; DbusService._dispatch
    # answers them (ListEvents asynchronously, since dbus-next 0.2 runs @method
    # bodies on the loop; both so that a bad call is an error reply, not a logged traceback).
    @method()
    def ReadTable(self, table: "s") -> "aa{sv}":
        raise DBusError(ERR_FAILED, "ReadTable is dispatched by DbusService")

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
        self.internal_errors = RateLimitedLog(log)

    async def start(self) -> None:
        if self.bus_setting == "none":
            return
        if _library_error_limit not in logging.getLogger().filters:
            logging.getLogger().addFilter(_library_error_limit)
        try:
            if self.bus_setting == "system":
                bus = MessageBus(bus_type=BusType.SYSTEM)
            elif self.bus_setting == "session":
                bus = MessageBus(bus_type=BusType.SESSION)
            else:
                bus = MessageBus(bus_address=self.bus_setting)
            self.bus = await asyncio.wait_for(tolerate_full_socket(bus).connect(), 5)
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
        """Calls answered here rather than by dbus-next's handlers: ListEvents
        and UpdateAlert (asynchronously), ReadTable, and Properties calls that are wrong.
        dbus-next 0.2 replies to an error raised in a handler and then logs it
        with a traceback as unexpected, so a client's mistake there would put
        a traceback in our log per call; these return the error instead."""
        if msg.message_type != MessageType.METHOD_CALL or msg.path != OBJECT_PATH:
            return None
        if msg.interface == PROPERTIES:
            problem = self._property_problem(msg)
            return Message.new_error(msg, problem[0], problem[1]) if problem else None
        if msg.interface != INTERFACE:
            return None
        if msg.member == "ReadTable":
            return self._read_table(msg)
        if msg.member not in ("ListEvents", "UpdateAlert"):
            return None
        handler = self._list_events if msg.member == "ListEvents" else self._update_alert
        task = asyncio.create_task(handler(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    @staticmethod
    def _property_problem(msg: Message) -> tuple[str, str] | None:
        signatures = {"Get": "ss", "Set": "ssv", "GetAll": "s"}
        if signatures.get(msg.member) != msg.signature:
            return ERR_UNKNOWN_METHOD, (f"{PROPERTIES}.{msg.member} with signature {msg.signature!r} "
                                        f"does not exist (Get: ss, GetAll: s, Set: ssv)")
        if msg.body[0] != INTERFACE:
            return ERR_UNKNOWN_INTERFACE, f"no interface {shown(msg.body[0])} at {OBJECT_PATH}"
        if msg.member in ("Get", "Set") and msg.body[1] not in PROPERTY_NAMES:
            return ERR_UNKNOWN_PROPERTY, (f"no property {shown(msg.body[1])} "
                                          f"(known: {', '.join(PROPERTY_NAMES)})")
        if msg.member == "Set":
            return ERR_PROPERTY_READ_ONLY, f"property {msg.body[1]} is read-only"
        return None

    def _read_table(self, msg: Message) -> Message:
        if msg.signature != "s":
            return Message.new_error(msg, ERR_INVALID_ARGS,
                                     f"ReadTable takes (s table), got signature {msg.signature!r}")
        try:
            rows = self.service.read_table({"table": msg.body[0]})["rows"]
            return Message.new_method_return(msg, "aa{sv}", [[to_vardict(r) for r in rows]])
        except RequestError as e:
            return Message.new_error(msg, ERR_INVALID_ARGS, str(e))
        except Exception as e:
            self.internal_errors.exception("D-Bus ReadTable failed")
            return Message.new_error(msg, ERR_FAILED, f"internal error: {type(e).__name__}")

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
            self.internal_errors.exception("D-Bus ListEvents failed")
            reply = Message.new_error(msg, ERR_FAILED, f"internal error: {type(e).__name__}")
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

"""JSON-lines API: one JSON-RPC 2.0 message per line on a Unix socket.

Methods: ping, status, tables, event/list, table/read, process/tree,
alert/update, subscribe, unsubscribe. A bad
line gets an error naming the problem and the connection stays usable.
"""
from __future__ import annotations

import asyncio
import grp
import itertools
import logging
import os
import socket
import stat
import struct
from typing import Any

from vajrad.errors import RequestError, VajraError
from vajrad.serve.hub import EventHub, Subscription
from vajrad.serve.service import VajraService
from vajrad.serve.wire import ParseError, RateLimitedLog, decode, encode, shown, shown_key

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
READ_CHUNK = 1 << 16

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = \
    -32700, -32600, -32601, -32602, -32603


def _valid_id(msg: dict) -> tuple[Any, str | None]:
    """The request's id as the reply may carry it, and what is wrong with it.
    JSON-RPC ids are strings, numbers or null; the reply to any other id
    says so with id null."""
    id_ = msg.get("id")
    if id_ is None or isinstance(id_, (str, float)) or (isinstance(id_, int) and not isinstance(id_, bool)):
        return id_, None
    return None, f"id must be a string, a number or null, got {type(id_).__name__}"


def _error(id_: Any, code: int, message: str, field: str | None = None) -> dict:
    err: dict = {"code": code, "message": message}
    if field:
        err["data"] = {"field": field}
    return {"jsonrpc": "2.0", "error": err, "id": id_}


class LineReader:
    """Splits a stream into lines, refusing (not buffering) lines over the limit."""

    def __init__(self, reader: asyncio.StreamReader, limit: int = MAX_LINE):
        self.reader, self.limit = reader, limit
        self.buf = bytearray()
        self.eof = False

    async def next(self) -> bytes | None:
        """A line without its newline, None at EOF; an over-long line raises
        RequestError after it has been skipped to its end."""
        skipping = False
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                if skipping or len(line) > self.limit:
                    raise RequestError(f"request line exceeds {self.limit} bytes", code=INVALID_REQUEST)
                return line
            if len(self.buf) > self.limit:
                skipping = True
                self.buf.clear()
            if self.eof:
                if self.buf and not skipping:
                    line = bytes(self.buf)
                    self.buf.clear()
                    return line
                return None
            chunk = await self.reader.read(READ_CHUNK)
            if not chunk:
                self.eof = True
            self.buf += chunk


class ApiServer:
    def __init__(self, path: str, service: VajraService, hub: EventHub):
        self.path, self.service, self.hub = path, service, hub
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        # Tracebacks of internal errors, at most a few a minute whatever clients send.
        self.internal_errors = RateLimitedLog(log)

    async def start(self) -> None:
        directory = os.path.dirname(self.path)
        try:
            gid = grp.getgrnam("vajra").gr_gid
        except KeyError:
            gid = -1
        if not os.path.isdir(directory):
            # Members of group vajra reach the socket through it; nobody else.
            os.makedirs(directory, mode=0o750)
            os.chmod(directory, 0o750)
            os.chown(directory, 0, gid)
        self._remove_stale()
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o660)
        os.chown(self.path, 0, gid)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise VajraError(f"api_socket: {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)       # left by a daemon that died
            return
        finally:
            probe.close()
        raise VajraError(f"api_socket: {self.path} is in use by another running vajrad")

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.server.wait_closed()
            self.server = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        conn = _Connection(self, writer)
        lines = LineReader(reader)
        try:
            while True:
                try:
                    line = await lines.next()
                except RequestError as e:
                    await conn.send(_error(None, e.code, str(e)))
                    continue
                if line is None:
                    break
                if line.strip():
                    reply = await conn.handle_line(line)
                    if reply is not None:
                        await conn.send(reply)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:        # a bug here must be seen, not left for "never retrieved" at exit
            self.internal_errors.exception("api: connection failed")
        finally:
            conn.close()
            self.connections -= 1
            self._tasks.discard(task)
            writer.close()


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The connecting process's uid, from the kernel (SO_PEERCRED): who
    triaged an alert is recorded with it, never taken from the request."""
    sock = writer.get_extra_info("socket")
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    except (OSError, AttributeError):
        return None
    return uid


class _Connection:
    def __init__(self, server: ApiServer, writer: asyncio.StreamWriter):
        self.server, self.writer = server, writer
        self.subs: dict[int, tuple[Subscription, asyncio.Task]] = {}
        self.uid = peer_uid(writer)

    async def send(self, msg: dict) -> None:
        self.writer.write(encode(msg))
        await self.writer.drain()

    def close(self) -> None:
        for sub, task in self.subs.values():
            self.server.hub.remove(sub)
            task.cancel()
        self.subs.clear()

    async def handle_line(self, line: bytes) -> dict | None:
        """The reply to one line: exactly one for a request with an id (and
        for a line that is not a request at all), none for a notification
        that succeeds."""
        try:
            msg = decode(line)
        except ParseError as e:
            return _error(None, PARSE_ERROR, f"parse error: {e}")
        if not isinstance(msg, dict):
            return _error(None, INVALID_REQUEST, "a request must be a JSON object (batches are not supported)")
        id_, bad_id = _valid_id(msg)
        if bad_id:
            return _error(None, INVALID_REQUEST, bad_id, "id")
        if msg.get("jsonrpc") != "2.0":
            return _error(id_, INVALID_REQUEST, 'jsonrpc must be "2.0"', "jsonrpc")
        method = msg.get("method")
        if not isinstance(method, str):
            return _error(id_, INVALID_REQUEST, "method must be a string", "method")
        params = msg.get("params", {})
        handler = getattr(self, "m_" + method.replace("/", "_"), None) if method.isascii() else None
        if handler is None:
            return _error(id_, METHOD_NOT_FOUND, f"unknown method {shown(method)}", "method")
        try:
            result = await handler(params)
        except RequestError as e:
            return _error(id_, e.code, str(e), e.field)
        except VajraError as e:
            return _error(id_, INTERNAL_ERROR, str(e))
        except Exception as e:  # a bug must not take the connection down
            self.server.internal_errors.exception("api: %s failed", shown(method))
            return _error(id_, INTERNAL_ERROR, f"internal error: {type(e).__name__}")
        if "id" not in msg:
            return None          # a notification gets no reply
        return {"jsonrpc": "2.0", "result": result, "id": id_}

    @staticmethod
    def _no_params(params: Any) -> None:
        if params not in ({}, [], None):
            raise RequestError("this method takes no params", "params")

    async def m_ping(self, params):
        self._no_params(params)
        return self.server.service.ping()

    async def m_status(self, params):
        self._no_params(params)
        return self.server.service.status()

    async def m_tables(self, params):
        self._no_params(params)
        return self.server.service.describe_tables()

    async def m_process_tree(self, params):
        return self.server.service.process_tree(params)

    async def m_table_read(self, params):
        return self.server.service.read_table(params)

    async def m_event_list(self, params):
        return await self.server.service.list_events(params)

    async def m_alert_update(self, params):
        return await self.server.service.update_alert(params, self.uid)

    async def m_subscribe(self, params):
        if not isinstance(params, dict):
            raise RequestError("params must be an object", "params")
        unknown = [k for k in params if k != "table"]
        if unknown:
            raise RequestError(f"unknown parameter {shown_key(unknown[0])}", shown_key(unknown[0]))
        table = self.server.service.check_table(params.get("table"))
        sub_id = next(self.server._ids)
        sub = self.server.hub.add(table)
        self.subs[sub_id] = (sub, asyncio.create_task(self._pump(sub_id, sub)))
        return {"subscription": sub_id, "table": table}

    async def m_unsubscribe(self, params):
        if not isinstance(params, dict) or "subscription" not in params:
            raise RequestError("params.subscription is required", "subscription")
        sub_id = params["subscription"]
        if isinstance(sub_id, bool) or not isinstance(sub_id, int):
            raise RequestError(f"subscription must be an integer, got {shown(sub_id)}", "subscription")
        entry = self.subs.pop(sub_id, None)
        if entry is None:
            raise RequestError(f"no subscription {shown(sub_id)} on this connection", "subscription")
        self.server.hub.remove(entry[0])
        entry[1].cancel()
        return True

    async def _pump(self, sub_id: int, sub: Subscription) -> None:
        try:
            while True:
                table, row = await sub.get()
                if sub.missed:
                    missed, sub.missed = sub.missed, 0
                    await self.send({"jsonrpc": "2.0", "method": "missed",
                                     "params": {"subscription": sub_id, "count": missed}})
                event = dict(row, table=table, is_open=bool(row.get("is_open")))
                await self.send({"jsonrpc": "2.0", "method": "event",
                                 "params": {"subscription": sub_id, "event": event}})
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:        # seen now, not as "Task exception was never retrieved" at exit
            self.server.internal_errors.exception("api: subscription %d failed", sub_id)

"""A blocking JSON-RPC client of vajrad's socket, for vajractl and the osquery shim."""
from __future__ import annotations

import itertools
import json
import os
import socket
from typing import Any, Iterator

from vajrad.errors import VajraError
from vajrad.protocol import event_list_params

DEFAULT_SOCKET = "/run/vajra/vajra.sock"


class ClientError(VajraError):
    """Could not talk to vajrad: not running, refused, or it went away."""


class RemoteError(VajraError):
    """vajrad answered with a JSON-RPC error."""

    def __init__(self, error: dict):
        self.code = error.get("code")
        self.field = (error.get("data") or {}).get("field")
        super().__init__(error.get("message", "unknown error"))


class VajraClient:
    def __init__(self, path: str | None = None, timeout: float | None = 30.0):
        self.path = path or os.environ.get("VAJRA_SOCKET") or DEFAULT_SOCKET
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(1)

    def connect(self) -> "VajraClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise ClientError(f"vajrad is not running: no socket at {self.path}") from None
        except ConnectionRefusedError:
            sock.close()
            raise ClientError(f"vajrad is not running: {self.path} refuses connections") from None
        except PermissionError:
            sock.close()
            raise ClientError(f"permission denied on {self.path}: run as root or as a member "
                              f"of group vajra") from None
        self._sock = sock
        return self

    def close(self) -> None:
        if self._sock:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def __enter__(self) -> "VajraClient":
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, msg: dict) -> None:
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            self.close()
            raise ClientError(f"lost the connection to vajrad at {self.path}: {e}") from e

    def read_message(self) -> dict:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(1 << 16)
            except socket.timeout:
                raise ClientError(f"vajrad at {self.path} did not answer in {self.timeout} s") from None
            except OSError as e:
                self.close()
                raise ClientError(f"lost the connection to vajrad at {self.path}: {e}") from e
            if not chunk:
                self.close()
                raise ClientError(f"vajrad at {self.path} closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, method: str, params: Any = None) -> Any:
        if self._sock is None:
            self.connect()
        id_ = next(self._ids)
        msg = {"jsonrpc": "2.0", "id": id_, "method": method}
        if params is not None:
            msg["params"] = params
        self._send(msg)
        while True:
            reply = self.read_message()
            if reply.get("id") != id_:
                continue        # a subscription notification interleaved
            if "error" in reply:
                raise RemoteError(reply["error"])
            return reply["result"]

    def list_events(self, flt: dict, table: str | None = None, limit: int | None = None,
                    cursor: str | None = None) -> dict:
        return self.call("event/list", event_list_params(flt, table, limit, cursor))

    def iter_events(self, flt: dict, table: str | None = None, page: int = 1000) -> Iterator[dict]:
        """Every matching event, page by page through the cursor."""
        cursor = None
        while True:
            result = self.list_events(flt, table, page, cursor)
            yield from result["events"]
            if len(result["events"]) < page:
                return
            cursor = result["cursor"]

    def subscribe(self, table: str | None = None) -> Iterator[dict]:
        """Subscribes now (not at the first next(): callers list what is stored
        after this returns, and nothing may fall between), then yields
        notifications ({"method": "event"|"missed", "params": ...}) forever."""
        params = {"table": table} if table else {}
        self.call("subscribe", params)
        self._sock.settimeout(None)      # a quiet host sends nothing for a long time
        return self._notifications()

    def _notifications(self) -> Iterator[dict]:
        while True:
            msg = self.read_message()
            if "method" in msg:
                yield msg

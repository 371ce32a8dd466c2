"""osquery's extension protocol (osquery/extensions/thrift/osquery.thrift),
declared with the thrift library's generic struct coding, so the shim needs
python3-thrift and nothing generated. Field ids and types are the wire
contract; tests/test_osquery_ext.py checks them against osquery-python's
generated stubs."""
from __future__ import annotations

import itertools
import logging
import os
import threading

from thrift.protocol.TProtocol import TProtocolException
from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.protocol import TBinaryProtocol
from thrift.transport import TSocket, TTransport

log = logging.getLogger(__name__)

EXT_SUCCESS, EXT_FAILED, EXT_FATAL = 0, 1, 2

_ROW = (TType.MAP, (TType.STRING, "UTF8", TType.STRING, "UTF8", False))
_ROWS = (TType.LIST, (TType.MAP, _ROW[1], False))


class Struct:
    """A thrift struct described by `fields`: (id, ttype, name, type args)."""
    fields: tuple = ()

    def __init_subclass__(cls):
        spec = [None] * (max((f[0] for f in cls.fields), default=-1) + 1)
        for fid, ttype, name, targs in cls.fields:
            spec[fid] = (fid, ttype, name, targs, None)
        cls.thrift_spec = tuple(spec)

    def __init__(self, **values):
        for _, _, name, _ in self.fields:
            setattr(self, name, values.get(name))

    # thrift's C codec (fastbinary) when the protocol offers it: a table of
    # a few thousand cells costs milliseconds there, tens of them in Python.
    # fastbinary wants struct type arguments as [class, spec] lists.
    def read(self, iprot) -> None:
        if getattr(iprot, "_fast_decode", None) is not None and \
                isinstance(iprot.trans, TTransport.CReadableTransport):
            iprot._fast_decode(self, iprot, [type(self), self.thrift_spec])
        else:
            iprot.readStruct(self, self.thrift_spec)

    def write(self, oprot) -> None:
        if getattr(oprot, "_fast_encode", None) is not None:
            oprot.trans.write(oprot._fast_encode(self, [type(self), self.thrift_spec]))
        else:
            oprot.writeStruct(self, self.thrift_spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for _, _, n, _ in self.fields)})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class InternalOptionInfo(Struct):
    fields = ((1, TType.STRING, "value", "UTF8"), (2, TType.STRING, "default_value", "UTF8"),
              (3, TType.STRING, "type", "UTF8"))


class InternalExtensionInfo(Struct):
    fields = ((1, TType.STRING, "name", "UTF8"), (2, TType.STRING, "version", "UTF8"),
              (3, TType.STRING, "sdk_version", "UTF8"), (4, TType.STRING, "min_sdk_version", "UTF8"))


class ExtensionStatus(Struct):
    fields = ((1, TType.I32, "code", None), (2, TType.STRING, "message", "UTF8"),
              (3, TType.I64, "uuid", None))


class ExtensionResponse(Struct):
    fields = ((1, TType.STRUCT, "status", [ExtensionStatus, ExtensionStatus.thrift_spec]),
              (2, TType.LIST, "response", _ROWS[1]))


def _args(*fields) -> type:
    return type("Args", (Struct,), {"fields": fields})


def _result(ttype=None, targs=None) -> type:
    return type("Result", (Struct,), {"fields": ((0, ttype, "success", targs),) if ttype else ()})


_STATUS = (TType.STRUCT, [ExtensionStatus, ExtensionStatus.thrift_spec])
_RESPONSE = (TType.STRUCT, [ExtensionResponse, ExtensionResponse.thrift_spec])

# method -> (args struct, result struct); `Extension` and `ExtensionManager`.
EXTENSION_METHODS = {
    "ping": (_args(), _result(*_STATUS)),
    "call": (_args((1, TType.STRING, "registry", "UTF8"), (2, TType.STRING, "item", "UTF8"),
                   (3, TType.MAP, "request", _ROW[1])), _result(*_RESPONSE)),
    "shutdown": (_args(), _result()),
}
MANAGER_METHODS = dict(EXTENSION_METHODS, **{
    "extensions": (_args(), _result(TType.MAP, (TType.I64, None, TType.STRUCT,
                                                [InternalExtensionInfo, InternalExtensionInfo.thrift_spec], False))),
    "options": (_args(), _result(TType.MAP, (TType.STRING, "UTF8", TType.STRUCT,
                                             [InternalOptionInfo, InternalOptionInfo.thrift_spec], False))),
    "registerExtension": (_args((1, TType.STRUCT, "info", [InternalExtensionInfo, InternalExtensionInfo.thrift_spec]),
                                (2, TType.MAP, "registry", (TType.STRING, "UTF8", TType.MAP,
                                                            (TType.STRING, "UTF8", TType.LIST, _ROWS[1], False),
                                                            False))),
                          _result(*_STATUS)),
    "deregisterExtension": (_args((1, TType.I64, "uuid", None)), _result(*_STATUS)),
    "query": (_args((1, TType.STRING, "sql", "UTF8")), _result(*_RESPONSE)),
    "getQueryColumns": (_args((1, TType.STRING, "sql", "UTF8")), _result(*_RESPONSE)),
})


def binary_protocol(transport):
    """TBinaryProtocol, with the C codec where python3-thrift has it."""
    return TBinaryProtocol.TBinaryProtocolAccelerated(transport)


class Client:
    """Calls a service over a thrift protocol: client.call("options")."""

    def __init__(self, protocol, methods: dict):
        self.iprot = self.oprot = protocol
        self.methods = methods
        self._seq = itertools.count(1)

    def call(self, name: str, **args):
        args_type, result_type = self.methods[name]
        seqid = next(self._seq)
        self.oprot.writeMessageBegin(name, TMessageType.CALL, seqid)
        args_type(**args).write(self.oprot)
        self.oprot.writeMessageEnd()
        self.oprot.trans.flush()
        _, mtype, _ = self.iprot.readMessageBegin()
        if mtype == TMessageType.EXCEPTION:
            err = TApplicationException()
            err.read(self.iprot)
            self.iprot.readMessageEnd()
            raise err
        result = result_type()
        result.read(self.iprot)
        self.iprot.readMessageEnd()
        if not result_type.fields:
            return None
        if result.success is None:
            raise TApplicationException(TApplicationException.MISSING_RESULT, f"{name} returned nothing")
        return result.success


class Processor:
    """Serves `methods` from `handler` (a method per name) for a thrift server."""

    def __init__(self, handler, methods: dict):
        self.handler, self.methods = handler, methods

    def process(self, iprot, oprot) -> None:
        name, _, seqid = iprot.readMessageBegin()
        entry = self.methods.get(name)
        if entry is None:
            iprot.skip(TType.STRUCT)
            iprot.readMessageEnd()
            self._fail(oprot, name, seqid, TApplicationException.UNKNOWN_METHOD, f"unknown method {name}")
            return
        args_type, result_type = entry
        args = args_type()
        try:
            args.read(iprot)
        except TProtocolException as e:
            self._fail(oprot, name, seqid, TApplicationException.PROTOCOL_ERROR, str(e))
            return
        iprot.readMessageEnd()
        try:
            value = getattr(self.handler, name)(**{n: getattr(args, n) for _, _, n, _ in args_type.fields})
        except Exception as e:  # the caller gets an error, the server keeps serving
            log.exception("osquery extension: %s failed", name)
            self._fail(oprot, name, seqid, TApplicationException.INTERNAL_ERROR, f"{name}: {e}")
            return
        oprot.writeMessageBegin(name, TMessageType.REPLY, seqid)
        (result_type(success=value) if result_type.fields else result_type()).write(oprot)
        oprot.writeMessageEnd()
        oprot.trans.flush()

    @staticmethod
    def _fail(oprot, name: str, seqid: int, code: int, message: str) -> None:
        oprot.writeMessageBegin(name, TMessageType.EXCEPTION, seqid)
        TApplicationException(code, message).write(oprot)
        oprot.writeMessageEnd()
        oprot.trans.flush()


class UnixServer:
    """Serves a thrift processor on a Unix socket, a thread per connection, and
    stops cleanly (thrift's own servers spin on a closed listening socket)."""

    def __init__(self, path: str, processor, protocol=None):
        self.path, self.processor = path, processor
        self.protocol = protocol or binary_protocol
        self.listener = TSocket.TServerSocket(unix_socket=path)
        self.stopped = threading.Event()

    def start(self) -> "UnixServer":
        self.listener.listen()
        threading.Thread(target=self._accept, name=f"thrift {self.path}", daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client = self.listener.accept()
            except Exception:
                return          # closed by stop()
            if client is not None:
                threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client) -> None:
        transport = TTransport.TBufferedTransport(client)
        proto = self.protocol(transport)
        try:
            while not self.stopped.is_set():
                self.processor.process(proto, proto)
        except (TTransport.TTransportException, EOFError, OSError):
            pass
        finally:
            transport.close()

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

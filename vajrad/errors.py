"""Typed errors. Each carries the context a reader needs to act on it."""


class VajraError(Exception):
    """Base of every error vajrad raises on purpose."""


class ConfigError(VajraError):
    """A configuration key or flag has a bad value. `key` names it."""

    def __init__(self, key: str, message: str, source: str = ""):
        self.key, self.source = key, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


class KernelSupportError(VajraError):
    """The kernel lacks something a collector needs; the message says what to install."""


class CollectorError(VajraError):
    def __init__(self, collector: str, message: str):
        self.collector = collector
        super().__init__(f"collector {collector}: {message}")


class RequestError(VajraError):
    """A bad API request. `field` names the offending parameter."""

    def __init__(self, message: str, field: str | None = None, code: int = -32602):
        self.field, self.code = field, code
        super().__init__(message)

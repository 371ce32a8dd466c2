"""What crosses the API surfaces as text: strict JSON in, valid JSON out.

Input is UTF-8 (lone surrogates, which strict UTF-8 cannot carry, are a
parse error), finite numbers only, integer literals of at most
MAX_INT_DIGITS digits and nesting Python's parser can take; anything else
is a parse error, never an exception that takes a connection down.
Output never carries NaN or Infinity, and a text that cannot be encoded
as UTF-8 (a lone surrogate sent as a "\\ud800" escape and echoed back) is
replaced, U+FFFD for each bad code point, instead of failing the reply.
"""
from __future__ import annotations

import json
import logging
import math
import re
import reprlib
import time
from typing import Any

MAX_INT_DIGITS = 4300        # Python's own limit for int(str); a longer literal is refused
SHOWN_CHARS = 80             # an echoed value in an error message is cut to about this


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")   # a pair is one code point once decoded


def has_lone_surrogate(text: str) -> bool:
    return _LONE_SURROGATE.search(text) is not None


class ParseError(ValueError):
    pass


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ParseError(f"number {text[:40]} is out of range (non-finite numbers are not JSON)")
    return value


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ParseError(f"integer literal of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise ParseError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int,
                            parse_constant=_refuse_constant)


def decode(line: bytes) -> Any:
    """One JSON value from a line; ParseError says why it is not one."""
    try:
        text = line.decode("utf-8")      # strict: surrogates encoded as bytes fail here
    except UnicodeDecodeError as e:
        raise ParseError(f"not UTF-8 at byte {e.start}: {e.reason}") from None
    try:
        return _decoder.decode(text)
    except ParseError:
        raise
    except RecursionError:
        raise ParseError("JSON nested too deeply") from None
    except ValueError as e:              # JSONDecodeError, or a literal int() refuses
        raise ParseError(str(e)) from None


def _clean(value: Any, depth: int = 0) -> Any:
    """A copy that json.dumps can encode as UTF-8 and that is strict JSON."""
    if depth > 100:
        return None
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_clean(str(k), depth + 1): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, depth + 1) for v in value]
    return value


def encode(msg: dict) -> bytes:
    """One line of strict JSON in UTF-8. Values that cannot be sent as they
    are (see _clean) are replaced rather than failing the reply."""
    try:
        return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
    except (UnicodeEncodeError, ValueError, RecursionError):
        return json.dumps(_clean(msg), separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode() + b"\n"


_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = SHOWN_CHARS
_shown.maxlevel = 3
_shown.maxlist = _shown.maxdict = _shown.maxtuple = 5
_shown.maxlong = 40


def shown(value: Any) -> str:
    """A value as an error message shows it: repr, cut short, so a request
    cannot make its reply (or the log) as large as itself."""
    try:
        return _shown.repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"


def shown_key(key: str) -> str:
    """A key as a field path shows it, cut short."""
    return key if len(key) <= SHOWN_CHARS else key[:SHOWN_CHARS] + "..."


class RateLimitedLog:
    """At most `burst` records per `period` seconds; what is held back is
    counted and said with the next record let through, so input that
    provokes errors cannot flood the log."""

    def __init__(self, logger: logging.Logger, burst: int = 5, period: float = 60.0):
        self.logger, self.burst, self.period = logger, burst, period
        self.window_start = -period
        self.in_window = 0
        self.suppressed = 0
        self.total = 0

    def exception(self, message: str, *args: Any) -> None:
        self.total += 1
        now = time.monotonic()
        if now - self.window_start >= self.period:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return
        self.in_window += 1
        if self.suppressed:
            message += f" ({self.suppressed} similar errors not logged)"
            self.suppressed = 0
        self.logger.exception(message, *args)

"""The protobuf wire format, just enough for the CRI calls vajrad makes.

No generated stubs: a CRI message here is built from field numbers (public
facts of kubernetes/cri-api's api.proto, named where they are used in
vajrad/enrich/cri.py) and read back into {field number: [values]}. Unknown
fields are skipped, as protobuf requires, so newer runtimes that add fields
decode the same.

Wire types: 0 varint, 1 fixed64, 2 length-delimited (strings, bytes,
messages, packed repeated, map entries), 5 fixed32. Groups (3, 4) are
obsolete and not used by CRI: a message containing one is rejected.
"""
from __future__ import annotations

from vajrad.errors import VajraError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class ProtoError(VajraError):
    """Bytes that are not a well-formed protobuf message."""


# --- encoding ------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    """A base-128 varint; negative numbers as 64-bit two's complement (int32/int64)."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def uint(number: int, value: int) -> bytes:
    """A varint field (int32, int64, uint64, bool, enum); proto3 omits zero."""
    return key(number, VARINT) + varint(int(value)) if value else b""


def string(number: int, value: str | bytes) -> bytes:
    """A string, bytes or embedded-message field; proto3 omits empty strings."""
    data = value.encode() if isinstance(value, str) else value
    return key(number, LENGTH) + varint(len(data)) + data if data else b""


def message(number: int, *parts: bytes) -> bytes:
    """An embedded message field, present even when all its fields are default
    (a present empty message is not the same as an absent one)."""
    data = b"".join(parts)
    return key(number, LENGTH) + varint(len(data)) + data


def string_map(number: int, values: dict[str, str]) -> bytes:
    """map<string, string>: one entry message (key = 1, value = 2) per pair."""
    return b"".join(message(number, string(1, k), string(2, v)) for k, v in values.items())


def repeated_string(number: int, values) -> bytes:
    return b"".join(key(number, LENGTH) + varint(len(v.encode())) + v.encode() for v in values)


# --- decoding ------------------------------------------------------------------------------
def _varint_at(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtoError("varint longer than 10 bytes")


def parse(buf: bytes) -> dict[int, list]:
    """{field number: [values in order]}: ints for varint and fixed fields,
    bytes for length-delimited ones (decode them with text() or parse())."""
    fields: dict[int, list] = {}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint_at(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ProtoError(f"field number 0 at byte {pos}")
        if wire == VARINT:
            value, pos = _varint_at(buf, pos)
        elif wire == LENGTH:
            size, pos = _varint_at(buf, pos)
            if pos + size > end:
                raise ProtoError(f"field {number}: {size} bytes past the end of a {end}-byte message")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        elif wire == FIXED64:
            if pos + 8 > end:
                raise ProtoError(f"field {number}: truncated fixed64")
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == FIXED32:
            if pos + 4 > end:
                raise ProtoError(f"field {number}: truncated fixed32")
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ProtoError(f"field {number}: wire type {wire} (groups are not used by this API)")
        fields.setdefault(number, []).append(value)
    return fields


def signed(value: int) -> int:
    """An int32/int64 field's value: varints carry negatives as 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def integer(fields: dict, number: int) -> int:
    """The last value of a scalar varint field (proto3: the last one wins), signed; 0 if absent."""
    values = fields.get(number)
    return signed(values[-1]) if values else 0


def text(fields: dict, number: int) -> str:
    values = fields.get(number)
    return values[-1].decode("utf-8", "replace") if values else ""


def sub(fields: dict, number: int) -> dict:
    """An embedded message field, parsed; {} when absent (all defaults)."""
    values = fields.get(number)
    if not values:
        return {}
    if len(values) == 1:
        return parse(values[0])
    return parse(b"".join(values))      # repeated occurrences of a message field merge


def repeated(fields: dict, number: int) -> list[dict]:
    """A repeated message field, each parsed."""
    return [parse(v) for v in fields.get(number, [])]


def str_map(fields: dict, number: int) -> dict[str, str]:
    """A map<string, string> field."""
    out = {}
    for entry in fields.get(number, []):
        e = parse(entry)
        out[text(e, 1)] = text(e, 2)
    return out

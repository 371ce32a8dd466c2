"""The protobuf wire codec vajrad speaks CRI with (vajrad/enrich/protowire.py),
on bytes: the examples of the protobuf encoding guide, the edge cases of
varints, unknown and repeated fields, and malformed input."""
from __future__ import annotations

import pytest

from vajrad.enrich import protowire as pw


def test_encoding_guide_examples():
    # "message Test1 { int32 a = 1; }" with a = 150, and "Test2 { string b = 2; }" with "testing".
    assert pw.uint(1, 150) == bytes.fromhex("089601")
    assert pw.parse(bytes.fromhex("089601")) == {1: [150]}
    assert pw.string(2, "testing") == bytes.fromhex("120774657374696e67")
    assert pw.text(pw.parse(bytes.fromhex("120774657374696e67")), 2) == "testing"
    # "Test3 { Test1 c = 3; }" with c.a = 150
    assert pw.message(3, pw.uint(1, 150)) == bytes.fromhex("1a03089601")
    assert pw.sub(pw.parse(bytes.fromhex("1a03089601")), 3) == {1: [150]}


def test_varints():
    for n in (0, 1, 127, 128, 300, 2**32, 2**63 - 1):
        assert pw.parse(pw.key(1, pw.VARINT) + pw.varint(n)) == {1: [n]}
    # int32/int64 -1: ten bytes of two's complement
    assert pw.varint(-1) == b"\xff" * 9 + b"\x01"
    assert pw.integer(pw.parse(b"\x38" + pw.varint(-1)), 7) == -1
    assert pw.integer(pw.parse(b"\x38" + pw.varint(137)), 7) == 137
    # proto3: zero and empty are not sent; absent reads as the default
    assert pw.uint(1, 0) == b"" and pw.string(1, "") == b""
    assert (pw.integer({}, 1), pw.text({}, 1), pw.sub({}, 1), pw.str_map({}, 1)) == (0, "", {}, {})
    # an empty message is present
    assert pw.message(2) == b"\x12\x00" and pw.parse(b"\x12\x00") == {2: [b""]}


def test_unknown_fixed_and_repeated_fields():
    buf = (pw.string(1, "id") + bytes.fromhex("19") + (7).to_bytes(8, "little")   # field 3, fixed64
           + bytes.fromhex("25") + (9).to_bytes(4, "little")                      # field 4, fixed32
           + pw.string(1, "again") + pw.uint(9, 5))
    fields = pw.parse(buf)
    assert fields[3] == [7] and fields[4] == [9] and fields[9] == [5]
    assert pw.text(fields, 1) == "again"          # a scalar given twice: the last wins
    assert [pw.text(m, 1) for m in pw.repeated(pw.parse(pw.message(5, pw.string(1, "a")) +
                                                         pw.message(5, pw.string(1, "b"))), 5)] == ["a", "b"]
    # a message field given twice merges
    merged = pw.parse(pw.message(2, pw.string(1, "x")) + pw.message(2, pw.uint(2, 3)))
    assert pw.sub(merged, 2) == {1: [b"x"], 2: [3]}


def test_string_maps_and_repeated_strings():
    labels = {"io.kubernetes.pod.name": "web", "tier": "", "ünï": "cödé"}
    assert pw.str_map(pw.parse(pw.string_map(8, labels)), 8) == labels
    # map entry as protoc writes it: key = 1, value = 2
    assert pw.string_map(1, {"a": "b"}) == bytes.fromhex("0a060a0161120162")
    assert pw.parse(pw.repeated_string(3, ["/bin/sh", "-c"]))[3] == [b"/bin/sh", b"-c"]


@pytest.mark.parametrize("bad, why", [
    (b"\x08", "truncated varint"),
    (b"\x08" + b"\x80" * 11, "longer than 10 bytes"),
    (b"\x12\x05abc", "past the end"),
    (b"\x19\x01\x02", "truncated fixed64"),
    (b"\x25\x01", "truncated fixed32"),
    (b"\x0b", "wire type 3"),
    (b"\x00\x01", "field number 0"),
])
def test_malformed_input_is_a_typed_error(bad, why):
    with pytest.raises(pw.ProtoError, match=why):
        pw.parse(bad)

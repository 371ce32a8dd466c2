"""Struct member offsets read from the running kernel's BTF.

Offsets compiled from mismatched kernel headers are wrong (on 6.18 with 6.1
headers, task->real_parent->tgid read as 0), so every kernel struct the BPF
programs dereference is located through /sys/kernel/btf/vmlinux instead.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from vajrad.errors import KernelSupportError

BTF_MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION = 1, 2, 3, 4, 5
KIND_ENUM, KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST = 6, 7, 8, 9, 10
KIND_RESTRICT, KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC = 11, 12, 13, 14, 15
KIND_FLOAT, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 16, 17, 18, 19

# Bytes that follow the common 12-byte type header: (fixed, per vlen entry).
_TRAILER = {
    KIND_INT: (4, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12), KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8), KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0), KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


class Btf:
    """A lazily decoded BTF blob: one pass indexes type positions, members are
    decoded only for the structs somebody asks about."""

    def __init__(self, blob: bytes, source: str = "<blob>"):
        self.source = source
        if len(blob) < 24:
            raise KernelSupportError(f"{source}: too short to be BTF")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != BTF_MAGIC:
            raise KernelSupportError(f"{source}: bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._blob = blob
        self._types_start = hdr_len + type_off
        self._strs_start = hdr_len + str_off
        self._strs_end = self._strs_start + str_len
        # Type ids start at 1; id 0 is void.
        self._pos: list[int] = [0]
        self._by_name: dict[tuple[int, str], int] = {}
        self._index(self._types_start, self._types_start + type_len)

    @classmethod
    def from_file(cls, path: str = "/sys/kernel/btf/vmlinux") -> "Btf":
        try:
            with open(path, "rb") as f:
                return cls(f.read(), path)
        except OSError as e:
            raise KernelSupportError(f"cannot read kernel BTF at {path}: {e.strerror}") from e

    def _index(self, pos: int, end: int) -> None:
        blob, unpack = self._blob, struct.unpack_from
        trailer, append = _TRAILER, self._pos.append
        wanted = (KIND_STRUCT, KIND_UNION)
        while pos < end:
            name_off, info = unpack("<II", blob, pos)
            kind = (info >> 24) & 0x1F
            append(pos)
            if kind in wanted and name_off:
                self._by_name.setdefault((kind, self._str(name_off)), len(self._pos) - 1)
            fixed, per = trailer.get(kind, (0, 0))
            pos += 12 + fixed + per * (info & 0xFFFF)

    def _str(self, off: int) -> str:
        start = self._strs_start + off
        return self._blob[start:self._blob.index(b"\0", start, self._strs_end)].decode()

    def _header(self, type_id: int) -> tuple[int, int, int, int]:
        pos = self._pos[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._blob, pos)
        return pos, (info >> 24) & 0x1F, info, size_or_type

    def struct_id(self, name: str) -> int:
        for kind in (KIND_STRUCT, KIND_UNION):
            tid = self._by_name.get((kind, name))
            if tid is not None:
                return tid
        raise KernelSupportError(f"{self.source}: no struct {name} in kernel BTF")

    def members(self, type_id: int) -> list[Member]:
        pos, kind, info, _ = self._header(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise KernelSupportError(f"{self.source}: type {type_id} is not a struct")
        bitfield_layout = bool(info >> 31)
        out = []
        for i in range(info & 0xFFFF):
            name_off, mtype, offset = struct.unpack_from("<III", self._blob, pos + 12 + 12 * i)
            bit_offset = offset & 0xFFFFFF if bitfield_layout else offset
            out.append(Member(self._str(name_off) if name_off else "", mtype, bit_offset))
        return out

    def resolve(self, type_id: int) -> int:
        """Strips typedefs and qualifiers."""
        while True:
            _, kind, _, ref = self._header(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = ref

    def size(self, type_id: int) -> int:
        type_id = self.resolve(type_id)
        _, kind, _, size = self._header(type_id)
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _index, count = struct.unpack_from("<III", self._blob, self._pos[type_id] + 12)
            return self.size(elem) * count
        return size

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(byte offset, member type) of `name`, looking through anonymous
        structs and unions the way C does."""
        for m in self.members(self.resolve(type_id)):
            if m.name == name:
                return m.bit_offset // 8, m.type_id
            if not m.name:
                inner = self.resolve(m.type_id)
                if self._header(inner)[1] in (KIND_STRUCT, KIND_UNION):
                    found = self._find_member(inner, name)
                    if found is not None:
                        return m.bit_offset // 8 + found[0], found[1]
        return None

    def offsetof(self, struct_name: str, member_path: str) -> int:
        """Byte offset of a dotted member path, e.g. ("fs_struct", "pwd.dentry")."""
        type_id, total = self.struct_id(struct_name), 0
        for part in member_path.split("."):
            found = self._find_member(type_id, part)
            if found is None:
                raise KernelSupportError(
                    f"{self.source}: struct {struct_name} has no member {member_path}")
            total += found[0]
            type_id = found[1]
        return total

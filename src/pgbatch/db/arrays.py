"""Array parameters packed in one pass: uuid[] and text[] in PostgreSQL's binary format.

psycopg's generic list dumper finds the element type and calls a Python dumper for
every element; for the writer's flushes (seven arrays per statement) that was about
150 µs of client CPU per flush of 20 documents. Wrapping a list in `UuidArray` or
`TextArray` sends the same array, built with one join.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

from psycopg import adapters, postgres
from psycopg.adapt import Dumper
from psycopg.pq import Format

__all__ = ["TextArray", "UuidArray"]

UUID_OID = postgres.types["uuid"].oid
TEXT_OID = postgres.types["text"].oid
_HEADER = struct.Struct("!iiiii")  # ndim, has-nulls flag, element oid, length, lower bound
_EMPTY = struct.Struct("!iii")  # ndim 0, has-nulls flag, element oid
_LENGTH = struct.Struct("!i")
_UUID_LENGTH = _LENGTH.pack(16)


class UuidArray(list[uuid.UUID]):
    """A list of UUIDs sent as a binary uuid[] parameter (no NULLs)."""


class TextArray(list[str]):
    """A list of strings sent as a binary text[] parameter (no NULLs)."""


def _array(element_oid: int, length: int, body: bytes) -> bytes:
    if not length:
        return _EMPTY.pack(0, 0, element_oid)
    return _HEADER.pack(1, 0, element_oid, length, 1) + body


class UuidArrayDumper(Dumper):
    """Dump a UuidArray as one binary uuid[]."""

    format = Format.BINARY
    oid = postgres.types["uuid"].array_oid

    def dump(self, obj: Any) -> bytes:
        """Return the binary array: a header, then length 16 and the bytes of each UUID."""
        return _array(UUID_OID, len(obj), _UUID_LENGTH + _UUID_LENGTH.join(u.bytes for u in obj))


class TextArrayDumper(Dumper):
    """Dump a TextArray as one binary text[]."""

    format = Format.BINARY
    oid = postgres.types["text"].array_oid

    def dump(self, obj: Any) -> bytes:
        """Return the binary array: a header, then the length and UTF-8 bytes of each string."""
        encoded = [text.encode() for text in obj]
        pack = _LENGTH.pack
        return _array(TEXT_OID, len(obj), b"".join(pack(len(e)) + e for e in encoded))


adapters.register_dumper(UuidArray, UuidArrayDumper)
adapters.register_dumper(TextArray, TextArrayDumper)

"""The JSON values pgbatch stores: finite numbers and 64-bit integers, kept exactly.

Items and documents are stored as jsonb and encoded with orjson, which writes NaN and
±Infinity as `null` and refuses integers beyond 64 bits, while parsing such an integer
gives a rounded float (123456789012345678901234567890 → 1.2345678901234568e+29). So
nothing is ever stored as something else, every way in holds one rule: a number is
finite, and an integer lies in INT_MIN … INT_MAX (what orjson round-trips exactly);
anything else is refused with the path of the offending value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

__all__ = ["INT_MAX", "INT_MIN", "JsonValueError", "check_value", "field_of", "loads"]

# What orjson encodes and parses exactly: int64 and uint64 together.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
# An integer outside INT_MIN … INT_MAX has at least 19 digits (2**63 has 19). A document
# without such a run of digits cannot hold one, so only those pay the exact second parse.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")

Path = tuple[str | int, ...]


class JsonValueError(ValueError):
    """A value JSON cannot hold exactly; `path` locates it (keys and list indexes)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def field_of(path: Path) -> str:
    """Return a path as the dotted field name the API reports (`items.3.price`)."""
    return ".".join(str(part) for part in path)


def check_value(value: Any, path: Path = ()) -> None:
    """Raise JsonValueError at the first non-finite float or integer beyond 64 bits."""
    # Iterative: an item nested deeper than Python's recursion limit is still checked.
    stack: list[tuple[Any, Path]] = [(value, path)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, float):
            if not math.isfinite(current):
                raise JsonValueError(
                    f"{field_of(where) or 'value'}: {current!r} is not a JSON number "
                    "(it would be stored as null)",
                    where,
                )
        elif isinstance(current, int) and not isinstance(current, bool):
            if not INT_MIN <= current <= INT_MAX:
                raise JsonValueError(_too_big(where), where)
        elif isinstance(current, dict):
            stack.extend((v, (*where, str(k))) for k, v in reversed(current.items()))
        elif isinstance(current, list | tuple):
            stack.extend((v, (*where, i)) for i, v in reversed(list(enumerate(current))))


def _too_big(where: Path) -> str:
    return (
        f"{field_of(where) or 'value'}: integers must lie in {INT_MIN} … {INT_MAX} "
        "(64 bits); send a larger one as a string"
    )


class _Huge(int):
    """An integer literal beyond 64 bits, marked by the exact parse so it can be located."""


def _parse_int(text: str) -> int:
    number = int(text)
    return number if INT_MIN <= number <= INT_MAX else _Huge(number)


def loads(data: bytes | str) -> Any:
    """Parse JSON as orjson does, refusing an integer it would round (JsonValueError).

    orjson already refuses NaN, Infinity and numbers that overflow a double (1e400):
    those raise orjson.JSONDecodeError, as any invalid JSON does.
    """
    value = orjson.loads(data)
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_DIGITS.search(raw):
        _locate_huge(raw)
    return value


def _locate_huge(raw: bytes) -> None:
    # The standard library parses integers exactly; it runs only as a locator, after
    # orjson accepted the text, so both always agree on what is valid JSON.
    try:
        exact = json.loads(raw, parse_int=_parse_int)
    except (ValueError, RecursionError):
        # Nested deeper than the standard parser goes: refuse rather than store a rounding.
        raise JsonValueError(
            "the JSON nests too deep to check its long integers; nest it less", ()
        ) from None
    stack: list[tuple[Any, Path]] = [(exact, ())]
    while stack:
        current, where = stack.pop()
        if isinstance(current, _Huge):
            raise JsonValueError(_too_big(where), where)
        if isinstance(current, dict):
            stack.extend((v, (*where, k)) for k, v in reversed(current.items()))
        elif isinstance(current, list):
            stack.extend((v, (*where, i)) for i, v in reversed(list(enumerate(current))))

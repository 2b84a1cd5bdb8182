"""A batch's name and metadata: the bounds and the checks shared by the library and the API.

Metadata follows OpenAI's batch objects: a flat object of string keys and string values,
at most MAX_METADATA_KEYS of them. Strings only, so that a filter `key:value` means one
thing (no "1" vs 1) and containment in PostgreSQL (`metadata @> '{"k": "v"}'`) is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pgbatch.errors import InvalidBatchError

__all__ = [
    "MAX_METADATA_KEYS",
    "MAX_METADATA_KEY_CHARS",
    "MAX_METADATA_VALUE_CHARS",
    "MAX_NAME_CHARS",
    "METADATA_FILTER_SEPARATOR",
    "LabelChange",
    "check_metadata",
    "check_name",
    "is_utf8",
    "parse_metadata_pair",
]

# OpenAI's bounds for batch metadata (16 pairs, 64-character keys, 512-character values):
# a client written for theirs fits ours, and a row stays a few KB at most.
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# A name is a label for people and lists; 256 characters is a long sentence.
MAX_NAME_CHARS = 256
# A filter pair is "key:value", split at the first separator: a key cannot hold one.
METADATA_FILTER_SEPARATOR = ":"


@dataclass(frozen=True, slots=True)
class LabelChange:
    """A client's change of a batch's labels: a new name (None clears it) when `set_name`,
    and new metadata (replacing the old) unless None."""

    set_name: bool = False
    name: str | None = None
    metadata: Mapping[str, str] | None = None

    def checked(self) -> LabelChange:
        """Return the change with its name and metadata checked (InvalidBatchError if not)."""
        return LabelChange(
            self.set_name,
            check_name(self.name) if self.set_name else None,
            None if self.metadata is None else check_metadata(self.metadata),
        )


def _has_nul(text: str) -> bool:
    # PostgreSQL text and jsonb cannot hold NUL, nor a lone surrogate (what Python makes
    # of a command-line argument that is not UTF-8): refused here, not a database error.
    return "\x00" in text or not is_utf8(text)


def is_utf8(text: str) -> bool:
    """Tell whether `text` encodes as UTF-8 (no lone surrogates), as PostgreSQL needs."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_name(name: object) -> str | None:
    """Return `name` if it is a valid batch name (or None); raise InvalidBatchError if not."""
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip():
        raise InvalidBatchError("name must be a non-blank string", field="name")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidBatchError(f"name must be at most {MAX_NAME_CHARS} characters", field="name")
    if _has_nul(name):
        raise InvalidBatchError("name must not contain NUL or non-UTF-8 characters", field="name")
    return name


def check_metadata(metadata: object) -> dict[str, str]:
    """Return `metadata` as a dict of strings (None: empty); raise InvalidBatchError naming
    the offending key (`metadata.<key>`) if it breaks a bound."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidBatchError(
            "metadata must be an object of string keys and string values", field="metadata"
        )
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidBatchError(
            f"metadata holds at most {MAX_METADATA_KEYS} keys, not {len(metadata)}",
            field="metadata",
        )
    checked: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METADATA_KEY_CHARS:
            raise InvalidBatchError(
                f"metadata keys must be 1 to {MAX_METADATA_KEY_CHARS} characters",
                field="metadata",
            )
        field = f"metadata.{key}"
        if METADATA_FILTER_SEPARATOR in key or _has_nul(key):
            raise InvalidBatchError(
                f"metadata key {key!r} must not contain {METADATA_FILTER_SEPARATOR!r}, NUL "
                "or non-UTF-8 characters",
                field=field,
            )
        if not isinstance(value, str):
            raise InvalidBatchError(
                f"metadata value of {key!r} must be a string, not {type(value).__name__}",
                field=field,
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidBatchError(
                f"metadata value of {key!r} must be at most {MAX_METADATA_VALUE_CHARS} characters",
                field=field,
            )
        if _has_nul(value):
            raise InvalidBatchError(
                f"metadata value of {key!r} must not contain NUL or non-UTF-8 characters",
                field=field,
            )
        checked[key] = value
    return checked


def parse_metadata_pair(pair: str, *, field: str = "metadata") -> tuple[str, str]:
    """Split a `key:value` filter or option at its first colon; raise InvalidBatchError if
    it has none or an empty key."""
    key, separator, value = pair.partition(METADATA_FILTER_SEPARATOR)
    if not separator or not key:
        raise InvalidBatchError(f"{field}: expected key:value, got {pair!r}", field=field)
    if _has_nul(pair):
        raise InvalidBatchError(
            f"{field}: {pair!r} must not contain NUL or non-UTF-8 characters", field=field
        )
    return key, value

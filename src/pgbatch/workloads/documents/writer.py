"""Documents: identities hashed to keys, bodies upserted with their references, set-based.

A document has a natural identity such as {"type": "student", "id": "S-1"}; its key is
a UUIDv5 of that identity, so anyone can compute it without the database. It references
other documents by their identities. Posting an identity again replaces its body and its
references, under the same rule: every reference must point at a document.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from pgbatch import json_values
from pgbatch.db.database import Database
from pgbatch.workloads.documents.queries import (
    DocumentRow,
    DocumentSink,
    StoredDocument,
    create_document_tables,
    get_document,
)
from pgbatch.writer.errors import InvalidDocumentError
from pgbatch.writer.models import WriteItem, WriteOutcome
from pgbatch.writer.writer import (
    DEFAULT_LANES,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_DELAY_MS,
    Writer,
)

__all__ = [
    "DEFAULT_PARTITION",
    "DOCUMENT_NAMESPACE",
    "DocumentRow",
    "DocumentSink",
    "DocumentWriter",
    "Identity",
    "StoredDocument",
    "create_document_tables",
    "document_item",
    "document_key",
    "get_document",
]

# The namespace of every document key. Fixed forever: changing it changes every key.
DOCUMENT_NAMESPACE = uuid.UUID("6377e603-2131-48fb-a260-3fca85e99356")
# Documents posted without a partition share this one, hence one lane: references
# between documents posted at the same moment resolve only inside one flush, so only
# callers who know their documents' partitions (tenant, school …) should spread them.
DEFAULT_PARTITION = "default"
# Keys of recently seen canonical identities. A document's references name a few
# documents over and over (a teacher, a school), and uuid.uuid5 costs 4 µs a call, more
# than the rest of building a reference; 65,536 entries are a few MiB.
KEY_CACHE_SIZE = 65_536

# SHA-1 state after the namespace's bytes: each key hashes only its name on top of it.
_NAMESPACE_SHA1 = hashlib.sha1(DOCUMENT_NAMESPACE.bytes, usedforsecurity=False)
# RFC 4122 version 5 and variant bits of the 128-bit key (what uuid.uuid5 sets).
_VERSION_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_VERSION_5 = (0x5000 << 64) | (0x8000 << 48)

Identity = Mapping[str, str | int]


def _canonical(identity: Identity) -> str:
    if not isinstance(identity, Mapping):
        raise InvalidDocumentError(f"an identity is a mapping, not {type(identity).__name__}")
    kind = identity.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidDocumentError(f"an identity needs a non-empty string 'type': {identity!r}")
    for name, value in identity.items():
        if not isinstance(name, str) or isinstance(value, bool):
            raise InvalidDocumentError(f"identity fields are strings or integers: {identity!r}")
        if not isinstance(value, str | int):
            raise InvalidDocumentError(f"identity fields are strings or integers: {identity!r}")
    try:
        return orjson.dumps(identity, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError as exc:  # a lone surrogate, say
        raise InvalidDocumentError(f"the identity is not valid text: {exc}") from exc


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def _key_of(canonical: str) -> uuid.UUID:
    """Return uuid.uuid5(DOCUMENT_NAMESPACE, canonical), twice as fast (a test compares them)."""
    sha1 = _NAMESPACE_SHA1.copy()
    sha1.update(canonical.encode())
    number = int.from_bytes(sha1.digest()[:16])
    return uuid.UUID(int=(number & _VERSION_CLEAR) | _VERSION_5)


def document_key(identity: Identity) -> uuid.UUID:
    """Return the key of the document with this identity: a UUIDv5 of its canonical JSON."""
    return _key_of(_canonical(identity))


def document_item(
    identity: Identity,
    body: Any,
    *,
    references: Iterable[Identity] = (),
    partition: str | None = None,
) -> WriteItem[uuid.UUID, DocumentRow]:
    """Return the writer item of one document; raise InvalidDocumentError if it cannot be."""
    canonical = _canonical(identity)
    if partition is not None and not _is_text(partition):
        raise InvalidDocumentError(f"the partition must be a string of valid text: {partition!r}")
    try:
        body_json = orjson.dumps(body).decode()
    except TypeError as exc:
        _check_body(body)  # an integer beyond 64 bits: say where
        raise InvalidDocumentError(
            f"the body is not JSON-serialisable: {exc}", field="body"
        ) from exc
    if "null" in body_json:
        # orjson writes NaN and ±Infinity as null: only a body with a null can hide one.
        _check_body(body)
    return WriteItem(
        key=_key_of(canonical),
        payload=DocumentRow(str(identity["type"]), canonical, body_json),
        references=frozenset(document_key(ref) for ref in references),
        partition=DEFAULT_PARTITION if partition is None else partition,
    )


def _check_body(body: Any) -> None:
    try:
        json_values.check_value(body, ("body",))
    except json_values.JsonValueError as exc:
        raise InvalidDocumentError(str(exc), field=json_values.field_of(exc.path)) from None


def _is_text(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class DocumentWriter(Writer[uuid.UUID, DocumentRow]):
    """Post single documents; concurrent posts are group-committed by a Writer."""

    def __init__(
        self,
        db: Database,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
        lanes: int = DEFAULT_LANES,
        max_queue: int | None = None,
    ) -> None:
        super().__init__(
            db,
            DocumentSink(),
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            lanes=lanes,
            max_queue=max_queue,
            name="documents",
        )

    async def post(
        self,
        identity: Identity,
        body: Any,
        *,
        references: Iterable[Identity] = (),
        partition: str | None = None,
    ) -> WriteOutcome[uuid.UUID]:
        """Write one document; return its outcome once it committed (or was rejected)."""
        item = document_item(identity, body, references=references, partition=partition)
        return await self.write(item)

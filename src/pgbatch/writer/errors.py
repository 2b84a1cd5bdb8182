"""Errors of the writer, under the pgbatch tree.

PgbatchError
├── WriterClosedError      the writer is stopped; nothing was queued
├── WriteFailedError       the flush failed as a whole (database unreachable …); safe to retry
└── InvalidDocumentError   a document is malformed (ValueError); nothing was queued

A rejected item or a conflict is not an error: `write` returns it as a WriteOutcome.
"""

from __future__ import annotations

from pgbatch.errors import PgbatchError

__all__ = ["InvalidDocumentError", "WriteFailedError", "WriterClosedError"]


class WriterClosedError(PgbatchError):
    """The writer is stopped and accepts nothing more; the item was not queued."""


class WriteFailedError(PgbatchError):
    """The item's flush failed as a whole; it may or may not have committed.

    Writes are upserts keyed by the item's key, so sending the same item again is safe.
    """


class InvalidDocumentError(PgbatchError, ValueError):
    """A document cannot be written as given (identity or body); the message says why.

    `field` names the offending part when it is known ("body.price"), for an API to report.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

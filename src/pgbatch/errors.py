"""The pgbatch exception tree, and the translation of database errors into it.

PgbatchError
├── ConfigurationError        settings or environment are unusable
│   └── RegistrationError     a task or callback cannot be registered as written
├── MigrationError            the schema cannot be brought up to date
├── InvalidBatchError         a submission is malformed; nothing was written
│   ├── UnknownTaskError      the task name is not registered
│   ├── ItemNotSerializableError
│   └── ShardTooLargeError    a shard's items hold more bytes than max_shard_bytes
├── IdempotencyConflictError  same idempotency key, different payload
├── BatchNotFoundError
│   └── BatchPrunedError      it existed, and was removed after its retention period
├── StaleVersionError         optimistic update against an old version
└── InvalidStateError         the batch's status does not allow the operation

Snooze (not an error: a handler's request to put its shard back for a while)
"""

from __future__ import annotations

from datetime import datetime

__all__ = [
    "BatchNotFoundError",
    "BatchPrunedError",
    "ConfigurationError",
    "IdempotencyConflictError",
    "InvalidBatchError",
    "InvalidStateError",
    "ItemNotSerializableError",
    "MigrationError",
    "NonRetryableError",
    "PgbatchError",
    "RegistrationError",
    "ShardTooLargeError",
    "Snooze",
    "StaleVersionError",
    "UnknownTaskError",
]


class PgbatchError(Exception):
    """Base of every error pgbatch raises on purpose."""


class ConfigurationError(PgbatchError):
    """Settings or environment are unusable; the message says which and how to fix it."""


class RegistrationError(ConfigurationError):
    """A task or callback cannot be registered as written (not async, a name taken twice)."""


class MigrationError(PgbatchError):
    """The database schema cannot be brought up to date."""


class InvalidBatchError(PgbatchError, ValueError):
    """A submission is malformed; nothing was written.

    `field` names the offending argument, so an API can report it.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownTaskError(InvalidBatchError):
    """The task name is not registered with this app."""


class ItemNotSerializableError(InvalidBatchError):
    """An item cannot be stored as JSON; `seq` is its position in the input."""

    def __init__(self, message: str, *, seq: int, field: str = "items") -> None:
        super().__init__(message, field=field)
        self.seq = seq


class ShardTooLargeError(InvalidBatchError):
    """One shard's items hold more JSON bytes than `limit_bytes`; use a smaller shard_size.

    A worker reads a shard's items as one value, which PostgreSQL caps at 1 GB: a shard
    past that could never be claimed, so it is refused at submit.
    """

    def __init__(self, message: str, *, limit_bytes: int, shard_no: int) -> None:
        super().__init__(message, field="items")
        self.limit_bytes = limit_bytes
        self.shard_no = shard_no


class IdempotencyConflictError(PgbatchError):
    """The idempotency key was used before with a different payload."""

    def __init__(self, message: str, *, batch_id: int) -> None:
        super().__init__(message)
        self.batch_id = batch_id


class BatchNotFoundError(PgbatchError, LookupError):
    """No batch has that id."""


class BatchPrunedError(BatchNotFoundError):
    """The batch finished and was removed after its retention period (HTTP 410)."""

    def __init__(self, message: str, *, batch_id: int, pruned_at: datetime) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.pruned_at = pruned_at


class StaleVersionError(PgbatchError):
    """The batch changed since the caller read it; re-read and retry."""

    def __init__(self, message: str, *, current_version: int) -> None:
        super().__init__(message)
        self.current_version = current_version


class InvalidStateError(PgbatchError):
    """The batch's status does not allow the operation."""


class NonRetryableError(PgbatchError):
    """Raised by a handler: the shard's failure is deterministic, so do not retry it.

    The shard is dead at once, with this error as its items' result, whatever attempts
    remain (a bug in the handler or in the input is not fixed by running it again).
    """


class Snooze(Exception):
    """Raised by a handler: put the shard back in the queue for `seconds`, attempt not charged.

    For a handler that cannot start yet (a shared rate limit is spent, an upstream paused
    the key): the shard is queued again, claimable after `seconds`, and the claim's
    attempt is given back. It goes through the completer's fenced flush, so a worker that
    lost the lease snoozes nothing; statements queued with `ctx.execute_at_commit()`
    commit with it (to give back what the handler reserved). Results are not written.
    """

    def __init__(self, seconds: float, reason: str = "snoozed") -> None:
        """Ask for the shard to be claimable again in `seconds` (>= 0)."""
        if not (seconds >= 0 and seconds < float("inf")):
            raise ValueError(f"Snooze seconds must be a finite number >= 0, not {seconds!r}")
        super().__init__(f"{reason} (for {seconds:.3g} s)")
        self.seconds = float(seconds)
        self.reason = reason

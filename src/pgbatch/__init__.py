"""pgbatch: run very large batches of work durably on PostgreSQL alone."""

from pgbatch.app import App
from pgbatch.config import Settings
from pgbatch.engine.context import CallbackContext, ShardContext
from pgbatch.engine.worker import Worker
from pgbatch.errors import (
    BatchNotFoundError,
    ConfigurationError,
    IdempotencyConflictError,
    InvalidBatchError,
    InvalidStateError,
    ItemNotSerializableError,
    MigrationError,
    NonRetryableError,
    PgbatchError,
    RegistrationError,
    ShardTooLargeError,
    Snooze,
    StaleVersionError,
    UnknownTaskError,
)
from pgbatch.models import Batch, BatchStatus, Item, Outcome, ShardStatus, error, ok

__all__ = [
    "App",
    "Batch",
    "BatchNotFoundError",
    "BatchStatus",
    "CallbackContext",
    "ConfigurationError",
    "IdempotencyConflictError",
    "InvalidBatchError",
    "InvalidStateError",
    "Item",
    "ItemNotSerializableError",
    "MigrationError",
    "NonRetryableError",
    "Outcome",
    "PgbatchError",
    "RegistrationError",
    "Settings",
    "ShardContext",
    "ShardStatus",
    "ShardTooLargeError",
    "Snooze",
    "StaleVersionError",
    "UnknownTaskError",
    "Worker",
    "error",
    "ok",
]

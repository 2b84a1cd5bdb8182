"""The API's request and response models (they are its OpenAPI schema)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from fastapi import Header
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from pgbatch.api.error_codes import ErrorCode
from pgbatch.fleet import WaitingReason
from pgbatch.labels import (
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    MAX_NAME_CHARS,
)
from pgbatch.limits import (
    MAX_LEASE_TTL_S,
    MAX_MAX_ATTEMPTS,
    MAX_RETENTION_S,
    MAX_SHARD_SIZE,
    MIN_LEASE_TTL_S,
)
from pgbatch.models import Batch, BatchInsight, BatchStatus, ErrorGroup

__all__ = [
    "NAME_PATTERN",
    "BatchId",
    "BatchList",
    "BatchOut",
    "BatchPatch",
    "BatchSubmit",
    "ErrorGroupOut",
    "ErrorGroupsOut",
    "ErrorOut",
    "ErrorSampleOut",
    "IdempotencyKeyHeader",
    "IfMatchHeader",
    "InsightOut",
    "IntegerText",
    "LastErrorOut",
    "NumberText",
    "ResultFormat",
    "ResultStatus",
    "RetryOut",
    "batch_out",
    "error_groups_out",
]

INT32 = 2**31
# Numbers in a path or query string, as the OpenAPI document's integer and number types
# read: pydantic alone would also take " 1", "1_0", "+1" and "1.0" as the integer 1.
_INTEGER_TEXT = re.compile(r"-?[0-9]+")
_NUMBER_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _integer_text(value: object) -> object:
    if isinstance(value, str) and not _INTEGER_TEXT.fullmatch(value):
        raise ValueError("expected an integer in digits, such as 42")
    return value


def _number_text(value: object) -> object:
    if isinstance(value, str) and not _NUMBER_TEXT.fullmatch(value):
        raise ValueError("expected a number in digits, such as 2.5")
    return value


# Validators for an int or float parameter of a path or query string.
IntegerText = BeforeValidator(_integer_text)
NumberText = BeforeValidator(_number_text)


class ResultStatus(StrEnum):
    """Which results of a batch to read."""

    ALL = "all"
    OK = "ok"
    ERROR = "error"


class ResultFormat(StrEnum):
    """The encoding of a batch's results."""

    NDJSON = "ndjson"
    CSV = "csv"


# A batch id in a path.
BatchId = Annotated[int, IntegerText]
# The request headers several routes take (the length bounds those of the database).
IdempotencyKeyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
]
IfMatchHeader = Annotated[str | None, Header(alias="If-Match", max_length=100)]

# Names (task, queue, callback) are stored as PostgreSQL text, which cannot hold NUL: a
# name with one is refused as input (422), not left to fail in the database (500).
NAME_PATTERN = r"^[^\x00]*$"


class _Strict(BaseModel):
    # An unknown field is a client's typo: say so instead of ignoring it. Types are
    # strict too: `"priority": true` or `"shard_size": "10"` is a mistake, not a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class BatchOptions(_Strict):
    """Options of a submission; unset ones take the task's defaults."""

    # The bounds are the library's (pgbatch.limits): HTTP and App.submit refuse the same.
    shard_size: int | None = Field(default=None, ge=1, le=MAX_SHARD_SIZE)
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_MAX_ATTEMPTS)
    lease_ttl_s: float | None = Field(default=None, ge=MIN_LEASE_TTL_S, le=MAX_LEASE_TTL_S)
    priority: int = Field(default=0, ge=-INT32, lt=INT32)
    queue: str | None = Field(default=None, min_length=1, max_length=200, pattern=NAME_PATTERN)
    on_complete: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=NAME_PATTERN
    )
    # Checked by pgbatch.labels (App.submit refuses the same), naming `metadata.<key>`.
    name: str | None = Field(
        default=None,
        max_length=MAX_NAME_CHARS,
        description="A label for people and for `GET /v1/batches?name=`.",
    )
    metadata: dict[str, str] | None = Field(
        default=None,
        max_length=MAX_METADATA_KEYS,
        description=(
            f"Up to {MAX_METADATA_KEYS} string pairs (keys 1-64 characters without ':', values"
            f" up to {MAX_METADATA_VALUE_CHARS}), filtered by `GET /v1/batches?metadata=k:v`."
        ),
    )


class BatchSubmit(BatchOptions):
    """A submission with its items inline (for large batches, POST NDJSON instead)."""

    task: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    items: list[Any]
    # Seconds after it finishes until the batch is pruned; null keeps it forever; left
    # out, the server's PGBATCH_RETENTION_S (7 days) applies.
    retention_s: float | None = Field(default=None, ge=0, le=MAX_RETENTION_S)


class BatchPatch(_Strict):
    """A client's change to a batch: its labels, its priority, cancelling it (or several)."""

    priority: int | None = Field(default=None, ge=-INT32, lt=INT32)
    status: Literal["cancelled"] | None = Field(
        default=None, description="Set to 'cancelled' to cancel the batch."
    )
    name: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="A new name; null clears it."
    )
    metadata: dict[str, str] | None = Field(
        default=None,
        max_length=MAX_METADATA_KEYS,
        description="New metadata, replacing the old; {} or null clears it.",
    )


class BatchOut(BaseModel):
    """A batch as the API shows it."""

    id: int
    task: str
    queue: str
    priority: int
    status: BatchStatus
    shard_size: int
    max_attempts: int
    lease_ttl_s: float
    total_items: int
    items_done: int
    items_ok: int
    items_failed: int
    items_cancelled: int = Field(
        description="Items ended by a cancellation; not counted in items_failed."
    )
    total_shards: int
    shards_done: int
    shards_dead: int
    run_no: int
    on_complete: str | None
    idempotency_key: str | None
    version: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    is_final: bool
    name: str | None
    metadata: dict[str, str]
    waiting_s: float | None = Field(
        description="Seconds from submit to the first claim (null before it)."
    )
    running_s: float | None = Field(
        description="Seconds from the first claim to the end (null until the batch ends)."
    )
    # Set by GET /v1/batches and /v1/batches/{id} (not in event frames, which omit it).
    waiting_reason: WaitingReason | None = Field(
        default=None,
        description="Why this unfinished batch makes no progress: its queue is paused, or "
        "no live worker serves its queue and task. Null when neither is the case.",
    )


def batch_out(batch: Batch) -> BatchOut:
    """Return the API view of a batch (its fields and its items_done / is_final properties)."""
    return BatchOut.model_validate(batch, from_attributes=True)


class BatchList(BaseModel):
    """One page of batches, newest first; pass `next_cursor` as `cursor` for the next."""

    batches: list[BatchOut]
    next_cursor: str | None


class RetryOut(BaseModel):
    """What a retry re-queued, and the batch after it."""

    requeued_shards: int
    batch: BatchOut


class ThroughputPoint(BaseModel):
    """Items finished in one time bucket."""

    at: datetime
    items: int


class ErrorSample(BaseModel):
    """One failed item."""

    seq: int
    error: str


class DeadShard(BaseModel):
    """One shard that used up its attempts."""

    shard_no: int
    first_seq: int
    last_seq: int
    error: str | None
    traceback: str | None = None


class LastErrorOut(BaseModel):
    """The batch's most recent shard failure still on record, with its traceback."""

    shard_no: int
    status: str
    first_seq: int
    last_seq: int
    error: str
    traceback: str | None
    at: datetime | None


class InsightOut(BaseModel):
    """A batch with what the dashboard shows about it."""

    batch: BatchOut
    shard_states: dict[str, int]
    bucket_s: int
    throughput: list[ThroughputPoint]
    error_samples: list[ErrorSample]
    dead_shards: list[DeadShard]
    last_error: LastErrorOut | None = None


def insight_out(batch: Batch, insight: BatchInsight) -> InsightOut:
    """Return the API view of a batch's insight."""
    return InsightOut(
        batch=batch_out(batch),
        shard_states=insight.shard_states,
        bucket_s=insight.bucket_s,
        throughput=[ThroughputPoint(at=at, items=n) for at, n in insight.throughput],
        error_samples=[ErrorSample(seq=s, error=e) for s, e in insight.error_samples],
        dead_shards=[
            DeadShard(
                shard_no=a,
                first_seq=b,
                last_seq=c,
                error=d,
                traceback=insight.dead_shard_tracebacks.get(a),
            )
            for a, b, c, d in insight.dead_shards
        ],
        last_error=(
            None
            if insight.last_error is None
            else LastErrorOut(
                shard_no=insight.last_error.shard_no,
                status=str(insight.last_error.status),
                first_seq=insight.last_error.first_seq,
                last_seq=insight.last_error.last_seq,
                error=insight.last_error.error,
                traceback=insight.last_error.traceback,
                at=insight.last_error.at,
            )
        ),
    )


class ErrorDetail(BaseModel):
    """What went wrong, and which field of the request caused it (some errors say more)."""

    model_config = ConfigDict(extra="allow")

    code: ErrorCode
    message: str
    field: str | None
    # 410 batch_pruned only: when the batch was removed.
    pruned_at: datetime | None = None


class ErrorOut(BaseModel):
    """Every error response has this shape."""

    error: ErrorDetail


class ErrorSampleOut(BaseModel):
    """One failed item of an error group: its position, its input and its traceback."""

    seq: int
    input: Any
    traceback: str | None = None


class ErrorGroupOut(BaseModel):
    """Failed items sharing one error text."""

    error: str
    items: int
    first_seq: int
    # When its first and last items failed (their shards' finish).
    first_seen_at: datetime | None = None
    last_seen_at: datetime | None = None
    samples: list[ErrorSampleOut]


class ErrorGroupsOut(BaseModel):
    """A batch's failed items grouped by error, largest group first."""

    batch_id: int
    items_failed: int
    groups_total: int
    groups: list[ErrorGroupOut]


def error_groups_out(batch: Batch, groups: list[ErrorGroup], total: int) -> ErrorGroupsOut:
    """Return the API view of a batch's error groups."""
    return ErrorGroupsOut(
        batch_id=batch.id,
        items_failed=batch.items_failed,
        groups_total=total,
        groups=[
            ErrorGroupOut(
                error=g.error,
                items=g.items,
                first_seq=g.first_seq,
                first_seen_at=g.first_seen_at,
                last_seen_at=g.last_seen_at,
                samples=[
                    ErrorSampleOut(seq=seq, input=value, traceback=trace)
                    for (seq, value), trace in zip(
                        g.samples,
                        g.sample_tracebacks or (None,) * len(g.samples),
                        strict=True,
                    )
                ],
            )
            for g in groups
        ],
    )

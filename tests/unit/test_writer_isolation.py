"""Isolation by bisection, generations of repeated keys, item errors and document keys."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import orjson
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import errors as pg_errors

from pgbatch.engine.group_commit import isolate_failures, nearest_rank
from pgbatch.workloads.documents import DOCUMENT_NAMESPACE, document_item, document_key
from pgbatch.writer import InvalidDocumentError, WriteItem
from pgbatch.writer.flush import _generations, is_item_error


class FakeTable:
    """A set of values with a uniqueness rule: a write of a subset is all-or-nothing."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad
        self.rows: set[int] = set()
        self.attempts = 0

    async def attempt(self, values: Sequence[int]) -> None:
        self.attempts += 1
        seen = set(self.rows)
        for value in values:
            if value in self.bad or value % 1000 in {v % 1000 for v in seen}:
                raise ValueError(f"bad {value}")
            seen.add(value)
        self.rows = seen


def item_error(exc: Exception) -> bool:
    """Treat ValueError as an item's fault."""
    return isinstance(exc, ValueError)


@given(
    st.lists(st.integers(0, 5000), unique=True, max_size=200),
    st.sets(st.integers(0, 5000), max_size=5),
)
def test_bisection_writes_everything_but_the_items_that_fail_alone(
    values: list[int], bad: set[int]
) -> None:
    table = FakeTable(bad)
    failures = asyncio.run(isolate_failures(values, table.attempt, item_error))
    failed = [v for v, _ in failures]
    assert table.rows | set(failed) == set(values) and not table.rows & set(failed)
    # Each failure is real: a bad value, or a clash with one written before it.
    for value in failed:
        assert value in bad or any(v % 1000 == value % 1000 for v in table.rows)


def test_bisection_costs_a_few_attempts_per_failure_not_one_per_item() -> None:
    table = FakeTable({17})
    failures = asyncio.run(isolate_failures(list(range(1000)), table.attempt, item_error))
    assert [v for v, _ in failures] == [17]
    assert table.attempts <= 2 * 10 + 1


def test_errors_that_are_not_an_items_fault_propagate() -> None:
    async def attempt(values: Sequence[int]) -> None:
        raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError):
        asyncio.run(isolate_failures([1, 2], attempt, item_error))


def test_item_errors_are_data_and_integrity_errors_only() -> None:
    assert is_item_error(pg_errors.CheckViolation())
    assert is_item_error(pg_errors.UniqueViolation())
    assert is_item_error(pg_errors.UntranslatableCharacter())
    assert not is_item_error(pg_errors.DeadlockDetected())
    assert not is_item_error(psycopg.OperationalError("gone"))
    assert not is_item_error(ValueError("python"))


def test_a_key_repeated_in_a_flush_goes_to_a_later_generation() -> None:
    items = [WriteItem(k, None) for k in (1, 2, 1, 3, 1, 2)]
    assert _generations(items) == [[0, 1, 3], [2, 5], [4]]
    assert _generations([]) == []


def test_nearest_rank_percentiles() -> None:
    assert nearest_rank([], 50) == 0.0
    assert nearest_rank([3.0, 1.0, 2.0], 50) == 2.0
    assert nearest_rank(range(1, 101), 99) == 99


def test_a_document_key_is_a_stable_uuid5_of_the_identity() -> None:
    key = document_key({"type": "student", "id": "S-1"})
    assert key == document_key({"id": "S-1", "type": "student"})  # field order is irrelevant
    assert key.version == 5
    assert key == uuid.UUID("07894fbf-2120-5857-87b6-83536bbc4d2f")  # frozen forever
    assert key != document_key({"type": "student", "id": "S-2"})
    item = document_item(
        {"type": "student", "id": "S-1"}, {"a": 1}, references=[{"type": "school", "id": 7}]
    )
    assert item.key == key and item.references == {document_key({"type": "school", "id": 7})}
    assert item.payload.type == "student" and item.partition == "default"


@given(
    st.dictionaries(st.text(), st.one_of(st.text(), st.integers(-(2**63), 2**63 - 1)), max_size=4),
    st.text(),
)
def test_a_document_key_is_exactly_uuid5_of_the_canonical_identity(
    fields: dict[str, str | int], kind: str
) -> None:
    identity = {**fields, "type": kind or "t"}
    canonical = orjson.dumps(identity, option=orjson.OPT_SORT_KEYS).decode()
    assert document_key(identity) == uuid.uuid5(DOCUMENT_NAMESPACE, canonical)


@pytest.mark.parametrize(
    "identity",
    [
        {"id": "x"},
        {"type": ""},
        {"type": "t", "id": 1.5},
        {"type": "t", "id": True},
        ["t"],
        {"type": "t", "id": "\ud800"},  # a lone surrogate: not text PostgreSQL can store
    ],
)
def test_malformed_identities_are_refused_before_queueing(identity: object) -> None:
    with pytest.raises(InvalidDocumentError):
        document_key(identity)  # type: ignore[arg-type]


def test_a_body_that_is_not_json_is_refused_before_queueing() -> None:
    with pytest.raises(InvalidDocumentError, match="JSON"):
        document_item({"type": "t", "id": "1"}, {"when": object()})


def test_a_partition_that_is_not_text_is_refused_before_queueing() -> None:
    # Encoded in the flush, it would have failed the flush of every other caller.
    with pytest.raises(InvalidDocumentError, match="partition"):
        document_item({"type": "t", "id": "1"}, {}, partition="\udcff")
    with pytest.raises(InvalidDocumentError, match="partition"):
        document_item({"type": "t", "id": "1"}, {}, partition=7)  # type: ignore[arg-type]

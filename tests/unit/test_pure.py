"""Pure logic: the query map, COPY encoding, sizing, outcomes and the public surface."""

from __future__ import annotations

import inspect

import pytest

import pgbatch
from pgbatch.db.copy import encode_json, encode_result_rows, encode_table_rows
from pgbatch.db.database import pool_wait_s
from pgbatch.db.notify import progress_batch_id
from pgbatch.db.queries import expand_includes, parse_queries, query
from pgbatch.models import check_batch_id
from pgbatch.sizing import suggest_shard_size


def test_parse_queries_splits_on_headers() -> None:
    text = "-- name: a\nSELECT 1;\n\n-- name: b\n-- why\nSELECT 2;\n"
    assert parse_queries(text) == {"a": "SELECT 1", "b": "-- why\nSELECT 2"}
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")


def test_includes_are_expanded_and_bad_ones_refused() -> None:
    queries = {"a": "WITH x AS (SELECT 1),\n-- include: tail", "tail": "SELECT * FROM x"}
    assert expand_includes(queries)["a"] == "WITH x AS (SELECT 1),\nSELECT * FROM x"
    with pytest.raises(ValueError, match="does not exist"):
        expand_includes({"a": "-- include: nope"})
    with pytest.raises(ValueError, match="includes itself"):
        expand_includes({"a": "-- include: b", "b": "-- include: a"})


def test_the_submit_statements_share_their_sealed_answer() -> None:
    for name in ("batch_seal", "batch_submit_small"):
        assert "-- include:" not in query(name)
        assert query(name).count("INSERT INTO pgbatch.shards") == 1


def test_every_packaged_query_loads_and_unknown_names_fail() -> None:
    assert "FOR UPDATE SKIP LOCKED" in query("shard_claim")
    with pytest.raises(KeyError, match="nope"):
        query("nope")


def test_copy_text_escaping() -> None:
    assert encode_json({"a": "x\\y\tz\n"}) == b'{"a":"x\\\\\\\\y\\\\tz\\\\n"}'
    rows = encode_result_rows(7, [(1, pgbatch.ok({"k": 1})), (2, pgbatch.error("bad\tline\n"))])
    assert rows == b'7\t1\tt\t{"k":1}\t\\N\n7\t2\tf\t\\N\tbad\\tline\\n\n'
    assert encode_table_rows([(1, None, True, "a\\b", [1])]) == b"1\t\\N\tt\ta\\\\b\t[1]\n"
    with pytest.raises(TypeError):
        encode_json(object())


def test_outcome_helpers() -> None:
    assert pgbatch.ok(3) == pgbatch.Outcome(True, 3, None)
    assert pgbatch.error("") == pgbatch.Outcome(False, None, "error")


def test_public_surface_is_curated() -> None:
    exported = {
        name
        for name, value in vars(pgbatch).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert sorted(pgbatch.__all__) == sorted(exported)
    for name in pgbatch.__all__:
        assert getattr(pgbatch, name).__doc__, f"{name} has no docstring"


def test_sizing_is_overhead_bound_then_lease_bound() -> None:
    fast = suggest_shard_size(item_s=0.001, overhead_s=0.002, commit_s=0.001, lease_ttl_s=30)
    assert fast.shard_size == 100 and fast.overhead_fraction <= 0.03
    bound = suggest_shard_size(item_s=0.01, overhead_s=0.05, commit_s=0.01, lease_ttl_s=10)
    assert bound.shard_size in (93, 94) and "lease-bound" in bound.note
    assert bound.lease_fraction <= 0.1
    too_slow = suggest_shard_size(item_s=10, overhead_s=0, commit_s=0, lease_ttl_s=30)
    assert too_slow.shard_size == 1 and "raise lease_ttl_s" in too_slow.note
    with pytest.raises(ValueError):
        suggest_shard_size(item_s=-1, overhead_s=0, commit_s=0, lease_ttl_s=1)


def test_a_progress_notification_carries_a_batch_id_or_is_ignored() -> None:
    assert progress_batch_id("42") == 42
    assert progress_batch_id("not a batch") is None


def test_request_scope_shortens_the_pool_wait_for_its_block_only() -> None:
    assert pool_wait_s.get() is None
    with pytest.raises(RuntimeError), pgbatch.App.request_scope(0.5):
        assert pool_wait_s.get() == 0.5
        raise RuntimeError
    assert pool_wait_s.get() is None


def test_an_id_beyond_bigint_names_no_batch() -> None:
    assert check_batch_id(2**63 - 1) == 2**63 - 1
    for impossible in (0, -1, 2**63):
        with pytest.raises(pgbatch.BatchNotFoundError):
            check_batch_id(impossible)

"""The packed array parameters arrive as the same arrays psycopg's own dumper sends."""

from __future__ import annotations

import uuid

import psycopg

from pgbatch.db.arrays import TextArray, UuidArray


def test_packed_arrays_equal_psycopgs_own(database_url: str) -> None:
    keys = [uuid.uuid4() for _ in range(5)]
    texts = ["plain", "é and 漢字", "", '{"json": "\\u0000 escaped"}', "x" * 10_000]
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT %(packed_keys)b::uuid[] = %(keys)b::uuid[],"
            " %(packed_texts)b::text[] = %(texts)b::text[],"
            " %(no_keys)b::uuid[] = '{}', cardinality(%(no_texts)b::text[]),"
            " %(packed_texts)b::text[]",
            {
                "packed_keys": UuidArray(keys),
                "keys": keys,
                "packed_texts": TextArray(texts),
                "texts": texts,
                "no_keys": UuidArray(),
                "no_texts": TextArray(),
            },
        ).fetchone()
    assert row == (True, True, True, 0, texts)

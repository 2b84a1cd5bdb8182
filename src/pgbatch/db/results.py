"""Queries on results: read a batch's outcomes back in pages, in item order."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg

from pgbatch.db.queries import query
from pgbatch.models import ErrorGroup, Outcome

__all__ = ["error_groups", "list_results"]


async def list_results(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    *,
    after_seq: int,
    limit: int,
    errors_only: bool = False,
) -> list[tuple[int, Outcome]]:
    """Return up to `limit` (seq, outcome) of the batch after `after_seq`, in seq order.

    Fewer than `limit` only at the end of the results: the result blocks are read until
    the page is full (an item being retried has no result and takes no place in it).
    """
    if errors_only:
        cur = await conn.execute(
            query("result_list_errors"),
            {"batch_id": batch_id, "after_seq": after_seq, "limit": limit},
        )
        return [
            (seq, Outcome(ok, output, error, traceback))
            for seq, ok, output, error, traceback in await cur.fetchall()
        ]
    page: list[tuple[int, Outcome]] = []
    after = after_seq
    while len(page) < limit:
        cur = await conn.execute(
            query("result_list"),
            {"batch_id": batch_id, "after_seq": after, "limit": limit - len(page)},
        )
        blocks = await cur.fetchall()
        if not blocks:
            break
        before = after
        for first_seq, outputs, seqs, errors, tracebacks, retrying in blocks:
            failed = {
                s: (e, t, r)
                for s, e, t, r in zip(seqs or (), errors or (), tracebacks or (), retrying or (),
                                      strict=True)
            }  # fmt: skip
            values = orjson.loads(outputs)
            for offset in range(max(0, after + 1 - first_seq), len(values)):
                seq = first_seq + offset
                failure = failed.get(seq)
                if failure is None:
                    page.append((seq, Outcome(True, values[offset], None, None)))
                elif not failure[2]:  # retrying: no result until the rerun writes one
                    page.append((seq, Outcome(False, None, failure[0], failure[1])))
                if len(page) == limit:
                    return page
            after = max(after, first_seq + len(values) - 1)
        if after == before:
            break  # only the block that holds `after` came back: the last one, read
    return page


async def error_groups(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    *,
    limit: int,
    samples: int,
) -> tuple[list[ErrorGroup], int]:
    """Return the batch's largest error groups (up to `limit`) and how many groups it has.

    Items of cancelled shards are counted as cancelled, not failed: they form no group.
    """
    cur = await conn.execute(
        query("result_error_groups"),
        {
            "batch_id": batch_id,
            "limit": limit,
            "samples": samples,
        },
    )
    rows = await cur.fetchall()
    wanted = [seq for row in rows for seq in row[3]]
    samples_of: dict[int, tuple[Any, str | None]] = {}
    if wanted:
        cur = await conn.execute(
            query("result_sample_inputs"), {"batch_id": batch_id, "seqs": wanted}
        )
        samples_of = {seq: (payload, tb) for seq, payload, tb in await cur.fetchall()}
    groups = [
        ErrorGroup(
            error or "",
            items,
            first_seq,
            tuple((seq, samples_of.get(seq, (None, None))[0]) for seq in seqs),
            first_seen_at,
            last_seen_at,
            tuple(samples_of.get(seq, (None, None))[1] for seq in seqs),
        )
        for error, items, first_seq, seqs, _, first_seen_at, last_seen_at in rows
    ]
    return groups, (rows[0][4] if rows else 0)

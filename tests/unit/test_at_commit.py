"""Statements queued with execute_at_commit: in order, carried by the completion, free if unused."""

from __future__ import annotations

import pgbatch
from pgbatch.db.shards import CommitStatement, ShardCompletion
from pgbatch.engine.context import CallbackContext, ShardContext
from pgbatch.models import BatchStatus, ShardStatus


def _ctx() -> ShardContext:
    return ShardContext(batch_id=1, shard_id=2, attempt=1, lease_epoch=3, task="t")


def test_nothing_queued_costs_no_list_and_builds_no_statements() -> None:
    ctx = _ctx()
    assert ctx.statements == () and ctx._statements is None
    completion = ShardCompletion.build(
        2, 1, 3, ShardStatus.DONE, [(0, pgbatch.ok())], ctx.writes, statements=ctx.statements
    )
    assert completion.statements == ()


def test_statements_keep_their_queue_order_and_params() -> None:
    ctx = _ctx()
    ctx.execute_at_commit("UPDATE a SET n = n + 1")
    ctx.execute_at_commit("INSERT INTO b VALUES (%s)", (7,))
    ctx.execute_at_commit("INSERT INTO c VALUES (%(x)s)", {"x": "y"})
    completion = ShardCompletion.build(
        2, 1, 3, ShardStatus.DONE, [(0, pgbatch.ok())], statements=ctx.statements
    )
    assert completion.statements == (
        CommitStatement("UPDATE a SET n = n + 1", None),
        CommitStatement("INSERT INTO b VALUES (%s)", (7,)),
        CommitStatement("INSERT INTO c VALUES (%(x)s)", {"x": "y"}),
    )
    # The completion holds its own tuple: queuing more afterwards does not change it.
    ctx.execute_at_commit("SELECT 1")
    assert len(completion.statements) == 3 and len(ctx.statements) == 4


def test_a_callback_can_queue_statements_too() -> None:
    ctx = CallbackContext(callback_id=1, attempt=1, run_no=1, batch_status=BatchStatus.SUCCEEDED)
    ctx.execute_at_commit("SELECT 1")
    assert list(ctx.statements) == [CommitStatement("SELECT 1")]

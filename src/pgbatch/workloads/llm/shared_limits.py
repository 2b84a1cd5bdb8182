"""The LLM workload's shared limits offered to other workloads (pgbatch.ratelimits).

`app.use(llm.WORKLOAD)` registers `PgRateLimits` under `RATE_LIMITS`: a caller outside
this workload (the vectors workload's OpenAI embedder) then charges the same rows of
`pgbatch.llm_limits` / `pgbatch.llm_reservations` as the `llm.request` shards. An
upstream is named as the LLM configuration names it (PGBATCH_LLM_CONFIG's
`[upstreams.NAME]`, or "default" from PGBATCH_LLM_* variables); its `limit` is the one
charged, per model when `per_model` is set, so a key shared by chat batches and
embeddings has one budget.

Such a reservation belongs to no shard (`shard_id` 0, which no shard has): it counts in
the sliding window from its reserve, and from its settle once settled, exactly as a
shard's. It waits while shards fill `max_in_flight` but never counts toward it (that
bound is for shards, whose crashed workers' shares come back at the rescue: a
reservation of no shard has no lease to be rescued by), and a crashed caller's charge
ages out of the window like a zombie's. An upstream without a `limit` shares nothing:
a 429 holds back this process only, as it does for shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pgbatch.ratelimits import RateGrant, RequestTooLargeError
from pgbatch.workloads.llm import queries
from pgbatch.workloads.llm.runner import runner_of

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = ["NO_SHARD", "PgRateLimits"]

# The shard of a reservation made outside any shard: shard ids start at 1, so no lease
# ever holds it and `llm_reserve` treats it as settled-or-gone for the in-flight bound.
NO_SHARD = 0


class PgRateLimits:
    """SharedRateLimits over the LLM workload's PostgreSQL tables and configuration."""

    def __init__(self, app: App) -> None:
        """Serve `app`'s callers, with its LLM runner's configuration and local pauses."""
        self.app = app

    async def reserve(self, upstream: str, *, model: str, tokens: Sequence[int]) -> RateGrant:
        """Grant the longest prefix of `tokens` the upstream's shared limit allows now."""
        runner = runner_of(self.app)
        found = runner.config.upstream(upstream)
        limit = found.limit
        if limit is None:
            # Nothing shared: only this process's own 429s hold it back (as for shards).
            wait_s = runner.held_for_s(found.name)
            if wait_s > 0:
                return RateGrant(found.name, 0, 0, wait_s)
            return RateGrant(found.name, len(tokens), sum(tokens), 0.0)
        if limit.tpm is not None and tokens and max(tokens) > limit.tpm:
            raise RequestTooLargeError(
                f"a request may use {max(tokens)} tokens, more than the limit "
                f"{limit.name!r} allows per minute ({limit.tpm})"
            )
        await runner.ensure_schema()
        key = limit.key(model)
        async with self.app.db.connection() as conn:
            grant = await queries.reserve(
                conn,
                name=key,
                rpm=limit.rpm,
                tpm=limit.tpm,
                max_in_flight=limit.max_in_flight,
                shard_id=NO_SHARD,
                lease_epoch=0,
                tokens=tokens,
            )
        return RateGrant(key, grant.granted, grant.tokens, grant.wait_s, grant.reservation_id)

    async def settle(self, grant: RateGrant, *, requests: int, tokens: int) -> None:
        """Replace the grant's estimate by what its requests used (one statement)."""
        if grant.reservation is None:
            return
        async with self.app.db.connection() as conn:
            await queries.settle(conn, [(grant.reservation, requests, tokens)])

    async def pause(self, upstream: str, *, model: str, wait_s: float) -> None:
        """Pause the key for every process; without a limit, for this process only."""
        runner = runner_of(self.app)
        found = runner.config.upstream(upstream)
        limit = found.limit
        key = limit.key(model) if limit is not None else found.name
        if runner.hold(key, wait_s) and limit is not None:
            await runner.ensure_schema()
            async with self.app.db.connection() as conn:
                await queries.pause(conn, name=key, wait_s=wait_s)

"""The `llm.request` handler: a shard's requests sent under the shared limits, with usage.

Per shard, in this order (docs/llm.md has the why of each):

1. Cache (opt-in batches): one lookup for the shard's keys; a hit is the stored answer.
2. Reserve: one call per round reserves the longest prefix of the pending requests the
   key's shared limit allows (requests/min, tokens/min, in flight, and not paused). If it
   grants nothing and the shard has no answer worth keeping, the shard snoozes
   (`pgbatch.Snooze`): queued again, attempt not charged, nobody holds it.
3. Send the granted requests concurrently through one pooled client per upstream (its
   `max_concurrency` bounds a process's requests in flight). A 429 pauses the key for
   every worker until its Retry-After and the request goes back to pending; a 5xx or a
   timeout is resent up to the upstream's `max_attempts`; anything else is final.
4. Commit, in the shard's fenced completion: the result lines, each request's usage, the
   batch's totals (one statement), the settlement of the reservations (one statement)
   and the new cache entries (one statement). A worker that lost its lease commits none
   of it; its reservation then counts at its estimate until it leaves the window.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from pgbatch.engine.context import ShardContext
from pgbatch.errors import Snooze
from pgbatch.models import Item, Outcome, error, ok
from pgbatch.workloads.llm import queries
from pgbatch.workloads.llm.config import DEFAULT_UPSTREAM, Limit, LlmConfig, Upstream, load_config
from pgbatch.workloads.llm.results import failure_line, is_error_line, result_line
from pgbatch.workloads.llm.upstream import Reply, UpstreamClient
from pgbatch.workloads.llm.usage import cache_key, completion_cap, estimate_tokens, usage_of

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = ["LlmRunner", "RunnerStats", "line_id", "runner_of", "runners"]

_log = logging.getLogger(__name__)

# A request refused with 429 this many times is given up with the last 429 as its line:
# the pause makes every resend wait for the upstream's hint, so ten is minutes of trying.
MAX_RATE_LIMITED_SENDS = 10
# Backoff before resending after a 5xx or a timeout: base * 2**(sends-1), capped.
RETRY_BACKOFF_BASE_S = 0.5
RETRY_BACKOFF_MAX_S = 10.0
COLUMNS = ("batch_id", "seq", "model", "attempts", "prompt_tokens", "completion_tokens",
           "cached_tokens", "cache_hit")  # fmt: skip

_runners: weakref.WeakKeyDictionary[App, LlmRunner] = weakref.WeakKeyDictionary()


def line_id(batch_id: int, seq: int) -> str:
    """Return the stable `id` of a result line (one per request, the same on every read)."""
    return f"batch_req_{batch_id}_{seq}"


def runners() -> list[LlmRunner]:
    """Return the runners of this process's Apps."""
    return list(_runners.values())


def runner_of(app: App) -> LlmRunner:
    """Return the app's runner (one per App: its clients, config and local pauses)."""
    runner = _runners.get(app)
    if runner is None:
        runner = _runners[app] = LlmRunner(app)
    return runner


@dataclass(slots=True)
class _Request:
    """One request of the shard as it goes: sends so far, its final line and usage."""

    item: Item
    url: str
    body: dict[str, Any]
    model: str
    estimate: int
    key: bytes | None = None
    sends: int = 0
    rate_limited: int = 0
    line: dict[str, Any] | None = None
    cache_hit: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reservation: _Reservation | None = None


@dataclass(slots=True)
class _Reservation:
    """A granted reservation and what its requests really cost so far."""

    id: int
    requests: int = 0
    tokens: int = 0
    settled: bool = False


@dataclass(slots=True)
class RunnerStats:
    """Counters of one process's runner (tests and the benchmark read them)."""

    reservations: int = 0
    snoozes: int = 0
    pauses: int = 0
    sends: int = 0
    cache_hits: int = 0
    held_back: int = 0
    # reservations that granted nothing (the limit spent or the key paused)
    refusals: int = 0


class LlmRunner:
    """Runs `llm.request` shards for one App; holds its upstream clients and config."""

    def __init__(self, app: App, config: LlmConfig | None = None) -> None:
        """Bind to `app`; the configuration is read when the first shard runs."""
        self.app = app
        self._config = config
        # Each client with the event loop it was made in: its pooled connections belong
        # to that loop, so another loop (a second asyncio.run) gets a client of its own.
        self._clients: dict[str, tuple[asyncio.AbstractEventLoop, UpstreamClient]] = {}
        # Monotonic time until which a limit is paused, as this process last heard (a
        # 429 it got): requests waiting for a slot see it without asking the database.
        self._paused_until: dict[str, float] = {}
        self.stats = RunnerStats()
        self._migrated = False

    async def ensure_schema(self) -> None:
        """Apply the workload's migrations once, for an app that was open before `use()`."""
        if not self._migrated:
            # An app that leaves migrations to `pgbatch migrate` (auto_migrate=False) is
            # left alone; otherwise nothing pending costs one read under the advisory lock.
            if self.app.auto_migrate:
                await self.app.migrate()
            self._migrated = True

    @property
    def config(self) -> LlmConfig:
        """Return the configuration (read from the environment on first use)."""
        if self._config is None:
            self._config = load_config()
        return self._config

    def configure(self, config: LlmConfig) -> None:
        """Use `config` instead of the environment's (tests, the demo, the benchmark)."""
        self._config = config
        self._clients.clear()

    def client(self, upstream: Upstream) -> UpstreamClient:
        """Return the pooled client of an upstream (one per process: connections reused)."""
        loop = asyncio.get_running_loop()
        found = self._clients.get(upstream.name)
        if found is None or found[0] is not loop:
            # A client of an ended loop cannot be closed from this one: it is dropped.
            found = self._clients[upstream.name] = (loop, UpstreamClient(upstream.config))
        return found[1]

    async def aclose(self) -> None:
        """Close the upstream clients of this event loop; forget those of ended ones."""
        loop = asyncio.get_running_loop()
        clients, self._clients = list(self._clients.values()), {}
        for owner, client in clients:
            if owner is loop:
                await client.aclose()

    def hold(self, key: str, wait_s: float) -> bool:
        """Hold back this process's sends on `key` for `wait_s`; False if already held longer."""
        until = time.monotonic() + wait_s
        if until <= self._paused_until.get(key, 0.0):
            return False
        self._paused_until[key] = until
        return True

    def held_for_s(self, key: str) -> float:
        """Return how long this process still holds back sends on `key` (0: not held)."""
        return max(0.0, self._paused_until.get(key, 0.0) - time.monotonic())

    async def run(self, items: list[Item], ctx: ShardContext) -> list[Outcome]:
        """Run one shard's requests; return each one's output line (ok) or error line."""
        await self.ensure_schema()
        first = items[0].value
        upstream = self.config.upstream(first.get("upstream") or DEFAULT_UPSTREAM)
        cache_tenant = first.get("cache")
        requests = [self._request(item, upstream) for item in items]
        if cache_tenant:
            await self._answer_from_cache(requests, str(cache_tenant), upstream, ctx)
        limit = upstream.limit
        if limit is not None and limit.tpm is not None:
            for request in requests:
                if request.line is None and request.estimate > limit.tpm:
                    request.line = failure_line(
                        line_id(ctx.batch_id, request.item.seq), request.item.value["custom_id"],
                        "request_too_large",
                        f"the request may use {request.estimate} tokens, more than the "
                        f"limit's {limit.tpm} tokens per minute",
                    )  # fmt: skip
        reservations: list[_Reservation] = []
        try:
            await self._send_all(requests, upstream, ctx, reservations)
        except Snooze:
            self._queue_settlement(reservations, ctx)
            raise
        self._queue_commit(requests, reservations, ctx, str(cache_tenant or ""))
        return [self._outcome(r) for r in requests]

    def _request(self, item: Item, upstream: Upstream) -> _Request:
        url, body = item.value["url"], item.value["body"]
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        return _Request(item, url, body, model, estimate_tokens(url, body))

    async def _answer_from_cache(
        self, requests: list[_Request], tenant: str, upstream: Upstream, ctx: ShardContext
    ) -> None:
        scope = None if upstream.name == DEFAULT_UPSTREAM else upstream.name
        for request in requests:
            request.key = cache_key(request.url, request.body, scope)
        async with self.app.db.connection() as conn:
            found = await queries.cache_get(
                conn, tenant=tenant, keys=[r.key for r in requests if r.key is not None]
            )
        for request in requests:
            answer = found.get(request.key or b"")
            if answer is None:
                continue
            reply = Reply(200, answer.body, request_id=answer.request_id)
            request.line = result_line(
                line_id(ctx.batch_id, request.item.seq), request.item.value["custom_id"], reply
            )
            request.cache_hit = True
            usage = usage_of(answer.body)
            request.prompt_tokens = usage.prompt_tokens
            request.completion_tokens = usage.completion_tokens
            request.cached_tokens = usage.cached_tokens
            self.stats.cache_hits += 1

    async def _send_all(
        self,
        requests: list[_Request],
        upstream: Upstream,
        ctx: ShardContext,
        reservations: list[_Reservation],
    ) -> None:
        client = self.client(upstream)
        limit = upstream.limit
        while pending := [r for r in requests if r.line is None]:
            granted: list[_Request] = []
            waits: list[float] = []
            by_key: dict[str, list[_Request]] = defaultdict(list)
            for request in pending:
                by_key[limit.key(request.model) if limit else upstream.name].append(request)
            for key, group in sorted(by_key.items()):
                if limit is None:
                    local = self._paused_until.get(key, 0.0) - time.monotonic()
                    if local > 0:
                        waits.append(local)
                    else:
                        granted.extend(group)
                    continue
                # Rounds before this one have all their answers: settle them with it.
                done = [r for r in reservations if not r.settled]
                grant = await self._reserve(limit, key, group, ctx, done)
                for r in done:
                    r.settled = True
                if grant.reservation_id is None:
                    waits.append(grant.wait_s)
                    continue
                reservation = _Reservation(grant.reservation_id)
                reservations.append(reservation)
                for request in group[: grant.granted]:
                    request.reservation = reservation
                    granted.append(request)
            if not granted:
                wait_s = min(waits) if waits else 0.5
                if not any(r.line is not None and r.sends > 0 for r in requests):
                    # Nothing worth keeping: put the shard back instead of holding it.
                    self.stats.snoozes += 1
                    raise Snooze(wait_s, "LLM rate limit: no budget")
                await asyncio.sleep(wait_s)
                continue
            replies = await asyncio.gather(
                *(self._send(client, upstream, limit, r) for r in granted)
            )
            backoff = 0.0
            for request, reply in zip(granted, replies, strict=True):
                backoff = max(backoff, await self._settle_reply(request, reply, upstream, ctx))
            if backoff > 0 and any(r.line is None for r in requests):
                await asyncio.sleep(backoff)

    async def _reserve(
        self,
        limit: Limit,
        key: str,
        group: list[_Request],
        ctx: ShardContext,
        done: list[_Reservation],
    ) -> queries.Grant:
        async with self.app.db.connection() as conn:
            grant = await queries.reserve(
                conn,
                name=key,
                rpm=limit.rpm,
                tpm=limit.tpm,
                max_in_flight=limit.max_in_flight,
                shard_id=ctx.shard_id,
                lease_epoch=ctx.lease_epoch,
                tokens=[r.estimate for r in group],
                settle=[(r.id, r.requests, r.tokens) for r in done],
            )
        self.stats.reservations += 1
        if grant.reservation_id is None:
            self.stats.refusals += 1
        return grant

    async def _send(
        self, client: UpstreamClient, upstream: Upstream, limit: Limit | None, request: _Request
    ) -> Reply:
        key = limit.key(request.model) if limit else upstream.name

        def gate() -> bool:
            return time.monotonic() >= self._paused_until.get(key, 0.0)

        return await client.send(request.url, request.body, gate=gate)

    async def _settle_reply(
        self, request: _Request, reply: Reply, upstream: Upstream, ctx: ShardContext
    ) -> float:
        """Record one reply; return how long to back off before resending (0: none)."""
        limit = upstream.limit
        key = limit.key(request.model) if limit else upstream.name
        if not reply.sent:
            self.stats.held_back += 1
            return 0.0
        request.sends += 1
        self.stats.sends += 1
        if reply.rate_limited:
            request.rate_limited += 1
            wait_s = reply.retry_after_s or 1.0
            if self.hold(key, wait_s):
                if limit is not None:
                    self.stats.pauses += 1
                    async with self.app.db.connection() as conn:
                        await queries.pause(conn, name=key, wait_s=wait_s)
            if request.rate_limited >= MAX_RATE_LIMITED_SENDS:
                self._finish(request, reply, ctx)
            return 0.0
        if request.reservation is not None:
            request.reservation.requests += 1
            request.reservation.tokens += self._charge(request, reply, limit)
        if reply.retryable and request.sends - request.rate_limited < upstream.max_attempts:
            attempt = request.sends - request.rate_limited
            return float(min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_BASE_S * 2.0 ** (attempt - 1)))
        self._finish(request, reply, ctx)
        return 0.0

    @staticmethod
    def _charge(request: _Request, reply: Reply, limit: Limit | None) -> int:
        """Return what the answered request costs against the tokens-per-minute limit."""
        usage = usage_of(reply.body) if reply.ok else None
        if usage is None or usage.total_tokens == 0:
            return request.estimate  # no usage to settle from: keep the estimate
        if limit is not None and limit.settle == "total":
            return usage.total_tokens
        choices = request.body.get("n")
        answers = choices if isinstance(choices, int) and choices > 0 else 1
        if request.url == "/v1/embeddings":
            return usage.prompt_tokens
        return usage.prompt_tokens + completion_cap(request.body) * answers

    def _finish(self, request: _Request, reply: Reply, ctx: ShardContext) -> None:
        request.line = result_line(
            line_id(ctx.batch_id, request.item.seq), request.item.value["custom_id"], reply
        )
        if reply.ok:
            usage = usage_of(reply.body)
            request.prompt_tokens = usage.prompt_tokens
            request.completion_tokens = usage.completion_tokens
            request.cached_tokens = usage.cached_tokens

    @staticmethod
    def _queue_settlement(reservations: list[_Reservation], ctx: ShardContext) -> None:
        settled = [(r.id, r.requests, r.tokens) for r in reservations if not r.settled]
        if settled:
            statement = queries.settle_statement(settled)
            ctx.execute_at_commit(statement.statement, statement.params)

    def _queue_commit(
        self,
        requests: list[_Request],
        reservations: list[_Reservation],
        ctx: ShardContext,
        cache_tenant: str,
    ) -> None:
        """Queue what commits with the results: usage, totals, settlement, cache entries."""
        ctx.copy_rows(
            "pgbatch.llm_request_usage",
            [
                (ctx.batch_id, r.item.seq, r.model, r.sends, r.prompt_tokens,
                 r.completion_tokens, r.cached_tokens, r.cache_hit)
                for r in requests
            ],
            columns=COLUMNS,
        )  # fmt: skip
        totals: dict[str, queries.BatchUsageRow] = {}
        for r in requests:
            row = totals.setdefault(r.model, queries.BatchUsageRow(r.model))
            row.requests += 1
            row.failed += r.line is not None and is_error_line(r.line)
            row.upstream_calls += r.sends
            row.rate_limited += r.rate_limited
            if r.cache_hit:
                row.cache_hits += 1
            else:
                row.prompt_tokens += r.prompt_tokens
                row.completion_tokens += r.completion_tokens
                row.cached_tokens += r.cached_tokens
        statement = queries.batch_usage_statement(ctx.batch_id, list(totals.values()))
        ctx.execute_at_commit(statement.statement, statement.params)
        self._queue_settlement(reservations, ctx)
        if cache_tenant:
            answers = [
                (r.key, r.url, r.line["response"]["body"], r.line["response"]["request_id"])
                for r in requests
                if r.key is not None and not r.cache_hit and r.line and not is_error_line(r.line)
            ]
            if answers:
                statement = queries.cache_put_statement(cache_tenant, answers)
                ctx.execute_at_commit(statement.statement, statement.params)

    @staticmethod
    def _outcome(request: _Request) -> Outcome:
        line = request.line
        assert line is not None
        return error(orjson.dumps(line).decode()) if is_error_line(line) else ok(line)

"""The LLM workload's engine on real PostgreSQL and real HTTP: limits, retries, usage, cache."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import psycopg
import pytest

import pgbatch
from pgbatch.workloads import llm
from pgbatch.workloads.llm import fake_upstream, queries
from pgbatch.workloads.llm.config import Limit, LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import FakeLimits, FakeUpstream, serving
from pgbatch.workloads.llm.requests import LlmRequest, check_request_lines
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.status import batch_usage_report, limit_states
from pgbatch.workloads.llm.upstream import UpstreamConfig
from pgbatch.workloads.llm.usage import parse_prices
from tests.conftest import settings_for
from tests.helpers import fetch_all, fetch_one

# The fake and the limit count over a 2 s window instead of a minute: the same code path,
# and a test that spends a window's budget several times over runs in seconds.
TEST_WINDOW_S = 2.0


@pytest.fixture(autouse=True)
def short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the sliding window of both the fake and the shared limit."""
    monkeypatch.setattr(fake_upstream, "WINDOW_S", TEST_WINDOW_S)
    monkeypatch.setattr(queries, "WINDOW_S", TEST_WINDOW_S)


def _requests(n: int, *, prefix: str = "r", max_tokens: int = 8) -> list[LlmRequest]:
    lines = [
        orjson.dumps(
            {
                "custom_id": f"{prefix}{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "m",
                    "messages": [{"role": "user", "content": f"{prefix} prompt {i}"}],
                    "max_tokens": max_tokens,
                },
            }
        )
        for i in range(n)
    ]
    return check_request_lines(lines, "/v1/chat/completions")


def _config(base_url: str, limit: Limit | None = None, **upstream: Any) -> LlmConfig:
    config = UpstreamConfig(
        base_url=base_url, api_key=upstream.pop("api_key", None), timeout_s=5.0, max_concurrency=8
    )
    prices = parse_prices({"m": {"input": 1.0, "output": 2.0}})
    return LlmConfig({"default": Upstream("default", config, limit=limit, **upstream)}, prices)


@contextlib.asynccontextmanager
async def _workers(
    apps: Sequence[pgbatch.App], config: LlmConfig, *, concurrency: int = 4
) -> AsyncIterator[list[pgbatch.Worker]]:
    """Run one worker per App (each its own pool and runner, as separate processes have)."""
    workers = []
    for application in apps:
        application.use(llm.WORKLOAD)
        runner_of(application).configure(config)
        workers.append(application.worker(concurrency=concurrency))
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield workers
    finally:
        for w in workers:
            w.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        for application in apps:
            await runner_of(application).aclose()


@contextlib.asynccontextmanager
async def _apps(database_url: str, n: int) -> AsyncIterator[list[pgbatch.App]]:
    apps = [pgbatch.App(settings=settings_for(database_url)) for _ in range(n)]
    try:
        for application in apps:
            await application.open()
        yield apps
    finally:
        for application in apps:
            await application.close()


async def _lines(app: pgbatch.App, batch_id: int) -> list[dict[str, Any]]:
    out = [line async for line in llm.output_lines(app, batch_id)]
    err = [line async for line in llm.output_lines(app, batch_id, errors=True)]
    return out + err


@pytest.mark.asyncio
async def test_retries_only_what_can_succeed_and_records_the_sends(
    app: pgbatch.App, database_url: str
) -> None:
    fake = FakeUpstream()
    lines = [
        orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "m", "max_tokens": 4,
                               "messages": [{"role": "user", "content": prompt}]}})
        for cid, prompt in (("ok", "hello"), ("bad", "x [fake:400]"), ("down", "y [fake:500]"))
    ]  # fmt: skip
    async with serving(fake) as base_url:
        config = _config(base_url, max_attempts=3)
        app.use(llm.WORKLOAD)
        batch = await llm.submit_requests(app, check_request_lines(lines, "/v1/chat/completions"))
        async with _workers([app], config):
            done = await app.wait(batch.id, timeout_s=60)
    assert (done.items_ok, done.items_failed) == (1, 2)
    sent = {s.key: 0 for s in fake.served}
    for s in fake.served:
        sent[s.key] += 1
    # A 400 is final after one send; a 500 is resent up to max_attempts.
    assert sorted(sent.values()) == [1, 1, 3]
    rows = await fetch_all(
        database_url,
        "SELECT seq, attempts FROM pgbatch.llm_request_usage WHERE batch_id = %s ORDER BY seq",
        (batch.id,),
    )
    assert [tuple(r) for r in rows] == [(0, 1), (1, 1), (2, 3)]
    errors = [line async for line in llm.output_lines(app, batch.id, errors=True)]
    assert {e["custom_id"]: e["response"]["status_code"] for e in errors} == {
        "bad": 400,
        "down": 500,
    }


@pytest.mark.asyncio
async def test_usage_and_cost_per_batch_add_up_from_the_answers(
    app: pgbatch.App, database_url: str
) -> None:
    fake = FakeUpstream()
    async with serving(fake) as base_url:
        app.use(llm.WORKLOAD)
        batch = await llm.submit_requests(app, _requests(12), shard_size=5)
        async with _workers([app], _config(base_url)):
            await app.wait(batch.id, timeout_s=60)
        report = await batch_usage_report(app, batch.id)
    lines = [line async for line in llm.output_lines(app, batch.id)]
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in lines)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    assert (report.total.requests, report.total.upstream_calls) == (12, 12)
    assert (report.total.prompt_tokens, report.total.completion_tokens) == (prompt, completion)
    assert report.cost_usd == pytest.approx((prompt * 1.0 + completion * 2.0) / 1e6)
    per_request = await fetch_one(
        database_url,
        "SELECT sum(prompt_tokens), sum(completion_tokens), count(*)"
        " FROM pgbatch.llm_request_usage WHERE batch_id = %s",
        (batch.id,),
    )
    assert per_request == (prompt, completion, 12)
    with pytest.raises(pgbatch.BatchNotFoundError):
        await batch_usage_report(app, batch.id, tenant="someone-else")


@pytest.mark.asyncio
async def test_a_rerun_with_the_cache_makes_no_upstream_call(app: pgbatch.App) -> None:
    fake = FakeUpstream()
    async with serving(fake) as base_url:
        app.use(llm.WORKLOAD)
        config = _config(base_url)
        async with _workers([app], config):
            first = await llm.submit_requests(app, _requests(7), cache=True, shard_size=3)
            await app.wait(first.id, timeout_s=60)
            calls_after_first = sum(fake.calls.values())
            second = await llm.submit_requests(app, _requests(7), cache=True, shard_size=3)
            await app.wait(second.id, timeout_s=60)
            # Another tenant's identical file is not answered from this tenant's cache.
            other = await llm.submit_requests(app, _requests(2), cache=True, tenant="other")
            await app.wait(other.id, timeout_s=60)
    assert calls_after_first == 7
    assert sum(fake.calls.values()) == 7 + 2
    before, after = await _lines(app, first.id), await _lines(app, second.id)
    assert [(x["custom_id"], x["response"]["body"]) for x in before] == [
        (x["custom_id"], x["response"]["body"]) for x in after
    ]
    report = await batch_usage_report(app, second.id)
    assert (report.total.cache_hits, report.total.upstream_calls) == (7, 0)
    assert report.cost_usd == 0


@pytest.mark.asyncio
async def test_concurrent_reservations_never_grant_past_the_limit(
    app: pgbatch.App, database_url: str
) -> None:
    """Eight connections released together each ask for 3 requests of a 10 rpm limit."""
    app.use(llm.WORKLOAD)
    await app.migrate()
    conns = [await psycopg.AsyncConnection.connect(database_url, autocommit=True) for _ in range(8)]
    barrier = asyncio.Barrier(len(conns))

    async def ask(conn: psycopg.AsyncConnection[Any], shard_id: int) -> queries.Grant:
        await barrier.wait()
        return await queries.reserve(
            conn, name="k", rpm=10, tpm=None, max_in_flight=None, shard_id=shard_id,
            lease_epoch=1, tokens=[5, 5, 5],
        )  # fmt: skip

    try:
        grants = await asyncio.gather(*(ask(c, i) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    assert sum(g.granted for g in grants) == 10
    assert all(g.wait_s > 0 for g in grants if g.granted == 0)
    assert await fetch_one(
        database_url, "SELECT sum(requests) FROM pgbatch.llm_reservations WHERE name = 'k'"
    ) == (10,)


@pytest.mark.asyncio
async def test_three_workers_share_one_limit_without_a_429_storm(database_url: str) -> None:
    """The fake allows 12 requests per window, the shared limit too: 60 requests, 3 workers."""
    fake = FakeUpstream(FakeLimits(rpm=12, tpm=2000))
    async with serving(fake) as base_url, _apps(database_url, 3) as apps:
        config = _config(base_url, Limit("default", rpm=12, tpm=2000))
        apps[0].use(llm.WORKLOAD)
        batch = await llm.submit_requests(apps[0], _requests(60), shard_size=4)
        async with _workers(apps, config) as workers:
            done = await apps[0].wait(batch.id, timeout_s=120)
    assert (done.items_ok, done.items_failed) == (60, 0)
    assert len({line["custom_id"] for line in await _lines(apps[0], batch.id)}) == 60
    # Nothing went over the fake's window, so it had no reason to refuse anything.
    requests_in_window, tokens_in_window = fake.max_in_window(TEST_WINDOW_S)
    assert requests_in_window <= 12 and tokens_in_window <= 2000
    assert fake.rejected() == 0
    # Shards the limit could not serve went back to the queue instead of being held.
    assert sum(w.stats.shards_snoozed for w in workers) > 0


@pytest.mark.asyncio
async def test_a_429_pauses_every_worker_until_its_retry_after(database_url: str) -> None:
    """The fake allows fewer requests than the limit believes: its 429s pause all three."""
    fake = FakeUpstream(FakeLimits(rpm=6))
    async with serving(fake) as base_url, _apps(database_url, 3) as apps:
        # The shared limit thinks 100 per window are fine; only the 429s hold it back.
        config = _config(base_url, Limit("default", rpm=100, max_in_flight=3))
        apps[0].use(llm.WORKLOAD)
        batch = await llm.submit_requests(apps[0], _requests(24), shard_size=2)
        async with _workers(apps, config):
            done = await apps[0].wait(batch.id, timeout_s=120)
        [state] = await limit_states(apps[0])
    assert (done.items_ok, done.items_failed) == (24, 0)
    assert fake.rejected() > 0 and state.pauses >= 1
    # After each 429, nobody's request reached the fake until the pause was nearly over:
    # the only ones allowed are those already on their way (at most max_in_flight).
    served = sorted(fake.served, key=lambda s: s.at)
    for refused in (s for s in served if s.status == 429):
        window_end = _retry_after_end(fake, refused.at)
        during = [s for s in served if refused.at < s.at < window_end - 0.3]
        assert len(during) <= 3, (refused, during)
    # Each refusal paused the key: no worker backed off alone into a storm.
    assert fake.rejected() <= 3 * state.pauses


def _retry_after_end(fake: FakeUpstream, at: float) -> float:
    """Return when the fake's window admitted again after a refusal at `at`."""
    admitted = [s.at for s in fake.served if s.status != 429 and s.at <= at]
    rpm = fake.limits.rpm or 1
    return admitted[-rpm] + TEST_WINDOW_S if len(admitted) >= rpm else at


@pytest.mark.asyncio
async def test_the_api_key_is_never_shown(app: pgbatch.App) -> None:
    config = _config("http://127.0.0.1:9/v1", api_key="sk-secret-123")
    upstream = config.upstream("default")
    assert "sk-secret-123" not in repr(upstream)
    assert "sk-secret-123" not in orjson.dumps(upstream.describe()).decode()

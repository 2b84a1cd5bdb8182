"""The OpenAI embedder and LLM workers draw from one shared limit (pgbatch.ratelimits).

Real PostgreSQL, real HTTP (the LLM workload's fake upstream serves both endpoints and
records every call), each side on its own App: its own pool, its own connections, its
own runner, as separate processes have.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

import pgbatch
from pgbatch.ratelimits import RATE_LIMITS
from pgbatch.workloads import llm, vectors
from pgbatch.workloads.llm import fake_upstream, queries
from pgbatch.workloads.llm.config import Limit, LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import (
    EMBEDDING_DIMENSIONS,
    FakeLimits,
    FakeUpstream,
    Served,
    serving,
)
from pgbatch.workloads.llm.requests import LlmRequest, check_request_lines
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.shared_limits import PgRateLimits
from pgbatch.workloads.llm.upstream import UpstreamConfig
from pgbatch.workloads.vectors import EmbedderError, OpenAIEmbedder
from tests.conftest import settings_for
from tests.helpers import fetch_all, fetch_one

# The fake and the limit count over a short window instead of a minute: the same code
# path, and a test that spends a window's budget several times over runs in seconds.
TEST_WINDOW_S = 2.0
EMBEDDINGS = "/v1/embeddings"
CHAT = "/v1/chat/completions"


@pytest.fixture(autouse=True)
def short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the sliding window of both the fake and the shared limit."""
    monkeypatch.setattr(fake_upstream, "WINDOW_S", TEST_WINDOW_S)
    monkeypatch.setattr(queries, "WINDOW_S", TEST_WINDOW_S)


def _requests(n: int) -> list[LlmRequest]:
    lines = [
        orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT,
                      "body": {"model": "m", "max_tokens": 8,
                               "messages": [{"role": "user", "content": f"prompt {i}"}]}})
        for i in range(n)
    ]  # fmt: skip
    return check_request_lines(lines, CHAT)


def _config(base_url: str, limit: Limit) -> LlmConfig:
    config = UpstreamConfig(base_url=base_url, timeout_s=10.0, max_concurrency=8)
    return LlmConfig({"default": Upstream("default", config, limit=limit)})


@contextlib.asynccontextmanager
async def _two_apps(database_url: str, config: LlmConfig) -> AsyncIterator[list[pgbatch.App]]:
    """Two open Apps using the LLM workload with `config`: one for workers, one embedding."""
    apps = [pgbatch.App(settings=settings_for(database_url)) for _ in range(2)]
    try:
        for application in apps:
            application.use(llm.WORKLOAD)
            application.use(vectors.WORKLOAD)
            runner_of(application).configure(config)
            await application.open()
        yield apps
    finally:
        for application in apps:
            await runner_of(application).aclose()
            await application.close()


def _embedder(app: pgbatch.App, base_url: str, **options: Any) -> OpenAIEmbedder:
    # One input a request unless told: each text is a request the limit counts.
    options.setdefault("batch_inputs", 1)
    return OpenAIEmbedder(
        base_url=base_url, model="e", dimension=EMBEDDING_DIMENSIONS, app=app,
        upstream="default", **options,
    )  # fmt: skip


async def _until(condition: Callable[[], bool], *, timeout_s: float = 30.0) -> None:
    """Wait for a fact, polling with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def _calls(fake: FakeUpstream, url: str) -> list[Served]:
    return sorted((s for s in fake.served if s.url == url), key=lambda s: s.at)


@pytest.mark.asyncio
async def test_an_embedder_and_llm_workers_share_one_requests_budget(database_url: str) -> None:
    """8 requests per window for both: 16 chat requests and 16 embeddings, released together.

    The fake enforces nothing, so only the shared limit keeps the sum under 8 a window.
    """
    fake = FakeUpstream(FakeLimits())
    async with serving(fake) as base_url:
        config = _config(base_url, Limit("default", rpm=8))
        async with _two_apps(database_url, config) as (workers_app, embedder_app):
            batch = await llm.submit_requests(workers_app, _requests(16), shard_size=2)
            embedder = _embedder(embedder_app, base_url, max_concurrency=4)
            worker = workers_app.worker(concurrency=4)
            barrier = asyncio.Barrier(2)

            async def embed() -> list[list[float]]:
                await barrier.wait()
                # A worker claims after a poll: start embedding once it holds budget, so
                # that the two contend for every window rather than one after the other.
                await _until(lambda: runner_of(workers_app).stats.reservations > 0)
                return await embedder.embed([f"text {n}" for n in range(16)])

            async def work() -> None:
                await barrier.wait()
                await worker.run()

            working = asyncio.create_task(work())
            try:
                vectors_out = await asyncio.wait_for(embed(), 120)
                done = await workers_app.wait(batch.id, timeout_s=120)
            finally:
                worker.request_stop()
                await asyncio.wait_for(working, 60)
                await embedder.aclose()
            runner_stats = runner_of(workers_app).stats
    assert (done.items_ok, done.items_failed) == (16, 0)
    assert len(vectors_out) == 16
    chat, embeddings = _calls(fake, CHAT), _calls(fake, EMBEDDINGS)
    assert (len(chat), len(embeddings)) == (16, 16)
    # The two ran at the same time: each side called while the other was calling.
    assert chat[0].at < embeddings[-1].at and embeddings[0].at < chat[-1].at
    # No window at the upstream held more than the limit's 8, whoever sent them...
    requests_in_window, _ = fake.max_in_window(TEST_WINDOW_S)
    assert requests_in_window <= 8
    # ...because both sides were held back by the one limit, not only one of them.
    assert embedder.stats.refusals > 0 and runner_stats.refusals > 0


@pytest.mark.asyncio
async def test_a_429_the_embedder_gets_pauses_the_llm_workers(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake allows 4 requests a window, the limit believes 100: only the pause holds."""
    window_s = 3.0
    monkeypatch.setattr(fake_upstream, "WINDOW_S", window_s)
    monkeypatch.setattr(queries, "WINDOW_S", window_s)
    fake = FakeUpstream(FakeLimits(rpm=4))
    async with serving(fake) as base_url:
        config = _config(base_url, Limit("default", rpm=100))
        async with _two_apps(database_url, config) as (workers_app, embedder_app):
            batch = await llm.submit_requests(workers_app, _requests(2), shard_size=2)
            embedder = _embedder(embedder_app, base_url, max_concurrency=6)
            embedding = asyncio.create_task(embedder.embed([f"text {n}" for n in range(6)]))
            worker = workers_app.worker(concurrency=2)
            working: asyncio.Task[None] | None = None
            try:
                # The embedder has had its 429 and paused the key: now the workers start.
                await _until(lambda: embedder.stats.pauses > 0 or embedding.done())
                working = asyncio.create_task(worker.run())
                done = await workers_app.wait(batch.id, timeout_s=120)
                vectors_out = await asyncio.wait_for(embedding, 120)
            finally:
                worker.request_stop()
                if working is not None:
                    await asyncio.wait_for(working, 60)
                embedding.cancel()
                await embedder.aclose()
            runner_stats = runner_of(workers_app).stats
        pauses = await fetch_one(
            database_url, "SELECT pauses FROM pgbatch.llm_limits WHERE name = 'default'"
        )
    assert (done.items_ok, len(vectors_out)) == (2, 6)
    assert embedder.stats.rate_limited >= 1 and pauses is not None and pauses[0] >= 1
    # The workers asked while the key was paused and were refused...
    assert runner_stats.refusals >= 1
    # ...so no chat request reached the fake until its window was about to free.
    first_refusal = next(s for s in _calls(fake, EMBEDDINGS) if s.status == 429)
    admitted = [s.at for s in fake.served if s.status != 429 and s.at <= first_refusal.at]
    window_end = admitted[-4] + window_s
    early = [s for s in _calls(fake, CHAT) if s.at < window_end - 0.3]
    assert early == [], (first_refusal, window_end, early)


@pytest.mark.asyncio
async def test_a_pause_from_an_llm_429_holds_the_embedder_back(database_url: str) -> None:
    fake = FakeUpstream(FakeLimits())
    async with serving(fake) as base_url:
        config = _config(base_url, Limit("default", rpm=100))
        async with _two_apps(database_url, config) as (workers_app, embedder_app):
            # What an LLM runner does on a 429 (the limit row exists once it reserved).
            limits = PgRateLimits(workers_app)
            await limits.reserve("default", model="m", tokens=[1])
            await limits.pause("default", model="m", wait_s=1.0)
            paused_at = time.monotonic()
            embedder = _embedder(embedder_app, base_url)
            try:
                vectors_out = await embedder.embed(["a", "b"])
            finally:
                await embedder.aclose()
    assert len(vectors_out) == 2
    assert embedder.stats.refusals >= 1
    assert all(s.at >= paused_at + 1.0 - 0.3 for s in fake.served), fake.served


@pytest.mark.asyncio
async def test_embeddings_are_charged_their_input_tokens_and_settled_to_usage(
    database_url: str,
) -> None:
    fake = FakeUpstream(FakeLimits())
    async with serving(fake) as base_url:
        config = _config(base_url, Limit("default", rpm=100, tpm=10_000))
        async with _two_apps(database_url, config) as (_, embedder_app):
            embedder = _embedder(embedder_app, base_url, batch_inputs=2)
            texts = ["x" * 40, "y" * 8, "z" * 400]
            try:
                await embedder.embed(texts)
            finally:
                await embedder.aclose()
            reserved = await fetch_all(
                database_url,
                "SELECT shard_id, requests, tokens, settled FROM pgbatch.llm_reservations "
                "WHERE name = 'default'",
            )
    # One round: both requests reserved together, settled to the fake's usage (which
    # counts the inputs' tokens as the estimate does: 10 + 2, then 100).
    assert reserved == [(0, 2, 112, True)]
    assert sorted(s.tokens for s in fake.served) == [12, 100]


@pytest.mark.asyncio
async def test_a_request_larger_than_the_tokens_per_minute_is_refused_unsent(
    database_url: str,
) -> None:
    fake = FakeUpstream(FakeLimits())
    async with serving(fake) as base_url:
        config = _config(base_url, Limit("default", tpm=50))
        async with _two_apps(database_url, config) as (_, embedder_app):
            embedder = _embedder(embedder_app, base_url)
            try:
                with pytest.raises(EmbedderError, match="more than the limit") as raised:
                    await embedder.embed(["w" * 400])
                with pytest.raises(EmbedderError, match="no LLM upstream 'other'"):
                    embedder.upstream = "other"
                    await embedder.embed(["w"])
            finally:
                await embedder.aclose()
    assert raised.value.retryable is False
    assert fake.served == []


@pytest.mark.asyncio
async def test_the_llm_workload_offers_its_limits_and_only_it(database_url: str) -> None:
    bare = pgbatch.App(settings=settings_for(database_url))
    bare.use(vectors.WORKLOAD)
    assert bare.service(RATE_LIMITS) is None
    bare.use(llm.WORKLOAD)
    assert isinstance(bare.service(RATE_LIMITS), PgRateLimits)


@pytest.mark.asyncio
async def test_a_per_model_limit_charges_the_embedding_model_s_own_key(
    database_url: str,
) -> None:
    fake = FakeUpstream(FakeLimits())
    async with serving(fake) as base_url:
        config = _config(base_url, Limit("default", rpm=100, per_model=True))
        async with _two_apps(database_url, config) as (workers_app, embedder_app):
            # A 429 on the chat model's key pauses that key, not the embedding model's.
            limits = PgRateLimits(workers_app)
            await limits.reserve("default", model="m", tokens=[1])
            await limits.pause("default", model="m", wait_s=60.0)
            embedder = _embedder(embedder_app, base_url)
            try:
                await embedder.embed(["a"])
            finally:
                await embedder.aclose()
            names = await fetch_all(
                database_url, "SELECT name, paused_until IS NOT NULL FROM pgbatch.llm_limits "
                "ORDER BY name",
            )  # fmt: skip
    assert names == [("default/e", False), ("default/m", True)]
    assert embedder.stats.refusals == 0 and len(fake.served) == 1

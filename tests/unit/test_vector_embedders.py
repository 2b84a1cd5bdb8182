"""The OpenAI-compatible embeddings client against the fake upstream: batching, retries."""

from __future__ import annotations

import logging

import httpx
import pytest
import typer

import pgbatch
from pgbatch.workloads import vectors
from pgbatch.workloads.llm import fake_upstream
from pgbatch.workloads.llm.fake_upstream import (
    EMBEDDING_DIMENSIONS,
    FakeLimits,
    FakeUpstream,
    serving,
)
from pgbatch.workloads.vectors import EmbedderError, OpenAIEmbedder
from pgbatch.workloads.vectors.embedders import (
    OPENAI_BACKOFF_MAX_S,
    _retry_after_s,
    estimate_tokens,
)


@pytest.mark.asyncio
async def test_inputs_are_batched_and_5xx_retried_until_every_vector_is_back() -> None:
    fake = FakeUpstream(FakeLimits(error_rate=0.5), api_key="k", seed=3)
    async with serving(fake) as url:
        embedder = OpenAIEmbedder(
            base_url=url, model="m", dimension=EMBEDDING_DIMENSIONS, api_key="k",
            batch_inputs=50, max_attempts=20, backoff_base_s=0.001,
        )  # fmt: skip
        texts = [f"text {n}" for n in range(420)]
        vectors = await embedder.embed(texts)
        again = await embedder.embed(texts[:3])
        await embedder.aclose()
    assert len(vectors) == 420 and all(len(v) == EMBEDDING_DIMENSIONS for v in vectors)
    assert again == vectors[:3]  # order kept across requests and retries
    statuses = [s.status for s in fake.served]
    assert statuses.count(200) == 9 + 1  # ceil(420 / 50) requests, then one more
    assert 500 in statuses  # some were retried


@pytest.mark.asyncio
async def test_a_400_is_not_retried_and_says_so() -> None:
    fake = FakeUpstream()
    async with serving(fake) as url:
        embedder = OpenAIEmbedder(base_url=url, model="m", dimension=EMBEDDING_DIMENSIONS)
        with pytest.raises(EmbedderError, match="400") as raised:
            await embedder.embed(["[fake:400] refused"])
        await embedder.aclose()
    assert raised.value.retryable is False
    assert len(fake.served) == 1


@pytest.mark.asyncio
async def test_a_vector_of_another_width_is_refused() -> None:
    fake = FakeUpstream()
    async with serving(fake) as url:
        embedder = OpenAIEmbedder(base_url=url, model="m", dimension=EMBEDDING_DIMENSIONS + 1)
        with pytest.raises(EmbedderError, match="vectors not of"):
            await embedder.embed(["x"])
        await embedder.aclose()


@pytest.mark.asyncio
async def test_without_shared_limits_a_429_pauses_the_embedder_itself(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An app without the LLM workload offers no limits: the embedder waits on its own."""
    monkeypatch.setattr(fake_upstream, "WINDOW_S", 1.0)
    fake = FakeUpstream(FakeLimits(rpm=2))
    app = pgbatch.App()  # never opened: the fallback needs no database
    app.use(vectors.WORKLOAD)
    async with serving(fake) as url:
        embedder = OpenAIEmbedder(
            base_url=url, model="m", dimension=EMBEDDING_DIMENSIONS, batch_inputs=1,
            max_concurrency=3, app=app, upstream="default",
        )  # fmt: skip
        with caplog.at_level(logging.WARNING):
            vectors_out = await embedder.embed(["a", "b", "c"])
            await embedder.embed(["d"])
        await embedder.aclose()
    assert len(vectors_out) == 3
    assert "no shared rate limits are offered" in caplog.text
    assert caplog.text.count("no shared rate limits") == 1  # said once, not per call
    assert embedder.stats.rate_limited >= 1 and embedder.stats.pauses >= 1
    # After the 429, nothing was sent until the fake's Retry-After had (nearly) passed.
    served = sorted(fake.served, key=lambda s: s.at)
    refused = next(s for s in served if s.status == 429)
    admitted = [s.at for s in served if s.status != 429 and s.at <= refused.at]
    free_at = admitted[-2] + 1.0
    assert all(s.at >= free_at - 0.2 for s in served if s.at > refused.at), served


def test_retry_after_is_read_in_milliseconds_first_and_capped() -> None:
    assert _retry_after_s(httpx.Headers({"retry-after-ms": "1500", "retry-after": "2"})) == 1.5
    assert _retry_after_s(httpx.Headers({"retry-after": "7"})) == 7.0
    assert _retry_after_s(httpx.Headers({"retry-after": "99999"})) == OPENAI_BACKOFF_MAX_S
    assert _retry_after_s(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert _retry_after_s(httpx.Headers({"retry-after": "nan"})) is None


def test_an_embeddings_request_is_estimated_at_its_input_tokens() -> None:
    assert estimate_tokens(["x" * 40, "y" * 9]) == 10 + 3
    assert estimate_tokens([""]) == 1
    assert "secret" not in repr(OpenAIEmbedder("http://h/v1", "m", 8, api_key="secret"))


@pytest.mark.parametrize(
    "body",
    [
        {"data": ["not an object"]},
        {"data": [{"index": "first", "embedding": [1.0, 2.0]}]},
        {"data": [{"index": 0}]},
        {"data": [{"index": 0, "embedding": None}]},
        {"data": [{"index": 0, "embedding": ["x", 1.0]}]},
        {"data": [{"index": 0, "embedding": [float("nan"), 1.0]}]},
        {"data": [{"index": 0, "embedding": [float("inf"), 1.0]}]},
        {"data": [{"index": 0, "embedding": [1e300, 1.0]}]},
        {"data": [{"index": 0, "embedding": [0.0, 0.0]}]},
    ],
)
def test_a_malformed_answer_is_an_embedder_error(body: object) -> None:
    # These raised AttributeError, ValueError, KeyError or TypeError (a search's 500), or
    # passed a NaN or 1e300 on to pgvector, which refuses it (a search's 500 too), or a
    # zero vector, which every search then scores NaN.
    embedder = OpenAIEmbedder(base_url="http://127.0.0.1:9/v1", model="m", dimension=2)
    with pytest.raises(EmbedderError, match="upstream answered") as raised:
        embedder._vectors(body, 1)
    assert raised.value.retryable is False


def test_the_cli_prints_an_embedder_out_of_budget_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `pgbatch libraries search` catches PgbatchError; an EmbedderUnavailableError that
    # was a bare Exception escaped it as a traceback.
    from pgbatch.workloads.vectors import cli
    from pgbatch.workloads.vectors.libraries import EmbedderUnavailableError

    class Closing:
        async def close(self) -> None:
            """Nothing to close."""

    async def search() -> None:
        raise EmbedderUnavailableError("no rate budget on 'u' within 0 s", retry_after_s=3)

    with pytest.raises(typer.Exit) as exited:
        cli._run(Closing(), search())  # type: ignore[arg-type]
    assert exited.value.exit_code == 1
    assert "no rate budget" in capsys.readouterr().err

"""The OpenAI-compatible embeddings client against the fake upstream: batching, retries."""

from __future__ import annotations

import pytest

from pgbatch.workloads.llm.fake_upstream import (
    EMBEDDING_DIMENSIONS,
    FakeLimits,
    FakeUpstream,
    serving,
)
from pgbatch.workloads.vectors import EmbedderError, OpenAIEmbedder


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

"""An LLM worker process and an embedder in this process share one requests budget."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

import pgbatch
from pgbatch.workloads import llm
from pgbatch.workloads.llm import fake_upstream, queries
from pgbatch.workloads.llm.config import Limit, LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import EMBEDDING_DIMENSIONS, FakeUpstream, serving
from pgbatch.workloads.llm.requests import check_request_lines
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.upstream import UpstreamConfig
from pgbatch.workloads.vectors import OpenAIEmbedder
from tests.helpers import WorkerGroup

APP = "pgbatch.demo.llm_openai_app:app"
WINDOW_S = 2.0
REQUESTS_PER_WINDOW = 6
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


def _lines(n: int) -> list[bytes]:
    return [
        orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT,
                      "body": {"model": "m", "max_tokens": 8,
                               "messages": [{"role": "user", "content": f"question {i}"}]}})
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_a_worker_process_and_an_embedder_never_exceed_the_shared_rpm(
    app: pgbatch.App, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_upstream, "WINDOW_S", WINDOW_S)
    monkeypatch.setattr(queries, "WINDOW_S", WINDOW_S)
    fake = FakeUpstream()  # enforces nothing: only the shared limit holds the sum down
    async with serving(fake) as base_url:
        # The worker reads PGBATCH_LLM_*; this process is given the same upstream.
        env = {
            "PGBATCH_LLM_BASE_URL": base_url,
            "PGBATCH_LLM_RPM": str(REQUESTS_PER_WINDOW),
            "PGBATCH_LLM_WINDOW_S": str(WINDOW_S),
            "PGBATCH_POLL_INTERVAL_S": "0.2",
        }
        app.use(llm.WORKLOAD)
        limit = Limit("default", rpm=REQUESTS_PER_WINDOW)
        upstream = Upstream("default", UpstreamConfig(base_url=base_url), limit=limit)
        runner_of(app).configure(LlmConfig({"default": upstream}))
        embedder = OpenAIEmbedder(
            base_url=base_url, model="e", dimension=EMBEDDING_DIMENSIONS, batch_inputs=1,
            app=app, upstream="default",
        )  # fmt: skip
        requests = list(check_request_lines(_lines(18), CHAT))
        batch = await llm.submit_requests(app, requests, shard_size=2)
        group = WorkerGroup(database_url, tmp_path, env=env)
        try:
            group.start(name="w0", concurrency=4, args=["--app", APP])
            # Embed once the worker process is calling: fewer texts than a window holds, so
            # only the worker's share of the window can make the limit refuse the embedder.
            deadline = time.monotonic() + 60
            while not any(s.url == CHAT for s in fake.served):
                assert time.monotonic() < deadline, group.logs()
                await asyncio.sleep(0.02)
            vectors_out = await embedder.embed([f"text {n}" for n in range(5)])
            done = await app.wait(batch.id, timeout_s=120)
        finally:
            group.stop_all()
            await embedder.aclose()
    assert (done.items_ok, done.items_failed) == (18, 0), group.logs()
    assert len(vectors_out) == 5
    assert sum(1 for s in fake.served if s.url == EMBEDDINGS) == 5
    requests_in_window, _ = fake.max_in_window(WINDOW_S)
    assert requests_in_window <= REQUESTS_PER_WINDOW
    assert embedder.stats.refusals > 0

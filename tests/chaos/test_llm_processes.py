"""Three worker processes share one low tokens-per-minute limit through PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

import pgbatch
from pgbatch.workloads import llm
from pgbatch.workloads.llm import fake_upstream
from pgbatch.workloads.llm.fake_upstream import FakeLimits, FakeUpstream, serving
from pgbatch.workloads.llm.requests import check_request_lines
from pgbatch.workloads.llm.usage import estimate_tokens
from tests.helpers import WorkerGroup

APP = "pgbatch.demo.llm_openai_app:app"
# A 2 s window for the fake and the workers' limit alike: the run spends ~6 windows.
WINDOW_S = 2.0
TOKENS_PER_WINDOW = 150
REQUESTS = 45


def _lines() -> list[bytes]:
    return [
        orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "m", "max_tokens": 8,
                               "messages": [{"role": "user", "content": f"question {i:03d}"}]}})
        for i in range(REQUESTS)
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_three_processes_under_a_low_tpm_send_no_429_storm(
    app: pgbatch.App, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_upstream, "WINDOW_S", WINDOW_S)
    fake = FakeUpstream(FakeLimits(tpm=TOKENS_PER_WINDOW))
    requests = list(check_request_lines(_lines(), "/v1/chat/completions"))
    per_request = estimate_tokens(requests[0].url, requests[0].body)
    # The tokens limit is the binding one: a window holds only a few requests.
    assert TOKENS_PER_WINDOW // per_request < REQUESTS // 4
    async with serving(fake) as base_url:
        env = {
            "PGBATCH_LLM_BASE_URL": base_url,
            "PGBATCH_LLM_TPM": str(TOKENS_PER_WINDOW),
            "PGBATCH_LLM_WINDOW_S": str(WINDOW_S),
            "PGBATCH_POLL_INTERVAL_S": "0.2",
        }
        group = WorkerGroup(database_url, tmp_path, env=env)
        try:
            app.use(llm.WORKLOAD)
            batch = await llm.submit_requests(app, requests, shard_size=3)
            for i in range(3):
                group.start(name=f"w{i}", concurrency=4, args=["--app", APP])
            done = await app.wait(batch.id, timeout_s=120)
        finally:
            group.stop_all()
    assert (done.items_ok, done.items_failed) == (REQUESTS, 0), group.logs()
    # No window at the fake ever held more than the limit, so it refused nothing.
    _, tokens_in_window = fake.max_in_window(WINDOW_S)
    assert tokens_in_window <= TOKENS_PER_WINDOW
    assert fake.rejected() == 0

"""Issue 10 review: the response cache is per upstream. Its key was the request alone, so a
cached file sent to upstream "other" (another server, maybe another model behind the same
name) was answered with "default"'s stored answers and never reached "other"."""

from __future__ import annotations

import pytest

import pgbatch
from pgbatch.workloads import llm
from pgbatch.workloads.llm.config import LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import FakeUpstream, serving
from pgbatch.workloads.llm.upstream import UpstreamConfig
from tests.integration.test_llm_engine import _requests, _workers


@pytest.mark.asyncio
async def test_a_cached_answer_of_one_upstream_does_not_answer_another(
    app: pgbatch.App,
) -> None:
    first_fake, other_fake = FakeUpstream(), FakeUpstream()
    async with serving(first_fake) as first_url, serving(other_fake) as other_url:
        config = LlmConfig(
            {
                name: Upstream(name, UpstreamConfig(base_url=url, timeout_s=5.0))
                for name, url in (("default", first_url), ("other", other_url))
            }
        )
        app.use(llm.WORKLOAD)
        async with _workers([app], config):
            runs = []
            for upstream in ("default", "other", "other"):
                run = await llm.submit_requests(app, _requests(4), cache=True, upstream=upstream)
                await app.wait(run.id, timeout_s=60)
                runs.append(run)
    assert sum(first_fake.calls.values()) == 4
    assert sum(other_fake.calls.values()) == 4, "the other upstream was answered from cache"
    for run in runs:
        assert (await app.get_batch(run.id)).items_ok == 4

"""The fake OpenAI upstream: limits enforced with 429 + Retry-After, answers with usage."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pgbatch.workloads.llm.fake_upstream import FakeLimits, FakeUpstream
from pgbatch.workloads.llm.usage import estimate_tokens, usage_of

CHAT = "/v1/chat/completions"


def chat(text: str = "hello", max_tokens: int = 16) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


def client(fake: FakeUpstream, key: str | None = None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=fake.app)
    return httpx.AsyncClient(transport=transport, base_url="http://fake", headers=headers)


@pytest.mark.asyncio
async def test_answers_have_each_endpoints_shape_and_usage() -> None:
    fake = FakeUpstream()
    async with client(fake) as http:
        answer = (await http.post(CHAT, json=chat("say hi"))).json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == "echo: say hi"
        assert usage_of(answer).completion_tokens <= 16
        assert usage_of(answer).total_tokens <= estimate_tokens(CHAT, chat("say hi"))
        again = (await http.post(CHAT, json=chat("say hi"))).json()
        assert again["choices"] == answer["choices"] and again["id"] != answer["id"]

        embedded = await http.post("/v1/embeddings", json={"model": "e", "input": ["a", "b"]})
        data = embedded.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and len(data[0]["embedding"]) == 8
        assert data[0]["embedding"] != data[1]["embedding"]
        response = await http.post("/v1/responses", json={"model": "m", "input": "q"})
        assert response.json()["output"][0]["content"][0]["text"] == "echo: q"
        assert usage_of(response.json()).prompt_tokens >= 1
        done = await http.post("/v1/completions", json={"model": "m", "prompt": "p"})
        assert done.json()["choices"][0]["text"] == "echo: p"
        assert done.headers["x-request-id"].startswith("req_")
    assert sum(fake.calls.values()) == 5


@pytest.mark.asyncio
async def test_requests_per_minute_are_enforced_with_retry_after() -> None:
    fake = FakeUpstream(FakeLimits(rpm=5))
    async with client(fake) as http:
        statuses = [(await http.post(CHAT, json=chat(str(n)))).status_code for n in range(5)]
        refused = await http.post(CHAT, json=chat("six"))
    assert statuses == [200] * 5
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert fake.rejected() == 1 and fake.max_in_window(60) == (5, 5 * fake.served[0].tokens)


@pytest.mark.asyncio
async def test_tokens_per_minute_count_the_answers_cap() -> None:
    cost = estimate_tokens(CHAT, chat(max_tokens=100))
    fake = FakeUpstream(FakeLimits(tpm=cost * 3))
    async with client(fake) as http:
        codes = [(await http.post(CHAT, json=chat(max_tokens=100))).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        # A small request fits in what the window has left; lowering the limit mid-run
        # (a 429 storm) refuses it.
        fake.set_limits(tpm=cost * 3 + 10)
        small = {"model": "m", "prompt": "", "max_tokens": 1}
        assert (await http.post("/v1/completions", json=small)).status_code == 200
        fake.set_limits(tpm=cost)
        assert (await http.post("/v1/completions", json=small)).status_code == 429


@pytest.mark.asyncio
async def test_markers_errors_and_keys() -> None:
    fake = FakeUpstream(api_key="sk-test")
    async with client(fake) as anonymous:
        assert (await anonymous.post(CHAT, json=chat())).status_code == 401
    async with client(fake, "sk-test") as http:
        assert (await http.post(CHAT, json=chat("[fake:400] x"))).status_code == 400
        failed = await http.post(CHAT, json=chat("[fake:500] x"))
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert (await http.post(CHAT, content=b"{not json")).status_code == 400
        assert (await http.post(CHAT, json={"messages": []})).status_code == 400
    flaky = FakeUpstream(FakeLimits(error_rate=0.5), seed=7)
    async with client(flaky) as http:
        codes = [(await http.post(CHAT, json=chat(str(n)))).status_code for n in range(200)]
    assert 60 < codes.count(500) < 140 and codes.count(200) == 200 - codes.count(500)

"""The upstream client: model mapping, retryable or not, Retry-After read, never a raise."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from pgbatch.workloads.llm.fake_upstream import FakeLimits, FakeUpstream, serving
from pgbatch.workloads.llm.results import is_error_line, result_line
from pgbatch.workloads.llm.upstream import (
    MAX_RETRY_AFTER_S,
    Reply,
    UpstreamClient,
    UpstreamConfig,
    retry_after_s,
)

CHAT = "/v1/chat/completions"
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def on_fake(fake: FakeUpstream, **config: Any) -> UpstreamClient:
    settings = UpstreamConfig(base_url="http://fake/v1", **config)
    return UpstreamClient(settings, transport=httpx.ASGITransport(app=fake.app))


@pytest.mark.asyncio
async def test_a_request_is_sent_with_the_key_and_the_mapped_model() -> None:
    fake = FakeUpstream(api_key="sk-1")
    client = on_fake(fake, api_key="sk-1", models={"gpt-4o-mini": "llama3"})
    try:
        reply = await client.send(CHAT, BODY)
    finally:
        await client.aclose()
    assert reply.ok and not reply.retryable and reply.retry_after_s is None
    assert reply.body["model"] == "llama3" and fake.served[0].model == "llama3"
    line = result_line("batch_req_1", "c1", reply)
    assert line["response"]["status_code"] == 200 and line["error"] is None
    assert line["response"]["request_id"] == reply.request_id and not is_error_line(line)
    assert BODY["model"] == "gpt-4o-mini", "the caller's body was changed"


@pytest.mark.asyncio
async def test_what_can_and_cannot_be_retried() -> None:
    fake = FakeUpstream(FakeLimits(rpm=1))
    client = on_fake(fake)
    try:
        assert (await client.send(CHAT, BODY)).ok
        limited = await client.send(CHAT, BODY)
        fake.set_limits(rpm=None)
        refused = await client.send(CHAT, {**BODY, "messages": [{"content": "[fake:400]"}]})
        broken = await client.send(CHAT, {**BODY, "messages": [{"content": "[fake:500]"}]})
    finally:
        await client.aclose()
    assert limited.rate_limited and limited.retryable
    assert limited.retry_after_s is not None and 1 <= limited.retry_after_s <= 60
    assert refused.status_code == 400 and not refused.retryable
    assert is_error_line(result_line("i", "c", refused))
    assert broken.status_code == 500 and broken.retryable and broken.retry_after_s is None


@pytest.mark.asyncio
async def test_no_answer_is_a_retryable_reply_not_an_exception() -> None:
    fake = FakeUpstream()
    async with serving(fake) as base_url:
        client = UpstreamClient(UpstreamConfig(base_url=base_url, timeout_s=0.3))
        try:
            hung = await client.send(CHAT, {**BODY, "messages": [{"content": "[fake:hang]"}]})
            assert (await client.send(CHAT, BODY)).ok, "the slot of the timed-out request leaked"
        finally:
            await client.aclose()
    assert hung.status_code is None and hung.retryable and "timeout" in (hung.failure or "")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again at once: nothing listens there
    closed = UpstreamClient(UpstreamConfig(base_url=f"http://127.0.0.1:{port}/v1"))
    try:
        refused = await closed.send(CHAT, BODY)
    finally:
        await closed.aclose()
    assert refused.status_code is None and refused.retryable
    line = result_line("i", "c", refused)
    assert line["response"] is None and line["error"]["code"] == "upstream_unavailable"


@pytest.mark.asyncio
async def test_a_body_that_is_not_json_is_kept_as_an_error_excerpt() -> None:
    def html(_: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    client = UpstreamClient(
        UpstreamConfig(base_url="http://x/v1"), transport=httpx.MockTransport(html)
    )
    try:
        reply = await client.send(CHAT, BODY)
    finally:
        await client.aclose()
    assert reply.status_code == 502 and reply.retryable
    assert reply.body["error"]["message"] == "<html>bad gateway</html>"


def test_retry_after_in_every_form_upstreams_send() -> None:
    assert retry_after_s({"Retry-After": "7"}) == 7
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=1445412500) == 10
    assert retry_after_s({"x-ratelimit-reset-requests": "6m0s"}) == MAX_RETRY_AFTER_S
    assert retry_after_s({"x-ratelimit-reset-tokens": "1m30s"}) == 90
    assert retry_after_s({"x-ratelimit-reset-tokens": "20ms"}) == pytest.approx(0.02)
    assert retry_after_s({"retry-after": "99999"}) == MAX_RETRY_AFTER_S
    for useless in ({}, {"retry-after": "soon"}, {"retry-after": "-1"}, {"retry-after": "nan"}):
        assert retry_after_s(useless) is None


def test_configuration_is_checked() -> None:
    bad_configs: list[tuple[dict[str, Any], str]] = [
        ({"base_url": "localhost:8000"}, "base_url"),
        ({"base_url": "http://x", "timeout_s": 0}, "timeout_s"),
        ({"base_url": "http://x", "max_concurrency": 0}, "max_concurrency"),
    ]
    for bad, fragment in bad_configs:
        with pytest.raises(ValueError, match=fragment):
            UpstreamConfig(**bad)
    assert UpstreamConfig("http://h:1/v1").endpoint_url(CHAT) == "http://h:1/v1/chat/completions"
    assert UpstreamConfig("http://h:1/").endpoint_url(CHAT) == "http://h:1/v1/chat/completions"
    assert Reply(408).retryable and not Reply(404).retryable

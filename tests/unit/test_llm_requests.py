"""The OpenAI batch request format: every bad line named by number, usage and cost read right."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pgbatch.errors import InvalidBatchError
from pgbatch.workloads.llm.requests import (
    MAX_REPORTED_ERRORS,
    MAX_REQUEST_BYTES,
    RequestFileError,
    check_request_lines,
)
from pgbatch.workloads.llm.usage import (
    DEFAULT_COMPLETION_TOKENS,
    Price,
    Usage,
    cache_key,
    estimate_tokens,
    parse_prices,
    usage_of,
)

CHAT = "/v1/chat/completions"


def line(custom_id: Any = "r1", **overrides: Any) -> bytes:
    request = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hello"}]},
    }
    request.update(overrides)
    return json.dumps(request).encode()


def test_a_good_file_yields_its_requests_in_order() -> None:
    requests = list(check_request_lines([line("a"), b"", line("b"), b"\n"], CHAT))
    assert [(r.line, r.custom_id) for r in requests] == [(1, "a"), (3, "b")]
    assert requests[0].as_item() == {
        "custom_id": "a",
        "url": CHAT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hello"}]},
    }


BAD_LINES: list[tuple[str, bytes, str, str | None]] = [
    ("not JSON", b'{"custom_id": "x",', "invalid_json_line", None),
    ("not an object", b"[1, 2]", "invalid_request", None),
    ("no custom_id", line(None), "missing_required_parameter", "custom_id"),
    ("custom_id not text", line(7), "missing_required_parameter", "custom_id"),
    ("custom_id too long", line("x" * 513), "invalid_custom_id", "custom_id"),
    ("GET", line(method="GET"), "invalid_method", "method"),
    ("unknown url", line(url="/v1/images/generations"), "invalid_url", "url"),
    ("other endpoint", line(url="/v1/embeddings"), "mismatched_endpoint", "url"),
    ("no body", line(body=None), "missing_required_parameter", "body"),
    ("no model", line(body={"messages": []}), "missing_required_parameter", "body.model"),
    ("stream", line(body={"model": "m", "stream": True}), "invalid_request", "body.stream"),
]


@pytest.mark.parametrize(("raw", "code", "param"), [c[1:] for c in BAD_LINES],
                         ids=[c[0] for c in BAD_LINES])  # fmt: skip
def test_a_bad_line_fails_the_file_with_its_number(
    raw: bytes, code: str, param: str | None
) -> None:
    lines = [line(f"ok{n}") for n in range(6)] + [raw] + [line("ok9")]
    consumed: list[str] = []
    with pytest.raises(RequestFileError) as caught:
        for request in check_request_lines(lines, CHAT):
            consumed.append(request.custom_id)
    assert [(e.line, e.code, e.param) for e in caught.value.errors] == [(7, code, param)]
    assert consumed == [f"ok{n}" for n in range(6)]
    assert isinstance(caught.value, InvalidBatchError)
    assert str(caught.value).startswith("line 7: ")
    entry = caught.value.errors[0].as_openai()
    assert set(entry) == {"code", "message", "param", "line"}


def test_duplicates_name_both_lines_and_nothing_after_an_error_is_yielded() -> None:
    lines = [line("a"), line("b"), line("a"), line("c")]
    consumed: list[str] = []
    with pytest.raises(RequestFileError) as caught:
        for request in check_request_lines(lines, None):
            consumed.append(request.custom_id)
    assert consumed == ["a", "b"]
    (error,) = caught.value.errors
    assert (error.line, error.code) == (3, "duplicate_custom_id")
    assert "line 1" in error.message


def test_an_oversized_line_is_refused_without_parsing() -> None:
    huge = b'{"custom_id": "big", "pad": "' + b"x" * MAX_REQUEST_BYTES + b'"}'
    with pytest.raises(RequestFileError) as caught:
        list(check_request_lines([line("a"), huge], CHAT))
    assert [(e.line, e.code) for e in caught.value.errors] == [(2, "request_too_large")]


def test_an_empty_file_and_many_bad_lines() -> None:
    with pytest.raises(RequestFileError) as caught:
        list(check_request_lines([b"", b"  "], CHAT))
    assert [e.code for e in caught.value.errors] == ["empty_file"]
    with pytest.raises(RequestFileError) as caught:
        list(check_request_lines([b"nope"] * 1000, CHAT))
    assert len(caught.value.errors) == MAX_REPORTED_ERRORS
    assert "(and 99 more)" in str(caught.value)


def test_usage_is_read_from_each_endpoint_shape() -> None:
    chat = {"usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
                      "prompt_tokens_details": {"cached_tokens": 100}}}  # fmt: skip
    assert usage_of(chat) == Usage(120, 30, 100)
    responses = {"usage": {"input_tokens": 9, "output_tokens": 4,
                           "input_tokens_details": {"cached_tokens": 0}}}  # fmt: skip
    assert usage_of(responses) == Usage(9, 4, 0)
    assert usage_of({"usage": {"prompt_tokens": 5, "total_tokens": 5}}) == Usage(5, 0, 0)
    for hostile in (None, [], {"usage": "x"}, {"usage": {"prompt_tokens": -3}},
                    {"usage": {"prompt_tokens": True}}):  # fmt: skip
        assert usage_of(hostile) == Usage()
    # More cached than prompt tokens would make a negative fresh share in the cost.
    assert usage_of({"usage": {"prompt_tokens": 2, "prompt_tokens_details": {"cached_tokens": 9}}}
                    ) == Usage(2, 0, 2)  # fmt: skip
    assert Usage(1, 2, 0) + Usage(10, 20, 5) == Usage(11, 22, 5)


def test_estimates_reserve_the_answers_cap() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_tokens(CHAT, body) == 4 + 100 + 50
    assert estimate_tokens(CHAT, {**body, "n": 3}) == 4 + 100 + 150
    assert estimate_tokens(CHAT, {"model": "m", "messages": []}) == 1 + DEFAULT_COMPLETION_TOKENS
    parts = [{"role": "user", "content": [{"type": "text", "text": "y" * 40}]}]
    assert (
        estimate_tokens(CHAT, {"model": "m", "messages": parts, "max_completion_tokens": 1}) == 15
    )
    assert estimate_tokens("/v1/embeddings", {"model": "e", "input": ["abcd", "efgh"]}) == 2
    assert estimate_tokens("/v1/embeddings", {"model": "e", "input": [1, 2, 3]}) == 3
    assert estimate_tokens("/v1/responses", {"model": "m", "input": "z" * 8,
                                             "max_output_tokens": 7}) == 9  # fmt: skip
    assert estimate_tokens("/v1/completions", {"model": "m", "prompt": "abc", "max_tokens": 2}) == 3


def test_cost_and_price_tables() -> None:
    prices = parse_prices({"m": {"input": 2.0, "output": 8, "cached_input": 0.5}, "e": {
        "input": 0.02, "output": 0}})  # fmt: skip
    assert prices["m"].cost(Usage(1_000_000, 500_000, 400_000)) == pytest.approx(
        0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 8
    )
    assert prices["e"] == Price(input=0.02, output=0.0)
    assert prices["e"].cost(Usage(1_000_000, 0, 1_000_000)) == pytest.approx(0.02)
    bad_tables = [
        ({"m": 3}, "'m'"),
        ({"m": {"input": -1, "output": 1}}, "input"),
        ({"m": {"input": 1}}, "output"),
        ({"m": {"input": True, "output": 1}}, "input"),
        ({"m": {"input": 1, "output": 1, "typo": 2}}, "typo"),
    ]
    for bad, fragment in bad_tables:
        with pytest.raises(ValueError, match=fragment):
            parse_prices(bad)


def test_the_cache_key_ignores_field_order_only() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    reordered = {"temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert cache_key(CHAT, body) == cache_key(CHAT, reordered)
    assert cache_key(CHAT, body) != cache_key(CHAT, {**body, "temperature": 1})
    assert cache_key(CHAT, body) != cache_key("/v1/completions", body)

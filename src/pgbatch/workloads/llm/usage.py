"""Token estimates before a call, usage read from its response, cost from a price table."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "DEFAULT_COMPLETION_TOKENS",
    "Price",
    "Usage",
    "cache_key",
    "completion_cap",
    "estimate_tokens",
    "parse_prices",
    "usage_of",
]

# Reserved for the answer when a request names no max_tokens: providers count the
# model's cap against the limit then; this is a typical completion, settled to the real
# figure afterwards.
DEFAULT_COMPLETION_TOKENS = 1024
# About four characters of English text per token in OpenAI's tokenizers: an estimate
# for reserving budget, corrected by the response's `usage`.
CHARS_PER_TOKEN = 4
# What a chat message costs beyond its text (role and separators).
TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one request (or a sum of requests) used."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Return prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        """Return the sum of two usages."""
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million tokens for one model: input, cached input and output."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, usage: Usage) -> float:
        """Return what the usage costs; cached prompt tokens at the cached rate."""
        cached_rate = self.input if self.cached_input is None else self.cached_input
        fresh = usage.prompt_tokens - usage.cached_tokens
        return (
            fresh * self.input
            + usage.cached_tokens * cached_rate
            + usage.completion_tokens * self.output
        ) / 1_000_000


def parse_prices(document: Mapping[str, Any]) -> dict[str, Price]:
    """Read a price table `{model: {"input": $, "output": $, "cached_input": $}}` per 1M tokens.

    Raises ValueError naming the model and field of a bad entry.
    """
    prices: dict[str, Price] = {}
    for model, entry in document.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"price of {model!r} must be an object with input and output")
        values: dict[str, float] = {}
        for field in ("input", "output", "cached_input"):
            value = entry.get(field)
            if value is None and field == "cached_input":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"price of {model!r}: {field} must be a number >= 0")
            values[field] = float(value)
        unknown = set(entry) - {"input", "output", "cached_input"}
        if unknown:
            raise ValueError(f"price of {model!r}: unknown field {sorted(unknown)[0]!r}")
        prices[model] = Price(**values)
    return prices


def _text_tokens(value: Any) -> int:
    """Estimate the tokens of the text in a prompt, message content or input value."""
    if isinstance(value, str):
        return -(-len(value) // CHARS_PER_TOKEN)
    if isinstance(value, list):
        return sum(_text_tokens(part) for part in value)
    if isinstance(value, dict):
        # A content part ({"type": "text", "text": ...}) or a message ({"content": ...}).
        return sum(_text_tokens(value[key]) for key in ("text", "content", "input") if key in value)
    return 0


def completion_cap(body: Mapping[str, Any]) -> int:
    """Return the most tokens the request lets its answer have (a default when unset)."""
    for name in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_COMPLETION_TOKENS


def estimate_tokens(url: str, body: Mapping[str, Any]) -> int:
    """Estimate the tokens a request may use, its answer's cap included (reserve before)."""
    if url == "/v1/embeddings":
        inputs = body.get("input")
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], int):
            return len(inputs)  # already tokens
        return max(1, _text_tokens(inputs))
    if url == "/v1/chat/completions":
        messages = body.get("messages")
        prompt = (
            sum(TOKENS_PER_MESSAGE + _text_tokens(m) for m in messages if isinstance(m, dict))
            if isinstance(messages, list)
            else 0
        )
    elif url == "/v1/responses":
        prompt = _text_tokens(body.get("input")) + _text_tokens(body.get("instructions"))
    else:
        prompt = _text_tokens(body.get("prompt"))
    cap = completion_cap(body)
    choices = body.get("n")
    answers = (
        choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 0 else 1
    )
    return max(1, prompt) + cap * answers


def usage_of(body: Any) -> Usage:
    """Read the `usage` of a response body (chat, completions, embeddings or responses)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return Usage()

    def number(source: Any, *names: str) -> int:
        for name in names:
            value = source.get(name) if isinstance(source, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return 0

    prompt = number(usage, "prompt_tokens", "input_tokens")
    completion = number(usage, "completion_tokens", "output_tokens")
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = min(prompt, number(details, "cached_tokens"))
    return Usage(prompt, completion, cached)


def cache_key(url: str, body: Mapping[str, Any], upstream: str | None = None) -> bytes:
    """Return the SHA-256 of a request's canonical form: the same request, the same key.

    Keys are sorted so that field order does not matter; every field counts (model,
    messages, temperature, seed...), so a changed parameter is a different request.
    `upstream` names a non-default upstream: another server's answer is not this one's
    (the default's keys stay as they were, so its stored answers still match).
    """
    request: dict[str, Any] = {"url": url, "body": body}
    if upstream is not None:
        request["upstream"] = upstream
    canonical = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()

"""Read and check a request file in the OpenAI batch format, one JSON request per line.

A line is `{"custom_id": str, "method": "POST", "url": "/v1/...", "body": {...}}`. A file
is checked whole before anything runs, as OpenAI does: every bad line is reported with
its line number (up to `MAX_REPORTED_ERRORS`), and one bad line fails the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from pgbatch.errors import InvalidBatchError

__all__ = [
    "ENDPOINTS",
    "MAX_CUSTOM_ID_CHARS",
    "MAX_REPORTED_ERRORS",
    "MAX_REQUEST_BYTES",
    "LineError",
    "LlmRequest",
    "RequestFileError",
    "check_request_lines",
    "parse_request_line",
]

# The endpoints OpenAI's batch API runs and pgbatch forwards to an upstream.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# OpenAI documents no bound; 512 characters holds any id people build (a UUID, a path,
# a composite key) and keeps one from being a megabyte of text stored per result.
MAX_CUSTOM_ID_CHARS = 512
# One request, base64 images included: a shard of 100 such still claims in one piece.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# A file with a million bad lines reports the first hundred, like OpenAI's `errors`.
MAX_REPORTED_ERRORS = 100


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """One checked request of a file: its line, id, endpoint and JSON body."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]

    def as_item(self) -> dict[str, Any]:
        """Return the request as a pgbatch item (what a shard's handler receives)."""
        return {"custom_id": self.custom_id, "url": self.url, "body": self.body}


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one line of a request file was refused, in OpenAI's batch error shape."""

    line: int | None
    code: str
    message: str
    param: str | None = None

    def as_openai(self) -> dict[str, Any]:
        """Return the error as an entry of an OpenAI batch's `errors.data`."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


class RequestFileError(InvalidBatchError):
    """A request file failed validation; `errors` names each bad line."""

    def __init__(self, errors: list[LineError]) -> None:
        first = errors[0]
        where = f"line {first.line}: " if first.line is not None else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{where}{first.message}{more}", field=first.param or "file")
        self.errors = errors


def parse_request_line(raw: bytes, line: int, endpoint: str | None) -> LlmRequest | LineError:
    """Parse one line; return the request, or the reason it is refused.

    `endpoint`, when given, is the batch's: every line's `url` must equal it.
    """
    if len(raw) > MAX_REQUEST_BYTES:
        return LineError(
            line,
            "request_too_large",
            f"the request is {len(raw)} bytes; at most {MAX_REQUEST_BYTES} are accepted per line",
            None,
        )
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return LineError(line, "invalid_json_line", f"not valid JSON: {exc}")
    if not isinstance(value, dict):
        return LineError(line, "invalid_request", "a line must be a JSON object")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(
            line, "missing_required_parameter", "custom_id must be a non-empty string", "custom_id"
        )
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return LineError(
            line,
            "invalid_custom_id",
            f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters",
            "custom_id",
        )
    method = value.get("method")
    if method != "POST":
        return LineError(line, "invalid_method", f"method must be POST, not {method!r}", "method")
    url = value.get("url")
    if not isinstance(url, str) or url not in ENDPOINTS:
        return LineError(
            line, "invalid_url", f"url must be one of {', '.join(ENDPOINTS)}, not {url!r}", "url"
        )
    if endpoint is not None and url != endpoint:
        return LineError(
            line,
            "mismatched_endpoint",
            f"url {url} differs from the batch's endpoint {endpoint}",
            "url",
        )
    body = value.get("body")
    if not isinstance(body, dict):
        return LineError(line, "missing_required_parameter", "body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return LineError(
            line,
            "missing_required_parameter",
            "body.model must be a non-empty string",
            "body.model",
        )
    if body.get("stream"):
        return LineError(
            line, "invalid_request", "streaming is not supported in a batch", "body.stream"
        )
    return LlmRequest(line=line, custom_id=custom_id, url=url, body=body)


def check_request_lines(lines: Iterable[bytes], endpoint: str | None) -> Iterator[LlmRequest]:
    """Yield every request of a file, or raise RequestFileError naming its bad lines.

    Blank lines are skipped (a trailing newline is common); an empty file is refused.
    Requests are yielded as they are read, so a caller may stream them into a
    transaction and roll it back when the error comes at the end.
    """
    seen: dict[str, int] = {}
    errors: list[LineError] = []
    count = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        parsed = parse_request_line(raw, number, endpoint)
        if isinstance(parsed, LlmRequest):
            first = seen.setdefault(parsed.custom_id, number)
            if first != number:
                parsed = LineError(
                    number,
                    "duplicate_custom_id",
                    f"custom_id {parsed.custom_id!r} is also on line {first}",
                    "custom_id",
                )
        if isinstance(parsed, LineError):
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(parsed)
            continue
        count += 1
        if not errors:
            yield parsed
    if not errors and count == 0:
        errors.append(LineError(None, "empty_file", "the file holds no request"))
    if errors:
        raise RequestFileError(errors)

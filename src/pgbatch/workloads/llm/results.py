"""Result lines in the OpenAI batch output format: one per request, output or error file."""

from __future__ import annotations

from typing import Any

from pgbatch.workloads.llm.upstream import Reply

__all__ = ["failure_line", "is_error_line", "result_line"]


def result_line(line_id: str, custom_id: str, reply: Reply) -> dict[str, Any]:
    """Return the output line for an upstream reply.

    An HTTP answer of any status keeps its status and body under `response` (OpenAI puts
    a 4xx there, in the error file); no answer at all is an `error` with no response.
    """
    if reply.status_code is None:
        return failure_line(line_id, custom_id, "upstream_unavailable", reply.failure or "")
    response = {
        "status_code": reply.status_code,
        "request_id": reply.request_id or "",
        "body": reply.body,
    }
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": None}


def failure_line(line_id: str, custom_id: str, code: str, message: str) -> dict[str, Any]:
    """Return the line of a request that got no answer (unreachable, cancelled, expired)."""
    return {
        "id": line_id,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def is_error_line(line: dict[str, Any]) -> bool:
    """Tell whether a line belongs in the error file rather than the output file."""
    response = line.get("response")
    if line.get("error") is not None or not isinstance(response, dict):
        return True
    status = response.get("status_code")
    return not (isinstance(status, int) and 200 <= status < 300)

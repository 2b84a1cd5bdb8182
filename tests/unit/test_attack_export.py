"""Attack on issue 12 §1/§4: `pgbatch results` and GET /v1/batches/{id}/results share one
encoder, so a failed item's NDJSON line carries its `traceback` in both. Seen failing: the
API's route had its own copy that added `traceback`, while `pgbatch results --errors`
(pgbatch.export) printed `{seq, ok, output, error}` only."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from pgbatch.export import encode_results
from pgbatch.models import Outcome

ROWS = [
    (0, Outcome(True, {"x": 1}, None)),
    (1, Outcome(False, None, "failed after 1 attempts: KeyError: 'p'", "Traceback ...\n")),
    (2, Outcome(False, None, "returned error")),
]


async def _rows() -> AsyncIterator[tuple[int, Outcome]]:
    for row in ROWS:
        yield row


@pytest.mark.asyncio
async def test_failed_ndjson_lines_carry_their_traceback_and_csv_has_none() -> None:
    ndjson = b"".join([c async for c in encode_results(_rows(), "ndjson")])
    lines = [orjson.loads(line) for line in ndjson.splitlines()]
    assert lines[0] == {"seq": 0, "ok": True, "output": {"x": 1}, "error": None}
    assert lines[1]["traceback"] == "Traceback ...\n"
    assert "traceback" in lines[2] and lines[2]["traceback"] is None
    csv = b"".join([c async for c in encode_results(_rows(), "csv")]).decode()
    assert csv.splitlines()[0] == "seq,ok,output,error"

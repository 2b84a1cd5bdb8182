"""Issue 12: a failure's traceback in the API: the batch's last error (insight), the
failed items' results (?status=error) and the error groups' samples, as plain text."""

from __future__ import annotations

import orjson
import pytest

from tests.api.conftest import StartApi
from tests.api.support import assert_error
from tests.helpers import wait_until

HOSTILE = "<script>alert(1)</script> [/red] [bold]"


@pytest.mark.asyncio
async def test_tracebacks_reach_results_error_groups_and_the_last_error(
    start_api: StartApi,
) -> None:
    async with start_api(tenants=("acme", "globex")) as api, api.client("acme") as acme:
        items = [0, {"raise": HOSTILE}, 2, 3, {"raise": HOSTILE}, 5, 6, 7, 8, 9, 10]
        created = await acme.post("/v1/batches", json={"task": "poison", "items": items})
        assert created.status_code == 201, created.text
        batch_id = created.json()["id"]

        async def finished() -> bool:
            return bool((await acme.get(f"/v1/batches/{batch_id}")).json()["is_final"])

        await wait_until(finished, 30)
        batch = (await acme.get(f"/v1/batches/{batch_id}")).json()
        # The poison items failed alone; the other nine succeeded.
        assert (batch["status"], batch["items_ok"], batch["items_failed"]) == ("succeeded", 9, 2)

        answer = await acme.get(f"/v1/batches/{batch_id}/results", params={"status": "error"})
        assert answer.status_code == 200
        lines = [orjson.loads(line) for line in answer.content.splitlines()]
        assert [line["seq"] for line in lines] == [1, 4]
        for line in lines:
            assert line["error"] == f"failed after 1 attempts: ValueError: {HOSTILE}"
            assert "in poison" in line["traceback"] and HOSTILE in line["traceback"]
        everything = await acme.get(f"/v1/batches/{batch_id}/results")
        rows = [orjson.loads(line) for line in everything.content.splitlines()]
        # A success's line keeps its four keys; a failure's has its traceback.
        assert rows[0] == {"seq": 0, "ok": True, "output": 0, "error": None}
        assert rows[1]["traceback"] == lines[0]["traceback"]

        grouped = (await acme.get(f"/v1/batches/{batch_id}/errors")).json()
        [group] = grouped["groups"]
        assert group["items"] == 2 and group["first_seq"] == 1
        assert group["first_seen_at"] is not None
        assert group["first_seen_at"] <= group["last_seen_at"]
        assert [(s["seq"], s["input"]) for s in group["samples"]] == [
            (1, {"raise": HOSTILE}),
            (4, {"raise": HOSTILE}),
        ]
        assert all(s["traceback"] == lines[0]["traceback"] for s in group["samples"])

        insight = (await acme.get(f"/v1/batches/{batch_id}/insight")).json()
        last = insight["last_error"]
        assert (last["shard_no"], last["status"]) == (0, "done")
        assert last["error"].startswith("2 of 10 items failed alone")
        assert f"ValueError: {HOSTILE}" in last["traceback"]

        # Another tenant sees none of it.
        async with api.client("globex") as globex:
            for path in ("insight", "errors", "results?status=error"):
                assert_error(await globex.get(f"/v1/batches/{batch_id}/{path}"), 404)

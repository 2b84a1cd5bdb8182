"""`pgbatch submit --name --metadata` and `pgbatch status` with them (issue 12 §2): labels
are stored, shown verbatim (hostile markup printed, never interpreted) and filter the list;
bad ones are refused without a traceback and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.test_cli import SUBMITTED, _assert_clean_failure, _batch_count, _items_file
from tests.helpers import CHAOS_APP, run_cli

HOSTILE_NAME = "[bold]x[/bold] [/red] <b>name</b>"
HOSTILE_OWNER = "[red]boom[/red][/] <script>alert(1)</script>"


async def _submit(database_url: str, path: Path, *options: str) -> int:
    result = await run_cli(
        "submit", "slow", str(path), "--app", CHAOS_APP, *options, database_url=database_url
    )
    assert result.code == 0, result.output
    match = SUBMITTED.search(result.stdout)
    assert match, result.output
    return int(match.group(1))


@pytest.mark.asyncio
async def test_labels_are_set_shown_verbatim_and_filter_the_list(
    database_url: str, tmp_path: Path
) -> None:
    items = _items_file(tmp_path, 3)
    labels = [
        "--name",
        HOSTILE_NAME,
        "--metadata",
        f"owner:{HOSTILE_OWNER}",
        "-m",
        "url:http://h:1/x",
    ]
    hostile = await _submit(database_url, items, *labels)
    other = await _submit(database_url, items, "--name", "plain", "--metadata", "owner:ops")

    shown = await run_cli("status", str(hostile), database_url=database_url)
    assert shown.code == 0, shown.output
    assert "Traceback" not in shown.output, shown.output
    assert f"name: {HOSTILE_NAME}" in shown.stdout, shown.stdout
    assert f"owner: {HOSTILE_OWNER}" in shown.stdout, shown.stdout
    assert "url: http://h:1/x" in shown.stdout, shown.stdout
    assert "took: waiting" in shown.stdout, shown.stdout

    as_json = await run_cli("status", str(hostile), "--json", database_url=database_url)
    document = json.loads(as_json.stdout)
    assert document["name"] == HOSTILE_NAME
    assert document["metadata"] == {"owner": HOSTILE_OWNER, "url": "http://h:1/x"}

    async def listed(*filters: str) -> list[int]:
        result = await run_cli("status", "--json", *filters, database_url=database_url)
        assert result.code == 0, result.output
        return [b["id"] for b in json.loads(result.stdout)]

    assert await listed("--name", HOSTILE_NAME) == [hostile]
    assert await listed("--metadata", "owner:ops") == [other]
    assert await listed("--metadata", f"owner:{HOSTILE_OWNER}", "-m", "url:http://h:1/x") == [
        hostile
    ]
    assert await listed("--name", "plain", "--metadata", f"owner:{HOSTILE_OWNER}") == []
    table = await run_cli("status", "--name", HOSTILE_NAME, database_url=database_url)
    assert table.code == 0 and "Traceback" not in table.output, table.output
    rows = [line for line in table.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 1 and rows[0].startswith(f"│ {hostile} "), table.stdout
    assert "[bold]x[/bold] [/red]" in rows[0], table.stdout  # printed, not interpreted


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--metadata", "no-colon"], "--metadata"),
        (["--metadata", "k:" + "x" * 513], "metadata value of 'k'"),
        (["--metadata", "k:1", "--metadata", "k:2"], "given twice"),
        ([arg for n in range(17) for arg in ("-m", f"k{n}:v")], "at most 16 keys"),
        (["--name", "n" * 257], "name must be at most"),
        (["--name", "[/red]" + " " * 3], None),
    ],
)
@pytest.mark.asyncio
async def test_bad_labels_are_refused_without_a_traceback_and_write_nothing(
    database_url: str, tmp_path: Path, options: list[str], fragment: str | None
) -> None:
    result = await run_cli("submit", "slow", str(_items_file(tmp_path, 2)), "--app", CHAOS_APP,
                           *options, database_url=database_url)  # fmt: skip
    if fragment is None:
        # A hostile but valid name is accepted as text.
        assert result.code == 0, result.output
        assert await _batch_count(database_url) == 1
        return
    _assert_clean_failure(result, fragment)
    assert await _batch_count(database_url) == 0


@pytest.mark.asyncio
async def test_a_filter_needs_no_batch_id(database_url: str) -> None:
    result = await run_cli("status", "1", "--name", "x", database_url=database_url)
    _assert_clean_failure(result, "--name")

"""Attack on issue 12 §2/§4: command-line labels, filters and queue names that are not
UTF-8 (Python hands them over as lone surrogates, which PostgreSQL cannot hold) are
refused with a message, never a traceback, and write nothing. Seen failing: `submit
--name $'\\xff'`, `status --name/--metadata` with such bytes and `worker --queue $'\\xff'`
each died with a psycopg UnicodeEncodeError/TypeError traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.test_cli import _assert_clean_failure, _batch_count, _items_file
from tests.helpers import CHAOS_APP, run_cli

NOT_UTF8 = "\udcff"  # what Python makes of the byte 0xff in argv (surrogateescape)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "args",
    [
        ("submit", "slow", "{items}", "--app", CHAOS_APP, "--name", f"n{NOT_UTF8}"),
        ("submit", "slow", "{items}", "--app", CHAOS_APP, "-m", f"k:{NOT_UTF8}"),
        ("status", "--name", NOT_UTF8),
        ("status", "--metadata", f"k:{NOT_UTF8}"),
        ("status", "--metadata", f"{NOT_UTF8}:v"),
        ("queue", "pause", NOT_UTF8),
        ("worker", "--app", CHAOS_APP, "--queue", NOT_UTF8),
    ],
)
async def test_non_utf8_arguments_are_refused_without_a_traceback(
    database_url: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    items = str(_items_file(tmp_path, 2))
    result = await run_cli(
        *(items if a == "{items}" else a for a in args), database_url=database_url, timeout_s=60
    )
    _assert_clean_failure(result, "UTF-8")
    assert await _batch_count(database_url) == 0

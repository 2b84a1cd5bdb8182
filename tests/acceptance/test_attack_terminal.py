"""Attack on issue 12 §4: a user string never sends control characters to the terminal.
Seen failing: a batch named "evil\\x1b]0;pwned\\x07\\x1b[2J" (any tenant can name theirs so)
made `pgbatch status` send ESC sequences that retitle and clear the operator's terminal;
Rich markup was escaped, these were not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.test_cli import SUBMITTED, _items_file
from tests.helpers import CHAOS_APP, run_cli

HOSTILE = "evil\x1b]0;pwned\x1b[2J\x9b31m"


@pytest.mark.asyncio
async def test_control_characters_in_labels_are_shown_escaped(
    database_url: str, tmp_path: Path
) -> None:
    items = _items_file(tmp_path, 2)
    submitted = await run_cli(
        "submit", "slow", str(items), "--app", CHAOS_APP, "--name", HOSTILE,
        "-m", f"owner:{HOSTILE}", database_url=database_url,
    )  # fmt: skip
    assert submitted.code == 0, submitted.output
    match = SUBMITTED.search(submitted.stdout)
    assert match, submitted.output
    for args in (("status", match.group(1)), ("status",)):
        shown = await run_cli(*args, database_url=database_url, env={"COLUMNS": "250"})
        assert shown.code == 0, shown.output
        assert "\x1b" not in shown.stdout and "\x9b" not in shown.stdout, repr(shown.stdout)
        assert "evil\\x1b]0;pwned\\x1b[2J\\x9b31m" in shown.stdout, shown.stdout

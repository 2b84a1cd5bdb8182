"""Attack on issue 12 §2 in the CLI: the command `pgbatch status` suggests for a paused
queue must work when pasted into a shell. Seen failing: for the queue `q[red] x` it said
`pgbatch queue resume q[red] x`, which a shell splits in two and globs."""

from __future__ import annotations

import shlex

from pgbatch.fleet import WaitingReason
from pgbatch.fleet_cli import waiting_text


def test_the_resume_hint_is_a_command_a_shell_runs_as_written() -> None:
    queue = "q[red] x;$(rm)"
    text = waiting_text(WaitingReason.QUEUE_PAUSED, task="t", queue=queue)
    command = text[text.index("(pgbatch ") + 1 : text.rindex(")")]
    assert shlex.split(command) == ["pgbatch", "queue", "resume", queue]

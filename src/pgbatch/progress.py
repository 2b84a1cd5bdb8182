"""Live progress of a batch in the terminal: a Rich bar driven by NOTIFY."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from pgbatch.app import App
from pgbatch.models import Batch

__all__ = ["watch_batch"]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]batch {task.fields[batch_id]}[/] {task.fields[status]:<9}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]:>7,.0f}/s"),
        TextColumn("[red]{task.fields[errors]:,} err[/]"),
        TextColumn("ETA"),
        TimeRemainingColumn(compact=True),
        console=console,
        refresh_per_second=8,
    )


async def watch_batch(app: App, batch_id: int, *, console: Console | None = None) -> Batch:
    """Show a live progress bar for the batch until it ends; return its final state."""
    console = console or Console()
    started = time.monotonic()
    first_done: int | None = None
    final: Batch | None = None
    with _progress(console) as progress:
        bar = progress.add_task("", total=None, batch_id=batch_id, status="", rate=0.0, errors=0)
        async for batch in app.watch(batch_id):
            final = batch
            # Items that ran: cancelled ones are neither progress nor throughput, so a
            # cancelled batch's bar stops where the work stopped, never at 100 %.
            done = batch.items_ok + batch.items_failed
            if first_done is None:
                first_done = done
            elapsed = time.monotonic() - started
            rate = (done - first_done) / elapsed if elapsed > 0 else 0.0
            progress.update(
                bar,
                total=batch.total_items,
                completed=done,
                status=str(batch.status),
                rate=rate,
                errors=batch.items_failed,
            )
    assert final is not None
    return final

"""`pgbatch workers`, `pgbatch queues` and `pgbatch queue pause|resume NAME` (issue 12 §2).

The CLI holds the database URL, so it is the operator's view: every tenant's work counts.
"""

from __future__ import annotations

import shlex
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from pgbatch.cli import (
    DatabaseUrlOption,
    JsonOption,
    _closing,
    _existing_app,
    _fail,
    _print_json,
    _run,
    cli,
    console,
)
from pgbatch.fleet import QueueState, WaitingReason, WorkerInfo

__all__ = ["queue_cli", "waiting_text"]

queue_cli = typer.Typer(help="Pause or resume a queue (every worker obeys).", no_args_is_help=True)
cli.add_typer(queue_cli, name="queue")

# What `pgbatch status` says of a batch that waits for a reason pgbatch can tell.
_WAITING_TEXT = {
    WaitingReason.QUEUE_PAUSED: (
        "its queue {queue!r} is paused (pgbatch queue resume {shell_queue})"
    ),
    WaitingReason.NO_LIVE_WORKER: (
        "no live worker serves task {task!r} on queue {queue!r} (see pgbatch workers)"
    ),
}


def waiting_text(reason: WaitingReason, *, task: str, queue: str) -> str:
    """Return the sentence that tells why a batch waits."""
    # The hint is a command to paste: the queue is quoted as a shell reads it.
    return "waiting: " + _WAITING_TEXT[reason].format(
        task=task, queue=queue, shell_queue=shlex.quote(queue)
    )


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _worker_json(worker: WorkerInfo) -> dict[str, Any]:
    return {
        "id": worker.id,
        "host": worker.host,
        "pid": worker.pid,
        "queues": list(worker.queues),
        "tasks": list(worker.tasks),
        "concurrency": worker.concurrency,
        "slots_in_use": worker.slots_in_use,
        "version": worker.version,
        "started_at": worker.started_at.isoformat(),
        "heartbeat_at": worker.heartbeat_at.isoformat(),
        "silent_s": worker.silent_s,
        "expired": worker.expired,
        "running": [{"batch_id": b, "shards": n} for b, n in sorted(worker.running.items())],
    }


def _queue_json(queue: QueueState) -> dict[str, Any]:
    return {
        "name": queue.name,
        "paused": queue.paused,
        "paused_at": queue.paused_at.isoformat() if queue.paused_at else None,
        "queued_shards": queue.queued_shards,
        "running_shards": queue.running_shards,
        "oldest_queued_s": queue.oldest_queued_s,
        "live_workers": queue.live_workers,
    }


@cli.command()
def workers(as_json: JsonOption = False, database_url: DatabaseUrlOption = None) -> None:
    """List the worker processes: queues, tasks, slots in use, last heartbeat, version."""
    app = _existing_app(database_url)

    async def run() -> None:
        found = await app.workers(tenant=None)
        if as_json:
            _print_json([_worker_json(w) for w in found])
            return
        if not found:
            console.print("no workers registered (start one with `pgbatch worker --app ...`)")
            return
        table = Table()
        for column in ("id", "state", "slots", "queues", "tasks", "heartbeat", "up", "version"):
            table.add_column(column)
        for w in found:
            table.add_row(
                Text(w.id),
                Text("expired", style="red") if w.expired else Text("live", style="green"),
                f"{w.slots_in_use}/{w.concurrency}",
                Text(", ".join(w.queues)),  # user strings: plain Text, no markup read
                Text(", ".join(w.tasks)),
                f"{_ago(w.silent_s)} ago",
                w.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                Text(w.version),
            )
        console.print(table)
        live = [w for w in found if not w.expired]
        used, slots = sum(w.slots_in_use for w in live), sum(w.concurrency for w in live)
        console.print(f"{len(live)} live, {len(found) - len(live)} expired; slots {used}/{slots}")

    _run(_closing(app, run()))


@cli.command()
def queues(as_json: JsonOption = False, database_url: DatabaseUrlOption = None) -> None:
    """List the queues: paused or not, queued and running shards, oldest wait, workers."""
    app = _existing_app(database_url)

    async def run() -> None:
        found = await app.queues(tenant=None)
        if as_json:
            _print_json([_queue_json(q) for q in found])
            return
        if not found:
            console.print("no queues: nothing queued, running, paused or served")
            return
        table = Table()
        for column in ("queue", "state", "queued", "running", "oldest wait", "live workers"):
            table.add_column(column, justify="left" if column in {"queue", "state"} else "right")
        for q in found:
            table.add_row(
                Text(q.name),
                Text("paused", style="yellow") if q.paused else Text("active"),
                str(q.queued_shards),
                str(q.running_shards),
                _ago(q.oldest_queued_s) if q.queued_shards else "-",
                str(q.live_workers),
            )
        console.print(table)

    _run(_closing(app, run()))


QueueArgument = Annotated[str, typer.Argument(help="The queue's name.")]


@queue_cli.command("pause")
def queue_pause(
    name: QueueArgument, as_json: JsonOption = False, database_url: DatabaseUrlOption = None
) -> None:
    """Pause a queue: no worker claims from it any more; running shards still finish."""
    _change_queue(name, pause=True, as_json=as_json, database_url=database_url)


@queue_cli.command("resume")
def queue_resume(
    name: QueueArgument, as_json: JsonOption = False, database_url: DatabaseUrlOption = None
) -> None:
    """Resume a paused queue: its workers are woken and claim at once."""
    _change_queue(name, pause=False, as_json=as_json, database_url=database_url)


def _change_queue(name: str, *, pause: bool, as_json: bool, database_url: str | None) -> None:
    app = _existing_app(database_url)

    async def run() -> None:
        try:
            if pause:
                await app.pause_queue(name, paused_by="cli")
                changed = True
            else:
                changed = await app.resume_queue(name)
        except ValueError as exc:
            _fail(str(exc), 2)
        state = next((q for q in await app.queues(tenant=None) if q.name == name), None)
        if as_json:
            _print_json(
                _queue_json(state)
                if state
                else {"name": name, "paused": False, "queued_shards": 0, "running_shards": 0}
            )
            return
        if pause:
            message = f"queue {name!r} paused; running shards finish, nothing new is claimed"
        elif changed:
            message = f"queue {name!r} resumed"
        else:
            message = f"queue {name!r} was not paused"
        console.print(message, markup=False, highlight=False)

    _run(_closing(app, run()))

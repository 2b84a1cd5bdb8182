"""The `pgbatch` command line: workers, batches, migrations and the demo."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pgbatch.app import DEFAULT_RETENTION, App
from pgbatch.errors import PgbatchError
from pgbatch.labels import check_metadata, check_name, parse_metadata_pair
from pgbatch.models import Batch, BatchFilter, ShardFailure
from pgbatch.terminal import SafeConsole
from pgbatch.workloads.llm.cli import llm_cli
from pgbatch.workloads.vectors.cli import libraries_cli

__all__ = ["cli", "load_app", "main"]

T = TypeVar("T")

# `status BATCH_ID` shows this many failed items.
ERROR_SAMPLES = 5

cli = typer.Typer(
    help="Run very large batches of work durably on PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_cli = typer.Typer(help="The embedded PostgreSQL server.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
token_cli = typer.Typer(help="API tokens for `pgbatch serve`.", no_args_is_help=True)
cli.add_typer(token_cli, name="token")
# A workload's commands live in the workload (its cli.py); mounted here.
cli.add_typer(llm_cli, name="llm")
cli.add_typer(libraries_cli, name="libraries")

console = SafeConsole()
err_console = SafeConsole(stderr=True)

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        "-a",
        envvar="PGBATCH_APP",
        help="Your app as module:attribute, e.g. pgbatch.demo.llm_app:app.",
    ),
]


DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="The PostgreSQL to read (default: DATABASE_URL, else the embedded server of "
        "./.pgbatch or PGBATCH_DATA_DIR).",
        show_default=False,
    ),
]

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (one document) instead of text, for scripts.")
]


def _print_json(document: Any) -> None:
    # Plain stdout, not Rich: a script parses these bytes, so no markup, colour or wrapping.
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")


def _batch_json(batch: Batch) -> dict[str, Any]:
    """Return a batch as the API shows it (its fields, `items_done`, ISO 8601 times)."""
    document = dataclasses.asdict(batch)
    document["status"] = str(batch.status)
    document["items_done"] = batch.items_done
    document["waiting_s"] = batch.waiting_s
    document["running_s"] = batch.running_s
    return document


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"pgbatch {version('pgbatch')}", highlight=False)
        raise typer.Exit()


@cli.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Run very large batches of work durably on PostgreSQL."""


def _fail(message: str, code: int = 1) -> NoReturn:
    # Messages quote user input (task names, file lines, errors): never read as markup.
    err_console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def load_app(spec: str | None) -> App:
    """Import `module:attribute` (from the current directory too) and return the App."""
    if spec is None:
        return App()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        _fail(f"--app must look like module:attribute, got {spec!r}", 2)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        _fail(f"cannot import {module_name!r}: {exc} (run from your project's root)", 2)
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        _fail(f"{spec} is not a pgbatch.App (found {type(app).__name__})", 2)
    return app


def _say_database(app: App) -> None:
    """Print, on stderr, the one line that names the database this command uses."""
    from pgbatch.db.database import describe_database

    err_console.print(
        describe_database(app.settings), markup=False, highlight=False, soft_wrap=True
    )


def _existing_app(database_url: str | None = None) -> App:
    """Return the App of a command that reads or changes batches that must already exist.

    Such a command run in the wrong folder must not start a new, empty embedded server
    there and report that the batch does not exist.
    """
    from pgbatch.config import Settings
    from pgbatch.db.embedded import embedded_exists

    settings = Settings()
    if database_url:
        settings = settings.model_copy(update={"database_url": database_url})
    if not settings.database_url and not embedded_exists(settings.data_dir):
        _fail(
            f"no database: DATABASE_URL is not set and {settings.data_dir.resolve()} holds no "
            "embedded server. Run this from the folder that holds your .pgbatch, or point it "
            "at your database with --database-url URL, DATABASE_URL or PGBATCH_DATA_DIR",
            2,
        )
    return App(settings=settings)


def _run(coro: Coroutine[Any, Any, T], *, on_interrupt: str = "interrupted") -> T:
    try:
        return asyncio.run(coro)
    except PgbatchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        err_console.print(escape(on_interrupt))
        raise typer.Exit(130) from None


async def _closing(app: App, coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        await app.close()


def _batch_table(batches: list[Batch]) -> Table:
    table = Table(show_lines=False)
    numbers = {"items", "ok", "failed", "cancelled"}
    columns = ("id", "name", "task", "status", "items", "ok", "failed", "cancelled", "shards")
    for column in (*columns, "took", "created"):
        table.add_column(column, justify="right" if column in numbers else "left")
    for b in batches:
        table.add_row(
            str(b.id),
            # A user's strings: plain Texts, so Rich reads no markup in them.
            Text(b.name or ""),
            Text(b.task),
            str(b.status),
            # Items that ran: a cancelled batch's cancelled items are not "done" (never 100 %).
            f"{b.items_ok + b.items_failed}/{b.total_items}",
            str(b.items_ok),
            str(b.items_failed),
            str(b.items_cancelled),
            f"{b.shards_done}/{b.total_shards}",
            took_text(b),
            b.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


def took_text(batch: Batch) -> str:
    """Say how long the batch waited for its first claim and how long it ran, apart."""
    waiting, running = batch.waiting_s, batch.running_s
    if waiting is None:
        return "waiting"
    if running is None:
        return f"waited {_seconds(waiting)}, running"
    return f"waited {_seconds(waiting)}, ran {_seconds(running)}"


def _seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _metadata_option(pairs: list[str] | None) -> dict[str, str] | None:
    """Turn repeated `--metadata key:value` into a dict (a key given twice is an error)."""
    if not pairs:
        return None
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, value = parse_metadata_pair(pair, field="--metadata")
        if key in metadata:
            _fail(f"--metadata: key {key!r} given twice", 2)
        metadata[key] = value
    return metadata


MetadataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--metadata",
        "-m",
        help="key:value, repeatable (at most 16 pairs; split at the first colon).",
    ),
]


@cli.command()
def worker(
    app_spec: AppOption = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Shards processed at once.")] = 32,
    queue: Annotated[list[str] | None, typer.Option(help="Queues to serve (repeatable).")] = None,
    drain_timeout_s: Annotated[
        float, typer.Option(min=0, help="On SIGTERM, wait this long for in-flight shards.")
    ] = 30.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="Serve Prometheus metrics of this worker on this port."
        ),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address of the metrics server.")] = (
        "127.0.0.1"
    ),
) -> None:
    """Run a worker until SIGTERM (drains gracefully; a second SIGTERM stops at once)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("psycopg.pool").setLevel(logging.NOTSET)
    if app_spec is None:
        _fail("worker needs --app module:attribute naming your pgbatch.App", 2)
    app = load_app(app_spec)
    _say_database(app)
    try:
        # Built before the database is opened: a bad --queue is a message, not a traceback.
        work = app.worker(concurrency=concurrency, queues=queue)
    except ValueError as exc:
        _fail(f"--queue: {exc}", 2)

    async def run() -> None:
        work.drain_timeout_s = drain_timeout_s
        if metrics_port is not None:
            from pgbatch.metrics import serve_worker_metrics

            try:
                httpd, _ = serve_worker_metrics(work, host=metrics_host, port=metrics_port)
            except OSError as exc:
                _fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}", 2)
            err_console.print(
                f"metrics: http://{metrics_host}:{httpd.server_port}/", highlight=False
            )
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                err_console.print("draining: finishing in-flight shards (signal again to stop now)")
                work.request_stop()
            else:
                err_console.print("stopping now; unfinished leases will expire")
                os._exit(1)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        _tune_gc_for_a_worker_process()
        await _closing(app, work.run())

    _run(run())


# Allocations between two young-generation collections in a `pgbatch worker` process
# (Python's default is 700). A claim of 32 shards of 100 items allocates some 6,400 objects
# (an Item and a value each) that live for milliseconds: at 700 they were collected and
# promoted again and again, and the garbage collector took a third of the workers' CPU at
# shard size 100 (docs/performance.md, "End to end").
WORKER_GC_GEN0_OBJECTS = 20_000


def _tune_gc_for_a_worker_process() -> None:
    """Keep the garbage collector off the worker's long-lived objects and out of its hot path.

    The process is ours (an embedding application keeps its own settings): what is loaded
    at startup (modules, the app, the pool) is frozen, never traversed again by a full
    collection, and the young generation is collected less often.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(WORKER_GC_GEN0_OBJECTS, gen1, gen2)


def _read_items(path: str) -> Iterator[Any]:
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    with stream:
        for line_no, line in enumerate(stream, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:  # invalid JSON, or bytes that are not UTF-8
                    raise PgbatchError(f"{path}:{line_no}: not valid UTF-8 JSON: {exc}") from None


@cli.command()
def submit(
    task: Annotated[str, typer.Argument(help="Task name.")],
    items: Annotated[str, typer.Argument(help="NDJSON file of items, one per line; - for stdin.")],
    app_spec: AppOption = None,
    shard_size: Annotated[int | None, typer.Option(help="Items per shard.")] = None,
    max_attempts: Annotated[int | None, typer.Option()] = None,
    priority: Annotated[int, typer.Option()] = 0,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    on_complete: Annotated[str | None, typer.Option(help="Callback name.")] = None,
    name: Annotated[str | None, typer.Option(help="A label for lists and filters.")] = None,
    metadata: MetadataOption = None,
    retention_s: Annotated[
        float | None,
        typer.Option(
            help="Seconds to keep the batch once finished (default: PGBATCH_RETENTION_S)."
        ),
    ] = None,
    keep_forever: Annotated[
        bool, typer.Option("--keep-forever", help="Never prune this batch.")
    ] = False,
    watch: Annotated[bool, typer.Option(help="Show progress until it ends.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Submit a batch of items for a task."""
    if keep_forever and retention_s is not None:
        _fail("--retention-s and --keep-forever do not go together", 2)
    if watch and as_json:
        _fail("--watch and --json do not go together: --json prints the batch once", 2)
    if app_spec is None:
        _fail("submit needs --app module:attribute naming your pgbatch.App", 2)
    if items != "-" and not Path(items).is_file():
        _fail(f"no such file: {items}", 2)
    try:
        # Checked before the app loads: a bad label is refused with nothing written.
        checked_name = check_name(name)
        checked_metadata = check_metadata(_metadata_option(metadata))
    except PgbatchError as exc:
        _fail(str(exc), 2)
    app = load_app(app_spec)
    _say_database(app)

    async def run() -> None:
        batch = await app.submit(
            task,
            _read_items(items),
            shard_size=shard_size,
            max_attempts=max_attempts,
            priority=priority,
            idempotency_key=idempotency_key,
            on_complete=on_complete,
            name=checked_name,
            metadata=checked_metadata,
            retention_s=None
            if keep_forever
            else (DEFAULT_RETENTION if retention_s is None else retention_s),
        )
        if as_json:
            _print_json(_batch_json(batch))
            return
        console.print(f"batch {batch.id}: {batch.total_items} items in {batch.total_shards} shards")
        if watch:
            from pgbatch.progress import watch_batch

            await watch_batch(app, batch.id, console=console)

    _run(_closing(app, run()))


@cli.command()
def status(
    batch_id: Annotated[int | None, typer.Argument(help="A batch id; omit to list recent.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 20,
    name: Annotated[str | None, typer.Option(help="List only batches of this name.")] = None,
    metadata: MetadataOption = None,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Show one batch, or the most recent ones (filtered by --name and --metadata)."""
    if batch_id is not None and (name is not None or metadata):
        _fail("--name and --metadata filter the list: give no batch id with them", 2)
    try:
        where = BatchFilter(name=check_name(name), metadata=_metadata_option(metadata))
    except PgbatchError as exc:
        _fail(str(exc), 2)
    app = _existing_app(database_url)

    async def run() -> None:
        if batch_id is None:
            batches = await app.list_batches(where, limit=limit)
            reasons = await app.waiting_reasons(batches)
            if as_json:
                _print_json(
                    [{**_batch_json(b), "waiting_reason": reasons.get(b.id)} for b in batches]
                )
            else:
                console.print(_batch_table(batches))
                for b in batches:
                    if b.id in reasons:
                        text = fleet_cli.waiting_text(reasons[b.id], task=b.task, queue=b.queue)
                        console.print(f"batch {b.id}: {text}", markup=False, highlight=False)
        else:
            batch, last = await app.last_failure(batch_id)
            reason = (await app.waiting_reasons([batch])).get(batch.id)
            samples: list[tuple[int, str | None, str | None]] = []
            if batch.items_failed:
                async for seq, outcome in app.results(batch_id, errors_only=True):
                    samples.append((seq, outcome.error, outcome.traceback))
                    if len(samples) == ERROR_SAMPLES:
                        break
            groups: list[Any] = []
            if batch.items_failed:
                _, groups, _ = await app.error_groups(batch_id, limit=ERROR_SAMPLES, samples=0)
            if as_json:
                errors = [
                    {"seq": seq, "error": message, "traceback": trace}
                    for seq, message, trace in samples
                ]
                grouped = [
                    {"error": g.error, "items": g.items, "first_seq": g.first_seq} for g in groups
                ]
                _print_json(
                    {
                        **_batch_json(batch),
                        "waiting_reason": reason,
                        "error_samples": errors,
                        "error_groups": grouped,
                        "last_error": _failure_json(last),
                    }
                )
                return
            console.print(_batch_table([batch]))
            if reason is not None:
                text = fleet_cli.waiting_text(reason, task=batch.task, queue=batch.queue)
                console.print(text, style="yellow", markup=False, highlight=False)
            # In full (the table may shorten it), and never read as markup.
            if batch.name is not None:
                console.print(f"name: {batch.name}", markup=False, highlight=False, soft_wrap=True)
            console.print(f"took: {took_text(batch)}", markup=False, highlight=False)
            if batch.metadata:
                pairs = "\n".join(f"  {k}: {v}" for k, v in batch.metadata.items())
                console.print("metadata:\n" + pairs, markup=False, highlight=False, soft_wrap=True)
            if samples:
                lines = [f"  item {seq}: {message}" for seq, message, _ in samples]
                lines += ["most frequent errors:"] + [
                    f"  {g.items} x (first item {g.first_seq}): {g.error}" for g in groups
                ]
                first_traced = next(((s, t) for s, _, t in samples if t), None)
                if first_traced is not None:
                    lines += [f"traceback of item {first_traced[0]}:", _indent(first_traced[1])]
                _print_plain("error samples:\n" + "\n".join(lines))
            if last is not None:
                place = f"shard {last.shard_no}, items {last.first_seq}-{last.last_seq}"
                text = f"last error ({place}, {last.status}): {last.error}"
                if last.traceback and not (samples and last.traceback in (t for *_, t in samples)):
                    text += "\n" + _indent(last.traceback)
                _print_plain(text)

    _run(_closing(app, run()))


def _print_plain(text: str) -> None:
    """Print user text (errors, tracebacks) exactly: no markup, no highlighting."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.rstrip("\n").splitlines())


def _failure_json(failure: ShardFailure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    return {
        "shard_no": failure.shard_no,
        "status": str(failure.status),
        "first_seq": failure.first_seq,
        "last_seq": failure.last_seq,
        "error": failure.error,
        "traceback": failure.traceback,
        "at": failure.at.isoformat() if failure.at else None,
    }


@cli.command()
def watch(
    batch_id: Annotated[int, typer.Argument()], database_url: DatabaseUrlOption = None
) -> None:
    """Show a live progress bar until the batch ends."""
    from pgbatch.progress import watch_batch

    app = _existing_app(database_url)

    async def run() -> None:
        await app.get_batch(batch_id)  # an unknown id is an error before any bar is drawn
        final = await watch_batch(app, batch_id, console=console)
        summary = (
            f"batch {batch_id} {final.status}: {final.items_ok} ok, {final.items_failed} failed"
        )
        if final.items_cancelled:
            summary += f", {final.items_cancelled} cancelled"
        console.print(f"{summary} ({took_text(final)})", markup=False, highlight=False)

    _run(
        _closing(app, run()),
        on_interrupt=f"stopped watching; batch {batch_id} keeps running "
        f"(`pgbatch watch {batch_id}` to watch again, `pgbatch cancel {batch_id}` to stop it)",
    )


@cli.command()
def cancel(
    batch_id: Annotated[int, typer.Argument()],
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Cancel a batch: queued shards stop, running shards stop at their next heartbeat."""
    app = _existing_app(database_url)
    cancelled = _run(_closing(app, app.cancel(batch_id)))
    if as_json:
        _print_json({"batch_id": batch_id, "cancelled": cancelled})
    elif cancelled:
        console.print(f"batch {batch_id} cancelled")
    else:
        console.print(f"batch {batch_id} had already ended; nothing changed")


@cli.command()
def retry(
    batch_id: Annotated[int, typer.Argument()],
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Re-queue a batch's dead shards and shards with failed items."""
    app = _existing_app(database_url)
    count = _run(_closing(app, app.retry(batch_id)))
    if as_json:
        _print_json({"batch_id": batch_id, "requeued_shards": count})
    else:
        console.print(f"batch {batch_id}: {count} shards re-queued")


@cli.command()
def results(
    batch_id: Annotated[int, typer.Argument()],
    errors: Annotated[bool, typer.Option("--errors", help="Only the failed items.")] = False,
    result_format: Annotated[
        str, typer.Option("--format", help="ndjson (one JSON object a line) or csv.")
    ] = "ndjson",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Print a batch's results in item order: NDJSON {seq, ok, output, error}, or CSV.

    A failed item's NDJSON line also has its traceback, as the API's does.
    """
    from pgbatch.export import encode_results

    if result_format not in ("ndjson", "csv"):
        _fail(f"--format must be ndjson or csv, not {result_format!r}", 2)
    app = _existing_app(database_url)

    async def run() -> None:
        await app.get_batch(batch_id)  # an unknown id fails before a file is created
        chunks = encode_results(
            app.results(batch_id, errors_only=errors),
            "csv" if result_format == "csv" else "ndjson",
        )
        if output is None:
            async for chunk in chunks:
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return
        # Written beside the target and renamed at the end: an interrupted export leaves
        # no half file under the name a script waits for.
        partial = output.with_name(output.name + ".partial")
        try:
            with partial.open("wb") as sink:
                async for chunk in chunks:
                    sink.write(chunk)
            partial.replace(output)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    _run(_closing(app, run()))


def _parse_time(text: str) -> datetime:
    """Read an ISO 8601 time (a date alone is midnight UTC; no zone means UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"--finished-before must be an ISO 8601 date or time, got {text!r}", 2)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@cli.command()
def prune(
    finished_before: Annotated[
        str | None,
        typer.Option(
            help="Also remove every final batch that finished before this ISO 8601 time, "
            "whatever its retention (kept-forever batches too)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many batches.")] = 1000,
    app_spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove finished batches past their retention period (workers also do it on their own)."""
    from pgbatch.workloads import collections, llm, vectors

    shipped_hooks = [
        w.prune_rows
        for w in (collections.WORKLOAD, llm.WORKLOAD, vectors.WORKLOAD)
        if w.prune_rows is not None
    ]
    before = _parse_time(finished_before) if finished_before is not None else None
    app = load_app(app_spec) if app_spec is not None else _existing_app()

    async def run() -> None:
        if dry_run:
            due = await app.due_for_pruning(finished_before=before, limit=limit)
            if as_json:
                _print_json({"dry_run": True, "batches": [_batch_json(b) for b in due]})
            elif due:
                console.print(f"{len(due)} batches would be removed:")
                console.print(_batch_table(due))
            else:
                console.print("nothing to prune")
            return
        # The shipped workloads' rows go too, whichever app runs this (a no-op without
        # their tables).
        report = await app.prune(finished_before=before, limit=limit, extra_hooks=shipped_hooks)
        if as_json:
            _print_json(
                {
                    "dry_run": False,
                    "pruned": report.pruned,
                    "cleaned": report.cleaned,
                    "busy": report.busy,
                    "rows_deleted": report.rows_deleted,
                }
            )
            return
        console.print(
            f"pruned {len(report.pruned)} batches ({report.rows_deleted} rows deleted)"
            + (f"; {len(report.busy)} busy, left for later" if report.busy else "")
        )

    _run(_closing(app, run()))


@cli.command()
def migrate(app_spec: AppOption = None) -> None:
    """Apply pending database migrations (with --app, those of the workloads it uses too)."""
    app = App(auto_migrate=False) if app_spec is None else load_app(app_spec)
    # Applied by migrate() below, not by opening: it reports what it applied.
    app.auto_migrate = False
    applied = _run(_closing(app, app.migrate()))
    console.print(f"applied migrations {applied}" if applied else "schema is up to date")


@cli.command()
def sql(
    name: Annotated[str, typer.Argument(help="The query's name, e.g. batch_seal.")],
    workload: Annotated[
        str | None, typer.Option(help="A shipped workload's queries, e.g. collections.")
    ] = None,
) -> None:
    """Print one of pgbatch's queries as the server receives it (includes expanded)."""
    from pgbatch.db.queries import QueryMap, query

    queries = query if workload is None else QueryMap(f"pgbatch.workloads.{workload}")
    try:
        text = queries(name)
    except (KeyError, ModuleNotFoundError) as exc:
        _fail(str(exc.args[0] if isinstance(exc, KeyError) else exc), 2)
    sys.stdout.write(text + ";\n")


@cli.command()
def demo(
    items: Annotated[int, typer.Option(min=0, help="Prompts to process.")] = 100_000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    concurrency: Annotated[int, typer.Option(min=1)] = 32,
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Dashboard port on 127.0.0.1 (0: any free one).")
    ] = 8000,
    dashboard: Annotated[bool, typer.Option(help="Serve the dashboard while it runs.")] = True,
    keep_serving: Annotated[
        bool, typer.Option(help="Keep the dashboard up after the demo, until Ctrl-C.")
    ] = False,
    llm: Annotated[
        bool,
        typer.Option(
            "--llm", help="Run an OpenAI-format file through the fake upstream's rate limits."
        ),
    ] = False,
    rpm: Annotated[int, typer.Option(min=1, help="With --llm: the limit's requests/min.")] = 600,
    tpm: Annotated[int, typer.Option(min=1, help="With --llm: the limit's tokens/min.")] = 60_000,
) -> None:
    """Run the LLM-batch example on the embedded PostgreSQL and verify the outcome."""
    if llm:
        from pgbatch.demo.llm_openai import run_llm_demo

        count = items if items != 100_000 else 300  # the default suits the other demo
        healthy = _run(
            run_llm_demo(requests=count, workers=workers, rpm=rpm, tpm=tpm, console=console)
        )
        raise typer.Exit(0 if healthy else 1)
    from pgbatch.demo import run_demo

    _run(
        run_demo(
            items=items,
            workers=workers,
            concurrency=concurrency,
            console=console,
            port=port if dashboard else None,
            keep_serving=keep_serving,
        )
    )


@cli.command()
def sizing(
    item_ms: Annotated[float, typer.Option(min=0, help="Handler time per item, in ms.")],
    lease_ttl_s: Annotated[float, typer.Option(min=0.001, help="Lease TTL of the task.")] = 30.0,
    overhead_ms: Annotated[
        float, typer.Option(min=0, help="Claim + completion cost per shard (docs/sizing.md).")
    ] = 3.0,
) -> None:
    """Suggest a shard size from the handler's time per item and the measured commit latency."""
    from pgbatch.db.verify import measure_commit_latency_s
    from pgbatch.sizing import suggest_shard_size

    app = _existing_app()

    async def measure() -> float:
        await app.open()
        async with app.db.connection() as conn:
            return await measure_commit_latency_s(conn, samples=50)

    commit_s = _run(_closing(app, measure()))
    try:
        advice = suggest_shard_size(
            item_s=item_ms / 1000,
            overhead_s=overhead_ms / 1000,
            commit_s=commit_s,
            lease_ttl_s=lease_ttl_s,
        )
    except ValueError as exc:
        _fail(str(exc), 2)
    console.print(
        f"measured commit latency c = {commit_s * 1000:.2f} ms\n"
        f"suggested shard size: [bold]{advice.shard_size}[/] ({advice.note})\n"
        f"a shard then takes {advice.shard_seconds:.3f} s: overhead "
        f"{advice.overhead_fraction:.1%}, {advice.lease_fraction:.1%} of the lease"
    )


@cli.command()
def serve(
    app_spec: AppOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    with_worker: Annotated[
        bool, typer.Option("--with-worker", help="Also run a worker in this process.")
    ] = False,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker concurrency.")] = 32,
) -> None:
    """Serve the HTTP API, the event streams and the dashboard (at /)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from pgbatch.api.auth import TokenTable
    from pgbatch.api.server import check_bind, server
    from pgbatch.workloads import documents, llm, vectors

    app = load_app(app_spec)
    # Documents are part of the HTTP surface `pgbatch serve` has always had; vector
    # libraries are served too (their tables need no pgvector until a library is made).
    app.use(documents.WORKLOAD)
    # The OpenAI Batch API (/openai/v1); its requests go to PGBATCH_LLM_BASE_URL.
    app.use(llm.WORKLOAD)
    app.use(vectors.WORKLOAD)
    try:
        tokens = TokenTable.parse(app.settings.api_tokens)
        check_bind(host, tokens)
    except PgbatchError as exc:
        _fail(str(exc), 2)
    if not any(not spec.internal for spec in app.tasks.values()):
        err_console.print(
            "warning: no tasks registered"
            + ("" if app_spec else " (no --app given)")
            + ": the API can submit no batch. Pass --app module:attribute naming your "
            "pgbatch.App, or set PGBATCH_APP",
            highlight=False,
        )
    if not tokens.enabled:
        err_console.print(
            f"no API tokens configured (PGBATCH_API_TOKENS): listening on {host} only, "
            "without authentication"
        )
    _say_database(app)
    err_console.print(f"dashboard: http://{host}:{port}/   API: http://{host}:{port}/docs")

    async def run() -> None:
        if not with_worker:
            await server(app, host=host, port=port, return_on_signal=True).serve()
            return
        work = app.worker(concurrency=concurrency)
        http = server(app, host=host, port=port, worker=work, return_on_signal=True)
        worker_task = asyncio.create_task(work.run())
        try:
            await http.serve()
        finally:
            # The server stopped (Ctrl-C, SIGTERM): drain the worker as `pgbatch worker`
            # does, so no shard is left `running` under a lease nobody renews.
            if not worker_task.done():
                err_console.print("draining: finishing in-flight shards (signal again to stop now)")
            _stop_now_on_signal()
            work.request_stop()
            await worker_task

    # Exit 0 on Ctrl-C: uvicorn handles the signal and `serve()` returns.
    _run(_closing(app, run()))


def _stop_now_on_signal() -> None:
    """Make the next SIGINT/SIGTERM end the process at once (leases then expire)."""

    def stop_now() -> None:
        err_console.print("stopping now; unfinished leases will expire")
        os._exit(1)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_now)


@token_cli.command("new")
def token_new(
    tenant: Annotated[str, typer.Argument(help="The tenant the token acts for.")],
) -> None:
    """Print a new API token and the PGBATCH_API_TOKENS entry that accepts it (only hashed)."""
    from pgbatch.api.auth import new_token

    try:
        token, entry = new_token(tenant)
    except PgbatchError as exc:
        _fail(str(exc), 2)
    console.print(f"token (give it to the client; it is not stored): {token}", soft_wrap=True)
    console.print(f"entry for PGBATCH_API_TOKENS (comma-separated): {entry}", soft_wrap=True)


@db_cli.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server of this folder."""
    from pgbatch.config import Settings
    from pgbatch.db.embedded import stop_embedded

    data_dir = Settings().data_dir
    console.print("stopped" if stop_embedded(data_dir) else f"no server running in {data_dir}")


@db_cli.command("url")
def db_url() -> None:
    """Print the connection URL (starting the embedded server if needed)."""
    from pgbatch.config import Settings
    from pgbatch.db.database import resolve_url

    try:
        console.print(resolve_url(Settings()), soft_wrap=True)
    except PgbatchError as exc:
        _fail(str(exc))


# The fleet's commands (workers, queues, queue pause|resume) live in their own module,
# which registers them on `cli` with the helpers above.
from pgbatch import fleet_cli  # noqa: E402


def main() -> None:
    """Run the CLI."""
    # One-shot commands report a connection failure as one clear error, not as the pool's
    # retry warnings; `pgbatch worker` turns them back on.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    cli()


if __name__ == "__main__":
    main()

"""`pgbatch llm …`: submit an OpenAI batch file, read its results, its usage and the limits."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from pgbatch.errors import PgbatchError
from pgbatch.terminal import SafeConsole
from pgbatch.workloads import llm
from pgbatch.workloads.llm.batch_api.service import run_batch_id
from pgbatch.workloads.llm.requests import ENDPOINTS, RequestFileError, check_request_lines
from pgbatch.workloads.llm.status import UsageReport, batch_usage_report, limit_states

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = ["llm_cli"]

T = TypeVar("T")

llm_cli = typer.Typer(
    help="LLM batches in the OpenAI batch format (docs/llm.md).", no_args_is_help=True
)
console = SafeConsole()
err_console = SafeConsole(stderr=True)

AppOption = Annotated[
    str | None,
    typer.Option("--app", "-a", envvar="PGBATCH_APP", help="Your app as module:attribute."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


# What `results` and `status` take: pgbatch's number, or the id the OpenAI API answered.
BATCH_HELP = "The batch: its number, or an OpenAI batch id (batch_N) of /openai/v1."


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _app(spec: str | None, *, existing: bool) -> App:
    """Return the App (yours with --app, else pgbatch's own) with the LLM workload in use."""
    # pgbatch.cli mounts this module: imported here, when a command runs, not at import.
    from pgbatch import cli

    application = cli.load_app(spec) if spec else (cli._existing_app() if existing else None)
    if application is None:
        from pgbatch.app import App

        application = App()
    application.use(llm.WORKLOAD)
    return application


def _run(application: App, coro: Coroutine[Any, Any, T]) -> T:
    async def closing() -> T:
        try:
            return await coro
        finally:
            await application.close()

    try:
        return asyncio.run(closing())
    except PgbatchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as stream:
        yield from stream


@llm_cli.command()
def submit(
    requests: Annotated[Path, typer.Argument(help="The request file (JSONL, OpenAI format).")],
    endpoint: Annotated[
        str | None, typer.Option(help=f"Every line's url must be this ({', '.join(ENDPOINTS)}).")
    ] = None,
    cache: Annotated[
        bool, typer.Option(help="Reuse stored answers to identical requests; store these.")
    ] = False,
    upstream: Annotated[str | None, typer.Option(help="A configured upstream's name.")] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    tenant: Annotated[str, typer.Option(help="The tenant that owns the batch.")] = "default",
    app_spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a request file whole (nothing is submitted if a line is bad), then submit it."""
    if endpoint is not None and endpoint not in ENDPOINTS:
        _fail(f"--endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}", 2)
    if not requests.is_file():
        _fail(f"{requests}: no such file", 2)
    try:
        # A first pass checks every line without keeping them: a million-line file is not
        # held in memory, and a bad last line still means nothing was submitted.
        for _ in check_request_lines(_lines(requests), endpoint):
            pass
    except RequestFileError as exc:
        for line_error in exc.errors:
            where = f"line {line_error.line}" if line_error.line is not None else "file"
            err_console.print(
                f"[red]{requests}:{escape(where)}:[/] {escape(line_error.code)}: "
                f"{escape(line_error.message)}",
                highlight=False,
            )
        _fail(f"{len(exc.errors)} bad line(s): nothing submitted", 1)
    application = _app(app_spec, existing=False)
    batch = _run(
        application,
        llm.submit_requests(
            application,
            check_request_lines(_lines(requests), endpoint),
            tenant=tenant,
            idempotency_key=idempotency_key,
            cache=cache,
            upstream=upstream,
        ),
    )
    if as_json:
        sys.stdout.write(
            orjson.dumps({"id": batch.id, "total_items": batch.total_items}).decode() + "\n"
        )
    else:
        console.print(f"batch {batch.id}: {batch.total_items} requests submitted", highlight=False)


@llm_cli.command()
def results(
    batch_id: Annotated[str, typer.Argument(help=BATCH_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the lines.")],
    errors: Annotated[bool, typer.Option(help="Write the error lines instead.")] = False,
    wait: Annotated[bool, typer.Option(help="Show a progress bar until the batch ends.")] = True,
    app_spec: AppOption = None,
) -> None:
    """Write a batch's output lines (or error lines) as JSONL, once it has ended."""
    application = _app(app_spec, existing=True)

    async def work() -> int:
        number = await run_batch_id(application, batch_id)
        if wait:
            from pgbatch.progress import watch_batch

            await watch_batch(application, number, console=err_console)
        written = 0
        with output.open("wb") as stream:
            async for line in llm.output_lines(application, number, errors=errors):
                stream.write(orjson.dumps(line) + b"\n")
                written += 1
        return written

    written = _run(application, work())
    kind = "error" if errors else "output"
    err_console.print(f"{written} {kind} lines written to {output}", highlight=False)


@llm_cli.command()
def status(
    batch_id: Annotated[str, typer.Argument(help=BATCH_HELP)],
    app_spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a batch's usage per model, its upstream calls and 429s, and its estimated cost."""
    application = _app(app_spec, existing=True)

    async def work() -> UsageReport:
        return await batch_usage_report(application, await run_batch_id(application, batch_id))

    report = _run(application, work())
    document = report.as_dict()
    if as_json:
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"batch {batch_id} usage")
    columns = ("model", "requests", "failed", "upstream_calls", "rate_limited", "cache_hits",
               "prompt_tokens", "completion_tokens", "cached_tokens")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in document["models"]:
        table.add_row(*(escape(str(row[c])) for c in columns))
    console.print(table)
    cost = document["cost_usd"]
    console.print(
        "estimated cost: " + ("no price for these models" if cost is None else f"${cost:.6f}"),
        highlight=False,
    )


@llm_cli.command()
def limits(app_spec: AppOption = None, as_json: JsonOption = False) -> None:
    """Show the shared rate limits: used in the last minute, in flight, paused."""
    application = _app(app_spec, existing=True)
    states = _run(application, limit_states(application))
    if as_json:
        rows = [
            {"name": s.name, "rpm": s.rpm, "tpm": s.tpm, "max_in_flight": s.max_in_flight,
             "window_requests": s.window_requests, "window_tokens": s.window_tokens,
             "in_flight": s.in_flight, "paused_for_s": s.paused_for_s, "pauses": s.pauses}
            for s in states
        ]  # fmt: skip
        sys.stdout.write(orjson.dumps({"limits": rows}, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title="shared LLM limits")
    for column in ("limit", "requests/min", "tokens/min", "in flight", "paused", "429 pauses"):
        table.add_column(column, justify="left" if column == "limit" else "right")
    for s in states:
        table.add_row(
            escape(s.name),
            f"{s.window_requests}/{s.rpm or '-'}",
            f"{s.window_tokens}/{s.tpm or '-'}",
            f"{s.in_flight}/{s.max_in_flight or '-'}",
            f"{s.paused_for_s:.1f} s" if s.paused_for_s > 0 else "",
            str(s.pauses),
        )
    console.print(table)

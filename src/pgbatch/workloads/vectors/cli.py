"""`pgbatch libraries …`: create, list, import NDJSON into, and search vector libraries.

A Typer sub-app that pgbatch's CLI mounts. Commands run the async library functions
(libraries.py) on an App that uses the workload; `import --wait` runs a worker in this
process until the documents are indexed (otherwise any `pgbatch worker` of an app that
uses the workload indexes them).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pgbatch.app import App
from pgbatch.errors import PgbatchError
from pgbatch.workloads.vectors import WORKLOAD, libraries
from pgbatch.workloads.vectors.embedders import DEFAULT_EMBEDDER

__all__ = ["libraries_cli"]

T = TypeVar("T")

libraries_cli = typer.Typer(
    help="Vector libraries: create, list, import, search.", no_args_is_help=True
)
console = Console()
err_console = Console(stderr=True)

AppOption = Annotated[
    str | None,
    typer.Option("--app", "-a", envvar="PGBATCH_APP", help="Your app as module:attribute."),
]
TenantOption = Annotated[str, typer.Option(help="The tenant the library belongs to.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _app(spec: str | None) -> App:
    """Return the App of `--app` (or a plain one), using the vectors workload."""
    if spec is None:
        app = App()
    else:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            _fail(f"--app must look like module:attribute, got {spec!r}", 2)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            found = getattr(importlib.import_module(module_name), attribute, None)
        except ImportError as exc:
            _fail(f"cannot import {module_name!r}: {exc}", 2)
        if not isinstance(found, App):
            _fail(f"{spec} is not a pgbatch.App", 2)
        app = found
    app.use(WORKLOAD)
    return app


def _run(app: App, coro: Coroutine[Any, Any, T]) -> T:
    async def closing() -> T:
        try:
            return await coro
        finally:
            await app.close()

    try:
        return asyncio.run(closing())
    except PgbatchError as exc:
        field = getattr(exc, "field", None)
        _fail(f"{field}: {exc}" if field else str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        _fail(f"{option}: not JSON ({exc})", 2)
    if not isinstance(value, dict):
        _fail(f"{option}: must be a JSON object", 2)
    return value


def _print_json(document: Any) -> None:
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")


@libraries_cli.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The library's name (unique for the tenant).")],
    embedder: Annotated[str, typer.Option(help="hash-<dim>, or one your app registers.")] = (
        DEFAULT_EMBEDDER
    ),
    metadata: Annotated[str | None, typer.Option(help="A JSON object.")] = None,
    tenant: TenantOption = "default",
    app_spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a library (needs pgvector on the server; the embedded server has it)."""
    app = _app(app_spec)
    library = _run(
        app,
        libraries.create_library(
            app,
            tenant=tenant,
            name=name,
            metadata=_json_object(metadata, "--metadata"),
            embedder=embedder,
        ),
    )
    if as_json:
        _print_json({"id": library.id, "name": library.name, "dimension": library.dimension})
    else:
        console.print(f"library {library.id} {escape(library.name)} ({library.embedder})")


@libraries_cli.command("list")
def list_(
    tenant: TenantOption = "default", app_spec: AppOption = None, as_json: JsonOption = False
) -> None:
    """List the tenant's libraries with their documents by status."""
    app = _app(app_spec)

    async def work() -> list[tuple[Any, dict[str, int]]]:
        found = []
        after = 0
        while page := await libraries.list_libraries(app, tenant=tenant, after=after, limit=500):
            for library in page:
                found.append(
                    (library, await libraries.status_counts(app, library.id, tenant=tenant))
                )
            after = page[-1].id
        return found

    rows = _run(app, work())
    if as_json:
        _print_json(
            [
                {"id": x.id, "name": x.name, "embedder": x.embedder, "documents": counts}
                for x, counts in rows
            ]
        )
        return
    table = Table()
    for column in ("id", "name", "embedder", "documents"):
        table.add_column(column)
    for library, counts in rows:
        shown = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
        table.add_row(str(library.id), escape(library.name), library.embedder, shown)
    console.print(table)


def _lines(path: Path) -> Iterator[bytes]:
    """Yield the file's lines as they are read: the import never holds the file."""
    with path.open("rb") as lines:
        yield from lines


@libraries_cli.command("import")
def import_(
    library_id: Annotated[int, typer.Argument(help="The library's id.")],
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="An NDJSON file.")],
    wait: Annotated[bool, typer.Option(help="Index in this process and wait until done.")] = False,
    tenant: TenantOption = "default",
    app_spec: AppOption = None,
) -> None:
    """Import documents, one JSON object per line ({"text"|"chunks", "metadata"}), as one
    indexing batch: all of them, or (a bad line) none."""
    app = _app(app_spec)

    async def work() -> tuple[int, int | None]:
        try:
            added, batch = await libraries.import_documents(
                app, library_id, _lines(path), tenant=tenant
            )
        except libraries.ImportLineError as exc:
            _fail(f"{path}:{exc.line}: {exc.reason} (nothing was imported)", 1)
        if wait and batch is not None:
            worker = app.worker(concurrency=4, queues=["default"])
            running = asyncio.create_task(worker.run())
            try:
                await app.wait(batch.id, callbacks=True)
            finally:
                worker.request_stop()
                await running
        return added, None if batch is None else batch.id

    added, batch_id = _run(app, work())
    state = "indexed" if wait else "pending (a worker indexes them)"
    console.print(
        f"{added} documents imported into library {library_id}, {state}; "
        f"batch {batch_id if batch_id is not None else 'none'}"
    )


@libraries_cli.command("search")
def search(
    library_id: Annotated[int, typer.Argument(help="The library's id.")],
    text: Annotated[str, typer.Argument(help="The query text.")],
    k: Annotated[int, typer.Option("-k", min=1, max=libraries.MAX_K, help="Hits.")] = 10,
    filter_: Annotated[
        str | None, typer.Option("--filter", help="Document metadata to match (JSON).")
    ] = None,
    exact: Annotated[bool, typer.Option(help="Compare every chunk instead of HNSW.")] = False,
    tenant: TenantOption = "default",
    app_spec: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the k chunks nearest to the text."""
    app = _app(app_spec)
    hits = _run(
        app,
        libraries.search(
            app,
            library_id,
            tenant=tenant,
            text=text,
            k=k,
            metadata_filter=_json_object(filter_, "--filter"),
            exact=exact,
        ),
    )
    if as_json:
        _print_json(
            [
                {"document_id": h.document_id, "seq": h.seq, "score": h.score, "text": h.text}
                for h in hits
            ]
        )
        return
    table = Table()
    for column in ("score", "document", "chunk", "text"):
        table.add_column(column)
    for hit in hits:
        table.add_row(f"{hit.score:.3f}", str(hit.document_id), str(hit.seq), escape(hit.text[:80]))
    console.print(table)

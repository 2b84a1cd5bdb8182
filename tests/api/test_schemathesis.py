"""Fuzz the API against its own OpenAPI document with schemathesis.

Every operation gets generated requests, valid and invalid (examples, coverage and
fuzzing phases); each response must not be a server error and must conform to the
document (status code, content type, headers, body schema), and invalid requests must be
refused. `make test` runs a few examples per operation; `make fuzz` sets
PGBATCH_FUZZ_EXAMPLES=500.

Schemathesis calls the server synchronously (requests), so the server runs in a thread
with its own event loop, over a fresh database seeded with batches in every state.
"""

from __future__ import annotations

import asyncio
import copy
import io
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import schemathesis
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pgbatch.api.auth import new_token
from pgbatch.api.server import create_api
from pgbatch.api.server import server as api_server
from pgbatch.config import Settings
from pgbatch.workloads import vectors
from pgbatch.workloads.llm.batch_api import service as openai_batch_api
from tests.apps.api_app import build_app
from tests.conftest import settings_for

EXAMPLES = int(os.environ.get("PGBATCH_FUZZ_EXAMPLES", "5"))
# Event streams stay open until their batch ends (or forever, tenant-wide): schemathesis
# reads them for this long, or this many events, and then hangs up.
STREAM_READ_S = 0.2
STREAM_EVENTS = 3
TENANT = "fuzz"
START_TIMEOUT_S = 60.0

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


class ThreadedApi:
    """A real API server, its worker and seeded batches, in a thread with its own loop."""

    def __init__(self, database_url: str, token_entry: str) -> None:
        self.settings = settings_for(
            database_url, api_tokens=token_entry, sse_min_interval_s=0.05, sse_keepalive_s=0.2
        )
        self.base_url = ""
        self.batch_ids: list[int] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzzed-api", daemon=True)

    def __enter__(self) -> ThreadedApi:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError("the API did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT_S)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app, gate = build_app(self.settings)
        http = api_server(app, host="127.0.0.1", port=0, log_level="warning")
        serving = asyncio.create_task(http.serve())
        while not http.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        work = app.worker(concurrency=4)
        working = asyncio.create_task(work.run())
        try:
            await self._seed(app)
            self.base_url = f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}"
            self._ready.set()
            await self._stop.wait()
        finally:
            gate.set()
            work.request_stop()
            await working
            http.should_exit = True
            await serving
            await app.close()

    async def _seed(self, app: Any) -> None:
        """Batches in every state, with small ids the fuzzer is likely to hit."""
        seeded = [
            await app.submit("echo", ["a", None, {"k": 1}], tenant=TENANT),
            await app.submit("flaky", ["ok", "fail"], tenant=TENANT),
            await app.submit("flaky", ["raise"], tenant=TENANT),
            await app.submit("gated", [1, 2], tenant=TENANT, shard_size=1),
            await app.submit("gated", [1], tenant=TENANT, idempotency_key="seeded"),
            await app.submit("echo", [1], tenant="someone-else"),
        ]
        self.batch_ids = [b.id for b in seeded]
        assert self.batch_ids == SEEDED_IDS, "the fuzzer aims at these ids"
        await app.cancel(seeded[4].id)
        # An OpenAI request file and a batch that failed its validation (file-1, batch_1):
        # something for the /openai/v1 operations to find, with nothing to run upstream.
        await openai_batch_api.store_file(
            app, TENANT, filename="f.jsonl", purpose="batch", content=io.BytesIO(b"{}"), size=2
        )
        await openai_batch_api.create_batch(
            app,
            TENANT,
            input_file_id="file-1",
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=None,
        )
        for batch in (seeded[0], seeded[1], seeded[2], seeded[4], seeded[5]):
            await app.wait(batch.id, timeout_s=30)
        await _seed_library(app)


async def _seed_library(app: Any) -> None:
    """A vector library (id 1) with an indexed document (id 1), where pgvector exists."""
    try:
        library = await vectors.create_library(app, tenant=TENANT, name="seeded")
    except vectors.ExtensionMissingError:
        return  # the server has no pgvector: library routes answer 404 and 503 there
    _, batch = await vectors.add_documents(
        app, library.id, [vectors.DocumentIn(text="seeded text", metadata={"k": 1})], tenant=TENANT
    )
    assert batch is not None
    await app.wait(batch.id, timeout_s=30)


def _openapi_document() -> dict[str, Any]:
    """Return the OpenAPI document of the API under test (building it needs no database)."""
    app, _ = build_app(Settings())
    return create_api(app).openapi()


def _fuzzing_document() -> dict[str, Any]:
    """Return the document, told which task names exist.

    Without it, every generated submission names an unknown task and is refused (422):
    no batch would ever be created by the fuzzer. `slow` is left out: its items choose
    how long they sleep.
    """
    document = copy.deepcopy(DOCUMENT)
    # The JSON body is the named schema BatchSubmit (api/openapi.py names inline bodies).
    submit = document["components"]["schemas"]["BatchSubmit"]
    submit["properties"]["task"]["enum"] = FUZZED_TASKS
    return document


DOCUMENT = _openapi_document()
FUZZED_TASKS = ["echo", "flaky", "gated"]
TOKEN, TOKEN_ENTRY = new_token(TENANT)
# Ids of the batches the fixture seeds: the database is fresh, so they are these.
SEEDED_IDS = list(range(1, 7))
schema = schemathesis.openapi.from_dict(
    _fuzzing_document(),
    config=schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {TOKEN}"},
            "request-timeout": 10,
            "generation": {"max-examples": EXAMPLES, "database": "none"},
            "operations": [
                {
                    "include-path-regex": "/events$",
                    "request-timeout": STREAM_READ_S,
                    "max-stream-events": STREAM_EVENTS,
                }
            ],
        }
    ),
)


@pytest.fixture(scope="module")
def fuzzed_api(server_url: str, template_db: str) -> Iterator[ThreadedApi]:
    """Return a running API (in its own thread) on a fresh, seeded database.

    One for the module: the operations share it, as they would share a real server.
    """
    name = f"pgbatch_fuzz_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(make_conninfo(server_url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        with ThreadedApi(make_conninfo(server_url, dbname=name), TOKEN_ENTRY) as running:
            yield running
            _print_figures(running)
    finally:
        with psycopg.connect(make_conninfo(server_url, dbname="postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _print_figures(running: ThreadedApi) -> None:
    """Print how many requests the fuzzing made, by operation and status (from /metrics)."""
    text = httpx.get(
        f"{running.base_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    ).text
    counts: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pgbatch_http_request_duration_seconds_count":
                labels = sample.labels
                counts[labels["method"], labels["route"], labels["status"]] += int(sample.value)
    print(f"\nschemathesis: {sum(counts.values())} requests, {EXAMPLES} examples per operation")
    for (method, route, status), n in sorted(counts.items()):
        print(f"  {method:6} {route:45} {status}  {n}")


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """Aim half the generated batch ids at seeded batches: random ids are almost all 404s.

    Only a valid id (an int) is swapped for another valid one, so a case generated to be
    invalid stays invalid.
    """
    value = (path_parameters or {}).get("batch_id")
    if not isinstance(value, int) or isinstance(value, bool):
        return _seeded_library(path_parameters)
    return st.sampled_from([value, *SEEDED_IDS]).map(
        lambda batch_id: {**path_parameters, "batch_id": batch_id}
    )


def _seeded_library(path_parameters: dict[str, Any] | None) -> Any:
    """Aim half the generated library and document ids at the seeded ones (id 1)."""
    result = st.just(path_parameters)
    for name in ("library_id", "document_id"):
        value = (path_parameters or {}).get(name)
        # Only a valid id (1 ... 2**63-1) is swapped, so an invalid case stays invalid.
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**63:
            result = result.flatmap(
                lambda params, name=name, value=value: st.sampled_from([value, 1]).map(
                    lambda chosen: {**params, name: chosen}
                )
            )
    return result


@schemathesis.serializer("application/x-ndjson")
def ndjson_serializer(context: Any, value: Any) -> dict[str, Any]:
    """Send a generated NDJSON body (documented as a string) as its UTF-8 text."""
    if isinstance(value, bytes):
        return {"data": value}
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return {"data": text.encode("utf-8", "surrogatepass")}


def test_the_fuzzed_document_is_the_one_served(fuzzed_api: ThreadedApi) -> None:
    served = httpx.get(f"{fuzzed_api.base_url}/openapi.json")
    assert served.json() == DOCUMENT


# Raised inside schemathesis' own strategies (its negative-data generation), not ours.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
@schema.parametrize()
def test_api_conforms_to_its_openapi(case: schemathesis.Case, fuzzed_api: ThreadedApi) -> None:
    case.call_and_validate(base_url=fuzzed_api.base_url, checks=CHECKS)

"""Document ingest through HTTP: POST /v1/documents (the writer) against one transaction per
document, same run.

Run from the repository root:

    .venv/bin/python benchmarks/ingest_http.py [--seconds 10] [--clients 64] [--rounds 1]
        [--database-url URL | --private-server] [--profile]
        [--loop auto|asyncio|uvloop] [--http auto|h11|httptools] [--server-path DIR]
        [--access-log] [--client raw|httpx]

The server is uvicorn on 127.0.0.1 in a process of its own, started anew for each mode,
so the clients' CPU does not count against its event loop. It serves pgbatch's own API
(`create_api`) with two routes added by this benchmark:

- `POST /baseline/v1/documents`: the request/response contract of `POST /v1/documents`
  (201 after commit, 409 missing references, 422 malformed), but each document is
  written in its own transaction: the writer's statements through `baseline_poster`, as
  benchmarks/ingest.py does;
- `GET /bench/writer-stats`: the writer's counters (flush sizes, flush latency).

The clients are 64 keep-alive HTTP/1.1 connections in this process (a minimal client of
its own: httpx costs 30 times the CPU, see `Connection`), each posting one document of
the examples/documents.py workload (with references) and waiting for its answer before
the next. Each mode runs for a bounded time on the same database, the document tables
made anew in between, writer then baseline, `--rounds` times (the ratio is the median of
the rounds'; docs/performance.md runs 3):

- writer: `POST /v1/documents` (DocumentWriter at its defaults), the app's default pool
  (6 connections, what `pgbatch serve` gets);
- baseline: `POST /baseline/v1/documents`, pool 8 (the best baseline pool of
  benchmarks/ingest.py on this machine).

It prints docs/s, p50/p99 latency, the ratio, the flush-size distribution (from the
writer's stats route, checked against `/metrics`), the CPU seconds per document of the
server process, of PostgreSQL and of the client, and PASS/MISS against the 2x target;
it checks that every acknowledged (201) document is stored and writes
benchmarks/results/ingest_http.json. `--profile` then runs each mode once more with
py-spy attached to the server process (`pip install py-spy` into the venv) and prints
where the server's CPU went.

`--server-path DIR` prepends DIR to the server's PYTHONPATH: a folder made with
`pip install --target DIR uvloop httptools` lets uvicorn's "auto" pick them for the
server alone, without installing them into the project's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response

import pgbatch
from benchmarks.harness import (
    RESULTS_DIR,
    bench_database,
    child_env,
    connect,
    cpu_sample,
    fmt_int,
    fmt_ms,
    percentile,
    python,
    require_local,
    server_info,
    server_pids,
    server_url,
    spawn,
    stop_processes,
    verdict,
    wait_until,
    write_results,
)
from benchmarks.ingest import empty_tables, missing_acknowledged, size_distribution
from examples.documents import DocumentItem, baseline_poster, run_ingest
from pgbatch.api.auth import DEFAULT_TENANT
from pgbatch.api.errors import ERRORS, ApiError
from pgbatch.api.server import create_api
from pgbatch.api.state import Tenant, api_state
from pgbatch.db.database import Database
from pgbatch.db.embedded import embedded_url, stop_embedded
from pgbatch.workloads import documents
from pgbatch.workloads.documents import DocumentWriter
from pgbatch.workloads.documents.routes import WRITER_KEY, DocumentOut, write_document
from pgbatch.writer.models import WriteOutcome, WriteStatus

CLIENTS = 64
SECONDS_PER_MODE = 10.0
HOST = "127.0.0.1"
# Connections of the server's pool, by mode. The writer: the App's default (Settings.
# pool_max_size), what `pgbatch serve` runs with; its 4 lanes take 4. The baseline: 8,
# its best pool in benchmarks/ingest.py on this machine (64 was slower).
WRITER_POOL = 6
BASELINE_POOL = 8
TARGET_RATIO = 2.0  # issue 3, through HTTP
# A server starts (imports, migrations, the first connection) within this long.
SERVER_START_TIMEOUT_S = 60.0
# A request that takes longer than this is a hung server, not a figure.
REQUEST_TIMEOUT_S = 30.0
# py-spy's sampling rate (its default): about 700 samples in a 10 s mode.
PROFILE_RATE_HZ = 100
# Where the server's CPU went: a sample counts for the first of these that matches its
# innermost frames (leaf first); frames of no category (stdlib helpers such as
# contextlib, enum, typing) count for their caller's.
PROFILE_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("JSON decode/encode (json, orjson)", ("/json/", "orjson")),
    ("pydantic validation/serialisation", ("/pydantic/", "/pydantic_core/")),
    ("FastAPI (dependencies, body, response)", ("/fastapi/",)),
    ("Starlette (routing, request, middleware)", ("/starlette/",)),
    ("uvicorn + HTTP parser (h11/httptools)", ("/uvicorn/", "/h11/", "/httptools/")),
    ("Prometheus metrics", ("/prometheus_client/",)),
    ("pgbatch writer, sink, flush", ("/pgbatch/writer/", "/pgbatch/db/", "/examples/")),
    ("pgbatch API route and errors", ("/pgbatch/api/", "/benchmarks/")),
    ("psycopg + pool (driver)", ("/psycopg/", "/psycopg_pool/", "/psycopg_binary/")),
    ("asyncio event loop (and anyio)", ("/asyncio/", "/uvloop/", "/anyio/")),
    ("logging", ("/logging/",)),
)
# Only the thread that holds the GIL: the event loop's Python work, not the idle threads
# of anyio's pool. py-spy stops the server for each sample (the default): without that
# (--nonblocking) a third of the stacks came back cut short, but the stop costs the
# server time, so the profiled run's docs/s is printed and not counted as a figure.
PROFILE_OPTIONS = ("--gil",)
PROFILE_TOP_FUNCTIONS = 15
# Stages of a request, each named by functions of its frames (FastAPI 0.165, Starlette
# 1.10, uvicorn 0.54 and psycopg 3.3 as installed; other versions may name them
# otherwise). A sample counts for every stage whose function is anywhere in its stack.
PROFILE_STAGES: tuple[tuple[str, frozenset[str]], ...] = (
    ("uvicorn: read and parse requests", frozenset({
        "H11Protocol.data_received", "HttpToolsProtocol.data_received"})),
    ("uvicorn: send answers", frozenset({"RequestResponseCycle.send"})),
    ("ASGI app: middleware, routing, handler (run_asgi)", frozenset({
        "RequestResponseCycle.run_asgi"})),
    ("FastAPI: read the body, parse JSON", frozenset({"Request.body", "Request.json"})),
    ("FastAPI: solve dependencies (tenant, body validation)", frozenset({
        "solve_dependencies"})),
    ("FastAPI: validate the body (pydantic)", frozenset({"request_body_to_args"})),
    ("FastAPI: a sync dependency in a worker thread", frozenset({"run_in_threadpool"})),
    ("the route function (post_document)", frozenset({
        "post_document", "create_bench_api.<locals>.post_document_baseline"})),
    ("FastAPI: serialise the answer", frozenset({"serialize_response"})),
    ("the writer's flush (lane tasks)", frozenset({"write_flush"})),
    ("psycopg: execute", frozenset({"AsyncCursor.execute", "AsyncConnection.execute"})),
)  # fmt: skip
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")

MODES = {
    "writer": ("/v1/documents", WRITER_POOL),
    "baseline": ("/baseline/v1/documents", BASELINE_POOL),
}


# -- the server process -------------------------------------------------------------------


def create_bench_api(app: pgbatch.App) -> FastAPI:
    """Return pgbatch's API for `app` with the baseline route and the stats route added."""
    router = APIRouter(prefix="/baseline/v1", tags=["benchmark"])
    posters: dict[str, Callable[[DocumentItem], Awaitable[WriteOutcome[uuid.UUID]]]] = {}

    @router.post("/documents", status_code=201, response_model=DocumentOut, responses=ERRORS(409))
    async def post_document_baseline(request: Request, tenant: Tenant) -> Response:
        """Write one document in a transaction of its own; the contract of POST /v1/documents.

        The same parsing and answering code as the real route (`write_document`): only the
        write differs.
        """
        if tenant != DEFAULT_TENANT:  # the benchmark's server has no tokens
            raise ApiError(422, "invalid_document", "the baseline serves the default tenant")
        post = posters.get("baseline")
        if post is None:  # the app's pool exists only once the server has started
            post = posters["baseline"] = baseline_poster(api_state(request).app.db)
        return await write_document(request, tenant, post)

    stats_router = APIRouter(prefix="/bench", tags=["benchmark"])

    @stats_router.get("/writer-stats")
    async def writer_stats(request: Request) -> dict[str, Any]:
        """Return the writer's counters (empty before the first POST /v1/documents)."""
        writer = api_state(request).extras.get(WRITER_KEY)
        server = {"loop": type(asyncio.get_running_loop()).__module__}
        if not isinstance(writer, DocumentWriter):
            return {"server": server}
        stats = asdict(writer.stats)
        stats["flush_sizes"] = {str(k): v for k, v in stats["flush_sizes"].items()}
        return {"server": server, "stats": stats}

    app.use(documents.WORKLOAD)  # /v1/documents, as `pgbatch serve` has it
    api = create_api(app)
    api.include_router(router)
    api.include_router(stats_router)
    return api


def serve(port: int, *, loop: str, http: str, access_log: bool) -> None:
    """Serve the benchmark's API on loopback until SIGTERM (DATABASE_URL from the env)."""
    config = uvicorn.Config(
        create_bench_api(pgbatch.App()),
        host=HOST,
        port=port,
        loop=loop,
        http=http,
        # `pgbatch serve` logs at info, an access-log line per request; --access-log
        # measures that, the default leaves it out (a deployment under load turns it off).
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    uvicorn.Server(config).run()


# -- the clients --------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection of the client: a request, its answer, the next.

    Written here rather than taken from httpx: it costs about 50 us of CPU per request,
    where httpx 0.28 with httpcore 1.0 costs 1.6 ms (64 clients of one connection each)
    to 16 ms (one client of 64 connections) on this machine, and the clients share the
    two cores with the server. It speaks just what this server answers: a status line,
    headers and a body of content-length bytes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        """Connect to `host:port`."""
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST a JSON `body` to `path`; return the status and the answer's body."""
        self._writer.write(
            b"POST %b HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (path.encode(), HOST.encode(), len(body), body)
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *headers = head[:-4].split(b"\r\n")
        length = 0
        for header in headers:
            name, _, value = header.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise RuntimeError(f"the server sent transfer-encoding {value.strip()!r}")
        return int(status_line.split(b" ", 2)[1]), await self._reader.readexactly(length)

    async def close(self) -> None:
        """Close the connection."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


class HttpxConnection:
    """A connection through httpx instead (`--client httpx`): one AsyncClient each."""

    def __init__(self, base_url: str) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST a JSON `body` to `path`; return the status and the answer's body."""
        answer = await self._client.post(
            path, content=body, headers={"content-type": "application/json"}
        )
        return answer.status_code, answer.content

    async def close(self) -> None:
        """Close the client."""
        await self._client.aclose()


class HttpPoster:
    """Post a workload item as JSON to one route; turn the answer back into an outcome.

    The workload's items carry the keys of their references; the API takes identities.
    Every reference is to a document acknowledged before, so the identities of
    acknowledged documents are kept by key. A post takes a free connection and gives it
    back: with as many connections as clients, none ever waits for one.
    """

    def __init__(self, connections: list[Connection] | list[HttpxConnection], path: str) -> None:
        self._free: list[Connection | HttpxConnection] = list(connections)
        self._path = path
        self._identities: dict[uuid.UUID, bytes] = {}
        self.statuses: Counter[int] = Counter()

    async def __call__(self, item: DocumentItem) -> WriteOutcome[uuid.UUID]:
        identity = item.payload.identity_json.encode()
        references = b",".join(self._identities[key] for key in item.references)
        body = b'{"identity":%b,"body":%b,"references":[%b],"partition":%b}' % (
            identity,
            item.payload.body_json.encode(),
            references,
            orjson.dumps(item.partition),
        )
        connection = self._free.pop()
        try:
            status, answer = await asyncio.wait_for(
                connection.post(self._path, body), REQUEST_TIMEOUT_S
            )
        finally:
            self._free.append(connection)
        self.statuses[status] += 1
        if status == 201:
            key = orjson.loads(answer)["key"]
            if key != str(item.key):
                raise RuntimeError(f"the server acknowledged key {key}, the client made {item.key}")
            self._identities[item.key] = identity
            return WriteOutcome(WriteStatus.WRITTEN)
        if status == 409:
            error = orjson.loads(answer)["error"]
            kind = WriteStatus.CONFLICT if error["code"] == "conflict" else WriteStatus.REJECTED
            return WriteOutcome(kind, error["message"])
        if status == 422:
            return WriteOutcome(WriteStatus.REJECTED, answer.decode())
        raise RuntimeError(f"POST {self._path} answered {status}: {answer.decode()}")


# -- one mode -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModeFigures:
    """What one mode measured."""

    mode: str
    route: str
    pool: int
    docs_per_s: float
    written: int
    rejected: int
    conflicts: int
    p50_s: float
    p99_s: float
    # CPU seconds per written document: the uvicorn process, PostgreSQL, this process
    server_cpu_per_doc_s: float
    postgres_cpu_per_doc_s: float
    client_cpu_per_doc_s: float
    # cores each kept busy on average, and the whole machine
    server_cores: float
    postgres_cores: float
    client_cores: float
    machine_cores: float
    missing_acknowledged: int
    statuses: dict[int, int]
    loop: str

    @property
    def other_cores(self) -> float:
        """Return the cores that processes other than these three kept busy (noise)."""
        return max(
            0.0, self.machine_cores - self.server_cores - self.postgres_cores - self.client_cores
        )

    def line(self) -> str:
        """Return the figures as printed lines."""
        return (
            f"{self.mode:<9} {fmt_int(self.docs_per_s):>7} docs/s   p50 {fmt_ms(self.p50_s):>9}"
            f"   p99 {fmt_ms(self.p99_s):>9}   CPU/doc: server"
            f" {self.server_cpu_per_doc_s * 1e6:4.0f} us, PostgreSQL"
            f" {self.postgres_cpu_per_doc_s * 1e6:4.0f} us, client"
            f" {self.client_cpu_per_doc_s * 1e6:4.0f} us\n"
            f"{'':<9} cores busy: server {self.server_cores:.2f}, PostgreSQL"
            f" {self.postgres_cores:.2f}, client {self.client_cores:.2f}, others"
            f" {self.other_cores:.2f}   written {self.written}, rejected {self.rejected},"
            f" conflicts {self.conflicts}   ({self.route}, pool {self.pool}, {self.loop} loop)"
        )


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How the server process runs, and which HTTP client posts."""

    loop: str
    http: str
    access_log: bool
    extra_path: str | None
    client: str  # "raw" (Connection) or "httpx"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _server(
    conninfo: str, mode: str, options: RunOptions
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Start the server of `mode`, wait until it answers, yield it and its URL, stop it."""
    port = _free_port()
    env = child_env(conninfo, application_name=f"ingest_http_{mode}")
    env["PGBATCH_POOL_MAX_SIZE"] = str(MODES[mode][1])
    if options.extra_path:
        env["PYTHONPATH"] = os.pathsep.join([options.extra_path, env["PYTHONPATH"]])
    command = [python(), str(Path(__file__).resolve()), "--serve", str(port)]
    command += ["--loop", options.loop, "--http", options.http]
    if options.access_log:
        command.append("--access-log")
    log = RESULTS_DIR / "logs" / f"ingest_http_{mode}.log"
    process = await spawn(command, env=env, log=log)
    base_url = f"http://{HOST}:{port}"
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as probe:

            async def ready() -> bool:
                if process.returncode is not None:
                    raise RuntimeError(f"the {mode} server exited; see {log}")
                with contextlib.suppress(httpx.TransportError):
                    return (await probe.get("/healthz")).status_code == 200
                return False

            await wait_until(ready, timeout_s=SERVER_START_TIMEOUT_S, what=f"{mode} server")
        yield process, base_url
    finally:
        await stop_processes([process])


async def _postgres_pids(conninfo: str, whole_server: bool) -> list[int]:
    """Return the server's processes (private server) or this database's backends."""
    if whole_server:
        return await server_pids(conninfo)
    async with await connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )
        return [row[0] for row in await cur.fetchall()]


def _py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(python()).parent)) or shutil.which("py-spy")
    if not found:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


async def run_mode(
    conninfo: str,
    mode: str,
    *,
    clients: int,
    seconds: float,
    options: RunOptions,
    whole_server: bool,
    profile_to: Path | None = None,
) -> tuple[ModeFigures, dict[str, Any]]:
    """Run one mode on new tables with a server of its own; return figures and server stats."""
    route, pool = MODES[mode]
    async with Database(conninfo, max_size=1) as db:
        await empty_tables(db)
    acknowledged: set[uuid.UUID] = set()
    async with contextlib.AsyncExitStack() as stack:
        process, base_url = await stack.enter_async_context(_server(conninfo, mode, options))
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S)
        )
        # One post first: the writer starts on the first request, outside the timing.
        warmup = {"identity": {"type": "warmup", "id": mode}, "body": {}, "references": []}
        answer = await client.post(route, json=warmup)
        if answer.status_code != 201:
            raise RuntimeError(f"warm-up POST {route}: {answer.status_code} {answer.text}")
        connections: list[Connection] | list[HttpxConnection]
        if options.client == "httpx":
            connections = [HttpxConnection(base_url) for _ in range(clients)]
        else:
            port = int(base_url.rsplit(":", 1)[1])
            connections = [await Connection.open(HOST, port) for _ in range(clients)]
        for connection in connections:
            stack.push_async_callback(connection.close)
        poster = HttpPoster(connections, route)
        postgres = await _postgres_pids(conninfo, whole_server)
        me = os.getpid()
        before = cpu_sample([process.pid, me, *postgres])
        profiler = None
        if profile_to is not None:
            profile_to.unlink(missing_ok=True)
            profiler = await spawn(
                [_py_spy(), "record", "--pid", str(process.pid), "--rate", str(PROFILE_RATE_HZ),
                 "--duration", str(math.ceil(seconds)), "--format", "raw", "--full-filenames",
                 *PROFILE_OPTIONS,
                 "--output", str(profile_to)],
                env=dict(os.environ), log=profile_to.with_suffix(".log"),
            )  # fmt: skip
        result = await run_ingest(
            poster, mode=mode, clients=clients, duration_s=seconds, on_ack=acknowledged.add
        )
        postgres = sorted({*postgres, *await _postgres_pids(conninfo, whole_server)})
        after = cpu_sample([process.pid, me, *postgres])
        if profiler is not None and await profiler.wait() != 0:
            print(f"py-spy failed (it needs ptrace rights); see {profile_to.with_suffix('.log')}")
        stats = (await client.get("/bench/writer-stats")).json()
        metrics = (await client.get("/metrics")).text
    async with Database(conninfo, max_size=1) as db:
        missing = await missing_acknowledged(db, acknowledged)
    wall = after.at - before.at
    written = max(result.written, 1)
    server_cores = after.cores_since(before, [process.pid])
    postgres_cores = after.cores_since(before, postgres)
    client_cores = after.cores_since(before, [me])
    figures = ModeFigures(
        mode=mode,
        route=route,
        pool=pool,
        docs_per_s=result.docs_per_s,
        written=result.written,
        rejected=result.rejected,
        conflicts=result.conflicts,
        p50_s=percentile(result.latencies_s, 50),
        p99_s=percentile(result.latencies_s, 99),
        server_cpu_per_doc_s=server_cores * wall / written,
        postgres_cpu_per_doc_s=postgres_cores * wall / written,
        client_cpu_per_doc_s=client_cores * wall / written,
        server_cores=server_cores,
        postgres_cores=postgres_cores,
        client_cores=client_cores,
        machine_cores=after.busy_cores_since(before),
        missing_acknowledged=missing,
        statuses=dict(poster.statuses),
        loop=str(stats["server"]["loop"]),
    )
    stats["metrics_flushes"] = _metric_flushes(metrics)
    return figures, stats


def _metric_flushes(text: str) -> int | None:
    """Return pgbatch_flush_size_count{committer="writer"} from a /metrics text."""
    for line in text.splitlines():
        if line.startswith('pgbatch_flush_size_count{committer="writer"}'):
            return round(float(line.rsplit(" ", 1)[1]))
    return None


# -- the profile --------------------------------------------------------------------------


def summarise_profile(path: Path) -> dict[str, Any]:
    """Summarise a py-spy raw profile of the server.

    Return its samples, their shares by category (each sample counted once, for its
    innermost frame that has a category), by stage (samples with a frame of the stage
    anywhere in the stack) and its top functions by self time.
    """
    by_category: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_FRAME.match(frame) for frame in stack.split(";")]
        leaf = frames[-1]
        if leaf is not None:
            by_function[f"{leaf['function']} ({Path(leaf['file']).name})"] += count
        by_category[_category(frames)] += count
        functions = {frame["function"] for frame in frames if frame is not None}
        for stage, names in PROFILE_STAGES:
            if functions.intersection(names):
                by_stage[stage] += count

    def shares(counts: Counter[str], top: int | None = None) -> dict[str, float]:
        return {name: n / total for name, n in counts.most_common(top)} if total else {}

    return {
        "samples": total,
        "categories": shares(by_category),
        "stages": {stage: by_stage[stage] / total if total else 0.0 for stage, _ in PROFILE_STAGES},
        "top_functions": shares(by_function, PROFILE_TOP_FUNCTIONS),
    }


def _category(frames: list[re.Match[str] | None]) -> str:
    for frame in reversed(frames):
        if frame is None:
            continue
        for name, patterns in PROFILE_CATEGORIES:
            if any(p in frame["file"] for p in patterns):
                return name
    return "other (interpreter, stdlib)"


def print_profile(mode: str, summary: dict[str, Any], seconds: float) -> None:
    """Print a profile summary."""
    held = summary["samples"] / (seconds * PROFILE_RATE_HZ)
    print(
        f"\nprofile of the {mode} server: {summary['samples']} samples in {seconds:.0f} s "
        f"(a thread of it held the GIL {held:.0%} of the time)"
    )
    print("  by category (innermost frame):")
    for name, share in summary["categories"].items():
        print(f"  {share:6.1%}  {name}")
    print("  by stage (anywhere in the stack):")
    for name, share in summary["stages"].items():
        print(f"  {share:6.1%}  {name}")
    print("  top functions (self):")
    for name, share in summary["top_functions"].items():
        print(f"  {share:6.1%}  {name}")


# -- the run ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Round:
    """Both modes, one after the other: their figures and the writer's stats."""

    writer: ModeFigures
    baseline: ModeFigures
    writer_stats: dict[str, Any]

    @property
    def ratio(self) -> float:
        """Return the writer's docs/s over the baseline's."""
        return (
            self.writer.docs_per_s / self.baseline.docs_per_s if self.baseline.docs_per_s else 0.0
        )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _cpu(figures: ModeFigures) -> float:
    return figures.server_cpu_per_doc_s + figures.postgres_cpu_per_doc_s


async def run(
    conninfo_server: str,
    *,
    clients: int,
    seconds: float,
    rounds: int,
    options: RunOptions,
    whole_server: bool,
    profile: bool,
) -> dict[str, Any]:
    """Measure both modes in one database (and profile them if asked); return the figures."""
    async with bench_database(conninfo_server, "pgbatch_bench_ingest_http") as conninfo:
        info = await server_info(conninfo)
        for line in info.describe():
            print(line)
        print(
            f"{clients} HTTP/1.1 keep-alive clients ({options.client}) against uvicorn on {HOST}, "
            f"{seconds:.0f} s per mode, {rounds} round(s); loop={options.loop} "
            f"http={options.http} access log {'on' if options.access_log else 'off'}"
            + (f", server path {options.extra_path}" if options.extra_path else "")
            + "; CPU of PostgreSQL: "
            + ("the whole server" if whole_server else "this database's backends")
        )
        run_args: dict[str, Any] = {
            "clients": clients, "seconds": seconds, "options": options,
            "whole_server": whole_server,
        }  # fmt: skip
        measured: list[Round] = []
        for number in range(1, rounds + 1):
            writer, writer_stats = await run_mode(conninfo, "writer", **run_args)
            baseline, _ = await run_mode(conninfo, "baseline", **run_args)
            measured.append(Round(writer, baseline, writer_stats))
            stats = writer_stats.get("stats") or {}
            print(f"\nround {number}: ratio {measured[-1].ratio:.2f}x")
            print(writer.line())
            print(baseline.line())
            print(
                f"{'':<9} writer flushes: {stats.get('flushes', 0)} (/metrics says "
                f"{writer_stats.get('metrics_flushes')}), mean "
                f"{stats.get('items', 0) / max(stats.get('flushes', 0), 1):.1f} documents, "
                f"flush p50 {fmt_ms(stats.get('flush_p50_s', 0.0))}, "
                f"p99 {fmt_ms(stats.get('flush_p99_s', 0.0))}, retries {stats.get('retries')}, "
                f"max queue depth {stats.get('max_queue_depth')}"
            )
        profiles: dict[str, Any] = {}
        if profile:
            for mode in MODES:
                path = RESULTS_DIR / f"ingest_http_{mode}.pyspy.txt"
                figures, _ = await run_mode(conninfo, mode, profile_to=path, **run_args)
                print(f"\n(profiled) {figures.line()}")
                if not path.exists():
                    continue
                summary = summarise_profile(path)
                print_profile(mode, summary, seconds)
                profiles[mode] = {"figures": asdict(figures), "path": str(path), **summary}

    sizes: Counter[int] = Counter()
    for done in measured:
        stats = done.writer_stats.get("stats") or {}
        sizes.update({int(k): v for k, v in stats.get("flush_sizes", {}).items()})
    distribution = size_distribution(dict(sizes))
    flushes = sum(sizes.values())
    print(
        f"\nflush sizes (share of documents, {flushes} flushes, mean "
        f"{sum(k * v for k, v in sizes.items()) / max(flushes, 1):.1f}):  "
        + "  ".join(f"{r['sizes']}: {r['items_pct']:.0f}%" for r in distribution)
    )
    lost = sum(r.writer.missing_acknowledged + r.baseline.missing_acknowledged for r in measured)
    print(f"acknowledged (201) but not stored: {lost}")
    writers = [r.writer for r in measured]
    baselines = [r.baseline for r in measured]
    summary_rows = {}
    for mode, figures in (("writer", writers), ("baseline", baselines)):
        row = {
            "docs_per_s": _median([f.docs_per_s for f in figures]),
            "p50_s": _median([f.p50_s for f in figures]),
            "p99_s": _median([f.p99_s for f in figures]),
            "server_cpu_per_doc_s": _median([f.server_cpu_per_doc_s for f in figures]),
            "postgres_cpu_per_doc_s": _median([f.postgres_cpu_per_doc_s for f in figures]),
            "client_cpu_per_doc_s": _median([f.client_cpu_per_doc_s for f in figures]),
        }
        summary_rows[mode] = row
        if rounds > 1:
            print(
                f"median {mode:<9} {fmt_int(row['docs_per_s']):>7} docs/s   p50 "
                f"{fmt_ms(row['p50_s'])}   p99 {fmt_ms(row['p99_s'])}   CPU/doc: server "
                f"{row['server_cpu_per_doc_s'] * 1e6:.0f} us, PostgreSQL "
                f"{row['postgres_cpu_per_doc_s'] * 1e6:.0f} us"
            )
    ratios = [r.ratio for r in measured]
    ratio = _median(ratios)
    cpu_ratio = _median([_cpu(r.baseline) / _cpu(r.writer) for r in measured])
    print(
        f"\nratio writer / baseline through HTTP: {ratio:.2f}x"
        + (f" (median; rounds {', '.join(f'{x:.2f}' for x in ratios)})" if rounds > 1 else "")
        + f"   target >= {TARGET_RATIO:.0f}x: {verdict(ratio >= TARGET_RATIO)}"
    )
    print(f"server + PostgreSQL CPU per document, baseline / writer: {cpu_ratio:.2f}x")
    if lost:
        raise SystemExit(f"{lost} acknowledged documents are not stored")
    return {
        "server": asdict(info),
        "clients": clients,
        "seconds_per_mode": seconds,
        "rounds": [
            {
                "writer": asdict(r.writer),
                "baseline": asdict(r.baseline),
                "ratio": r.ratio,
                "writer_stats": r.writer_stats,
            }
            for r in measured
        ],
        "median": summary_rows,
        "options": asdict(options),
        "ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "target_ratio": TARGET_RATIO,
        "flush_size_distribution": distribution,
        "flush_sizes": dict(sorted(sizes.items())),
        "profiles": profiles,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with --serve, be its server)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=SECONDS_PER_MODE)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run writer then baseline this many times; the ratio is the median of the rounds'",
    )  # fmt: skip
    parser.add_argument("--database-url", default=None)
    parser.add_argument(
        "--private-server",
        action="store_true",
        help="start an embedded PostgreSQL of its own in a temporary folder, and stop it at "
        "the end; its CPU is then the whole server's, not only this database's backends",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="run each mode once more with py-spy on the server process, and summarise",
    )  # fmt: skip
    parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    parser.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"))
    parser.add_argument(
        "--server-path", default=None, metavar="DIR",
        help="prepend DIR to the server's PYTHONPATH (e.g. uvloop and httptools installed "
        "there with pip install --target)",
    )  # fmt: skip
    parser.add_argument(
        "--access-log", action="store_true",
        help="log every request, as `pgbatch serve` does (off by default)",
    )  # fmt: skip
    parser.add_argument(
        "--client", default="raw", choices=("raw", "httpx"),
        help="the clients' HTTP: this benchmark's own keep-alive connections (default) or "
        "httpx, one AsyncClient per client (costs the shared cores far more CPU)",
    )  # fmt: skip
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, loop=args.loop, http=args.http, access_log=args.access_log)
        return
    if args.profile:
        _py_spy()  # before any run: fail at once without it
    options = RunOptions(args.loop, args.http, args.access_log, args.server_path, args.client)
    with contextlib.ExitStack() as stack:
        if args.private_server:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-")))
            url = embedded_url(data_dir)
            stack.callback(stop_embedded, data_dir)
        else:
            url = server_url(args.database_url)
        require_local(url)
        figures = asyncio.run(
            run(
                url,
                clients=args.clients,
                seconds=args.seconds,
                rounds=args.rounds,
                options=options,
                whole_server=args.private_server,
                profile=args.profile,
            )
        )
    figures["private_server"] = args.private_server
    path = write_results("ingest_http", figures)
    print(f"\nfigures written to {path}")


if __name__ == "__main__":
    main()

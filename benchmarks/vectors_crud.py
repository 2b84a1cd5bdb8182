"""Vector libraries: CRUD under contention, pessimistic (row lock) vs optimistic (If-Match).

Run from the repository root (creating a library needs pgvector: the embedded server
has it, the shared PostgreSQL 15 does not):

    .venv/bin/python benchmarks/vectors_crud.py [--clients 32] [--seconds 5] [--rounds 3]

Every client is an asyncio task with a pooled connection of its own (the pool holds one
per client), all in this process. A transaction is one read-modify-write of a document's
metadata (a counter in it is incremented), on a document drawn at random from the first
`rows` documents of one library: `--rows 1000 16 1` are the low, medium and high
contention levels (many rows, few rows, one row). Modes:

- **optimistic**: the product's HTTP path, minus HTTP: `vectors.get_document` (what GET
  reads), then `vectors.update_document` with the version read (what PATCH with
  If-Match runs: `UPDATE ... WHERE version = $read`); a VersionMismatchError (HTTP 412)
  makes the client read again and retry, as a client of the API must.
- **pessimistic**: one transaction through `app.db.run_in_transaction` that reads the
  row `SELECT ... FOR UPDATE`, computes, and writes it with the same update query. The
  product has no such path over HTTP (a lock cannot span two requests, and PATCH needs
  If-Match by design): this client is written here, over the product's pool, retry loop
  and update query (docs/vectors.md says why it is not a feature).
- **http-optimistic**: the optimistic client over HTTP (`GET` for the ETag, `PATCH`
  with `If-Match`, `GET` again on 412), the API in this process through httpx's ASGI
  transport (no socket, no uvicorn): what the API layer adds per request.
- **raw-optimistic**, **raw-pessimistic**: the same statements (the workload's own SQL
  text) over plain psycopg connections, no pgbatch layer: the same-run baseline whose
  ratio is what the product's layers cost.

Cells are interleaved (every round runs every level and mode once, in a shuffled order)
and the figures are the medians over rounds. Each cell checks that no update was lost:
the counters must have grown by exactly the number of successes. Printed per cell:
transactions/s, the 412 rate (conflicts / PATCH attempts), retries per success, p50/p99
latency of a success (retries included), the cores used by this client process and by
the server's processes, WAL bytes per transaction; and the design's claimed figures
("2,000-5,000 TPS" pessimistic at low contention, "15,000+ TPS" optimistic with < 5 %
conflicts) beside ours. `--synchronous-commit off` shows whether the commit's WAL flush
is what bounds it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

import pgbatch
from benchmarks.harness import (
    bench_database,
    connect,
    cpu_sample,
    percentile,
    require_local,
    server_info,
    server_pids,
    server_url,
    write_results,
)
from pgbatch.api.server import create_api
from pgbatch.workloads import vectors
from pgbatch.workloads.vectors import queries as vq

# The tenant of an API without tokens, so that the HTTP mode reaches the same library.
TENANT = "default"
MODES = ("optimistic", "pessimistic", "raw-optimistic", "raw-pessimistic", "http-optimistic")
# The claims of the design the issue quotes, printed beside ours.
CLAIMED = {
    "pessimistic": "2,000-5,000 TPS at low contention",
    "optimistic": "15,000+ TPS with < 5 % conflicts",
}

# The pessimistic read: the document's row, locked, through its library's tenant (as
# every query of the workload joins it). Benchmark-only: the product has no such path.
LOCK_DOCUMENT = """
SELECT d.metadata, d.version
FROM pgbatch.vector_documents d
JOIN pgbatch.vector_libraries l ON l.id = d.library_id
WHERE d.id = %(id)s AND d.library_id = %(library_id)s AND l.tenant = %(tenant)s
FOR UPDATE OF d
"""
COUNTER_SUM = (
    "SELECT coalesce(sum((metadata->>'n')::bigint), 0) FROM pgbatch.vector_documents "
    "WHERE library_id = %s"
)


def _bumped(metadata: dict[str, Any]) -> dict[str, Any]:
    return {**metadata, "n": int(metadata.get("n", 0)) + 1}


@dataclass(slots=True)
class Tally:
    """What one cell's clients counted."""

    successes: int = 0
    attempts: int = 0  # update statements sent
    conflicts: int = 0  # of them stale (HTTP 412)
    latencies: list[float] = field(default_factory=list)


class Cell:
    """One level x mode: run the clients for a while and measure."""

    def __init__(
        self, app: pgbatch.App, conninfo: str, library_id: int, ids: Sequence[int]
    ) -> None:
        self.app = app
        self.conninfo = conninfo
        self.library_id = library_id
        self.ids = ids
        self.api = create_api(app)

    async def http_optimistic(self, client: httpx.AsyncClient, doc_id: int, tally: Tally) -> None:
        """GET, then PATCH with If-Match over HTTP; on 412 GET again and retry."""
        url = f"/v1/libraries/{self.library_id}/documents/{doc_id}"
        read = await client.get(url)
        while True:
            assert read.status_code == 200, read.text
            tally.attempts += 1
            patched = await client.patch(
                url,
                json={"metadata": _bumped(read.json()["metadata"])},
                headers={"If-Match": read.headers["ETag"]},
            )
            if patched.status_code == 200:
                return
            assert patched.status_code == 412, patched.text
            tally.conflicts += 1
            read = await client.get(url)

    async def optimistic(self, doc_id: int, tally: Tally) -> None:
        """GET, then PATCH with If-Match; on 412 GET again and retry."""
        doc = await vectors.get_document(self.app, self.library_id, doc_id, tenant=TENANT)
        while True:
            tally.attempts += 1
            try:
                await vectors.update_document(
                    self.app, self.library_id, doc_id, tenant=TENANT,
                    version=doc.version, metadata=_bumped(doc.metadata),
                )  # fmt: skip
                return
            except vectors.VersionMismatchError:
                tally.conflicts += 1
                doc = await vectors.get_document(self.app, self.library_id, doc_id, tenant=TENANT)

    async def pessimistic(self, doc_id: int, tally: Tally) -> None:
        """Lock the row, read, compute, write: one transaction, no conflict possible."""

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            cur = await conn.execute(
                LOCK_DOCUMENT, {"id": doc_id, "library_id": self.library_id, "tenant": TENANT}
            )
            row = await cur.fetchone()
            assert row is not None
            tally.attempts += 1
            updated = await vq.update_document(
                conn, TENANT, self.library_id, doc_id, version=row[1], metadata=_bumped(row[0])
            )
            assert updated is not None  # the lock held the version

        await self.app.db.run_in_transaction(work)

    async def raw_optimistic(
        self, conn: psycopg.AsyncConnection[Any], doc_id: int, tally: Tally
    ) -> None:
        """The optimistic client's statements on a plain autocommit connection."""
        params = {"id": doc_id, "library_id": self.library_id, "tenant": TENANT}
        while True:
            cur = await conn.execute(vq.query("vector_document_get"), params)
            row = await cur.fetchone()
            assert row is not None
            metadata, version = row[2], row[5]
            tally.attempts += 1
            cur = await conn.execute(
                vq.query("vector_document_update"),
                {**params, "version": version, "metadata": Jsonb(_bumped(metadata))},
            )
            if await cur.fetchone() is not None:
                return
            tally.conflicts += 1

    async def raw_pessimistic(
        self, conn: psycopg.AsyncConnection[Any], doc_id: int, tally: Tally
    ) -> None:
        """The pessimistic client's statements on a plain connection, one transaction."""
        params = {"id": doc_id, "library_id": self.library_id, "tenant": TENANT}
        async with conn.transaction():
            cur = await conn.execute(LOCK_DOCUMENT, params)
            row = await cur.fetchone()
            assert row is not None
            tally.attempts += 1
            cur = await conn.execute(
                vq.query("vector_document_update"),
                {**params, "version": row[1], "metadata": Jsonb(_bumped(row[0]))},
            )
            assert await cur.fetchone() is not None

    async def run(self, mode: str, rows: int, clients: int, seconds: float) -> dict[str, Any]:
        """Run `clients` clients of `mode` on the first `rows` documents for `seconds`."""
        working = list(self.ids[:rows])
        tally = Tally()
        raw: list[psycopg.AsyncConnection[Any]] = []
        if mode.startswith("raw-"):
            raw = [await connect(self.conninfo) for _ in range(clients)]
        before_sum = await self._counter_sum()
        retries_before = self.app.db.tx_retries
        pids = await server_pids(self.conninfo)
        me = os.getpid()
        wal_before = await self._wal_lsn()
        clients_http: list[httpx.AsyncClient] = []
        barrier = asyncio.Barrier(clients)
        deadline = 0.0

        async def client(index: int) -> None:
            nonlocal deadline
            rng = random.Random(index)
            conn = raw[index] if raw else None
            one: Callable[[int], Awaitable[None]]
            if mode == "optimistic":
                one = lambda d: self.optimistic(d, tally)  # noqa: E731
            elif mode == "pessimistic":
                one = lambda d: self.pessimistic(d, tally)  # noqa: E731
            elif mode == "http-optimistic":
                http = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=self.api), base_url="http://127.0.0.1"
                )
                clients_http.append(http)
                one = lambda d: self.http_optimistic(http, d, tally)  # noqa: E731
            elif mode == "raw-optimistic":
                assert conn is not None
                one = lambda d: self.raw_optimistic(conn, d, tally)  # noqa: E731
            else:
                assert conn is not None
                one = lambda d: self.raw_pessimistic(conn, d, tally)  # noqa: E731
            if await barrier.wait() == 0:
                deadline = time.perf_counter() + seconds
            await asyncio.sleep(0)
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await one(rng.choice(working))
                tally.latencies.append(time.perf_counter() - started)
                tally.successes += 1

        cpu_before = cpu_sample([me, *pids])
        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
        cpu_after = cpu_sample([me, *pids])
        wal_after = await self._wal_lsn()
        for conn in raw:
            await conn.close()
        for http in clients_http:
            await http.aclose()
        after_sum = await self._counter_sum()
        lost = tally.successes - (after_sum - before_sum)
        if lost:
            raise SystemExit(f"{mode} at {rows} rows lost {lost} updates: a guard is broken")
        return {
            "tps": tally.successes / elapsed,
            "conflict_rate": tally.conflicts / max(1, tally.attempts),
            "retries_per_success": tally.conflicts / max(1, tally.successes),
            "deadlock_retries": self.app.db.tx_retries - retries_before,
            "p50_ms": percentile(tally.latencies, 50) * 1000,
            "p99_ms": percentile(tally.latencies, 99) * 1000,
            "client_cores": cpu_after.cores_since(cpu_before, [me]),
            "server_cores": cpu_after.cores_since(cpu_before, pids),
            "machine_cores": cpu_after.busy_cores_since(cpu_before),
            "wal_bytes_per_tx": (wal_after - wal_before) / max(1, tally.successes),
            # CPU time per success: what a machine of our own would be bound by.
            "client_us_per_tx": cpu_after.cores_since(cpu_before, [me])
            * elapsed
            / max(1, tally.successes)
            * 1e6,
            "server_us_per_tx": cpu_after.cores_since(cpu_before, pids)
            * elapsed
            / max(1, tally.successes)
            * 1e6,
            "successes": tally.successes,
        }

    async def _counter_sum(self) -> int:
        async with await connect(self.conninfo) as conn:
            row = await (await conn.execute(COUNTER_SUM, (self.library_id,))).fetchone()
        return int(row[0]) if row else 0

    async def _wal_lsn(self) -> int:
        async with await connect(self.conninfo) as conn:
            row = await (
                await conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
            ).fetchone()
        return int(row[0]) if row else 0


def _uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    return "?"


async def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="per cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 16, 1])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--synchronous-commit", choices=("on", "off"), default=None,
        help="set for the benchmark's sessions (default: the server's setting)",
    )  # fmt: skip
    parser.add_argument("--database-url")
    args = parser.parse_args()
    url = server_url(args.database_url)
    require_local(url)
    print(f"load before: {_uptime()}", flush=True)
    async with bench_database(url, "pgbatch_bench_vectors_crud") as created:
        conninfo = created
        if args.synchronous_commit is not None:
            conninfo = make_conninfo(
                created, options=f"-c synchronous_commit={args.synchronous_commit}"
            )
        info = await server_info(conninfo)
        for line in info.describe():
            print(line)
        settings = pgbatch.Settings(database_url=conninfo, pool_max_size=args.clients + 2)
        app = pgbatch.App(settings=settings)
        app.use(vectors.WORKLOAD)
        async with app:
            library = await vectors.create_library(
                app, tenant=TENANT, name="crud", embedder="hash-16"
            )
            count = max(args.rows)
            docs, _ = await vectors.add_documents(
                app,
                library.id,
                [vectors.DocumentIn(text=f"d{n}", metadata={"n": 0}) for n in range(count)],
                tenant=TENANT,
            )
            # The pool opens connections lazily: a warm-up cell per mode fills it, so no
            # measured cell pays for connecting.
            cell = Cell(app, conninfo, library.id, [d.id for d in docs])
            for mode in args.modes:
                await cell.run(mode, max(args.rows), args.clients, 1.0)
            results: dict[tuple[int, str], list[dict[str, Any]]] = {}
            plan = [(rows, mode) for rows in args.rows for mode in args.modes]
            shuffle = random.Random(11)
            for round_no in range(args.rounds):
                shuffle.shuffle(plan)
                for rows, mode in plan:
                    figures = await cell.run(mode, rows, args.clients, args.seconds)
                    results.setdefault((rows, mode), []).append(figures)
                    print(
                        f"  round {round_no + 1} {mode:>15} rows {rows:>5}: "
                        f"{figures['tps']:8,.0f} tx/s, 412 {figures['conflict_rate']:6.1%}",
                        flush=True,
                    )
    print(f"load after: {_uptime()}")
    medians = {
        key: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        for key, runs in results.items()
    }
    print(
        f"\n{args.clients} clients, {args.seconds:g} s per cell, medians of {args.rounds} "
        f"interleaved rounds; latency of a success, retries included"
    )
    print(
        f"{'rows':>5} {'mode':>15} {'tx/s':>7} {'412':>6} {'retry':>6} {'p50 ms':>7} "
        f"{'p99 ms':>8} {'cores: client':>13} {'server':>6} {'machine':>7} "
        f"{'CPU us/tx: client':>17} {'server':>6} {'WAL B/tx':>8}"
    )
    for rows in args.rows:
        for mode in args.modes:
            m = medians[(rows, mode)]
            print(
                f"{rows:>5} {mode:>15} {m['tps']:>7,.0f} {m['conflict_rate']:>6.1%} "
                f"{m['retries_per_success']:>6.2f} {m['p50_ms']:>7.2f} {m['p99_ms']:>8.2f} "
                f"{m['client_cores']:>13.2f} {m['server_cores']:>6.2f} "
                f"{m['machine_cores']:>7.2f} {m['client_us_per_tx']:>17,.0f} "
                f"{m['server_us_per_tx']:>6,.0f} {m['wal_bytes_per_tx']:>8,.0f}"
            )
    low = max(args.rows)
    cores = os.cpu_count() or 1
    for mode in ("pessimistic", "optimistic"):
        if (low, mode) in medians:
            m = medians[(low, mode)]
            raw = medians.get((low, f"raw-{mode}"))
            ratio = f" ({m['tps'] / raw['tps']:.2f}x raw psycopg)" if raw else ""
            http = medians.get((low, f"http-{mode}"))
            if http:
                ratio += f", over HTTP {http['tps']:,.0f} tx/s"

            # If the machine were ours alone: its cores over the CPU one transaction costs.
            ceiling = cores * 1e6 / max(1.0, m["client_us_per_tx"] + m["server_us_per_tx"])
            print(
                f"{mode} at {low} rows: ours {m['tps']:,.0f} tx/s{ratio}, 412 rate "
                f"{m['conflict_rate']:.1%}; CPU ceiling on {cores} idle cores ~{ceiling:,.0f} "
                f"tx/s; claimed {CLAIMED[mode]}"
            )
    path = write_results(
        "vectors_crud",
        {
            "server": info.describe(),
            "args": vars(args),
            "medians": {f"{rows}/{mode}": m for (rows, mode), m in medians.items()},
            "rounds": {f"{rows}/{mode}": r for (rows, mode), r in results.items()},
        },
    )
    print(f"figures: {path}")


if __name__ == "__main__":
    asyncio.run(main())

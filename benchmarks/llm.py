"""LLM batches against the fake upstream's RPM/TPM limits: the shared limit vs each worker alone.

Two runs in one process, on one fake and fresh databases, with the same worker processes
and requests: (1) the shared limit in PostgreSQL (`PGBATCH_LLM_RPM`/`_TPM` set to the
fake's), (2) the baseline: no shared limit, each worker pausing only itself on its own
429s. For each: requests/s admitted by the fake over the steady part of the run against
the limit, and the 429 count and share. The window is shortened (`--window-s`, both the
fake's and the limit's) so a run of tens of seconds spends several windows' budgets.

    .venv/bin/python -m benchmarks.llm --workers 3 --duration-s 30
    .venv/bin/python -m benchmarks.llm --mode throughput   # no limit: vs a direct client
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    WorkerProcesses,
    bench_database,
    require_local,
    server_url,
    write_results,
)
from pgbatch.app import App
from pgbatch.config import Settings
from pgbatch.workloads import llm
from pgbatch.workloads.llm import fake_upstream
from pgbatch.workloads.llm.fake_upstream import FakeLimits, FakeUpstream, serving
from pgbatch.workloads.llm.requests import check_request_lines
from pgbatch.workloads.llm.upstream import UpstreamClient, UpstreamConfig

APP = "pgbatch.demo.llm_openai_app:app"


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one run achieved against the fake's limit."""

    label: str
    admitted_per_s: float
    limit_per_s: float
    tokens_per_s: float
    token_limit_per_s: float
    rejected: int
    sent: int

    @property
    def share_429(self) -> float:
        """Return the share of requests the fake refused."""
        return self.rejected / self.sent if self.sent else 0.0


def _requests(n: int, label: str, max_tokens: int = 40) -> list[bytes]:
    return [
        orjson.dumps({"custom_id": f"{label}{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "m", "max_tokens": max_tokens,
                               "messages": [{"role": "user", "content": f"{label} {i} " * 8}]}})
        for i in range(n)
    ]  # fmt: skip


async def _run(args: argparse.Namespace, url: str, *, shared: bool) -> RunResult:
    label = "shared" if shared else "alone"
    per_window = args.rpm * args.window_s / 60
    tokens_per_window = args.tpm * args.window_s / 60
    fake_upstream.WINDOW_S = args.window_s
    fake = FakeUpstream(
        FakeLimits(rpm=int(per_window), tpm=int(tokens_per_window), latency_ms=args.latency_ms)
    )
    async with serving(fake) as base_url, bench_database(url, f"bench_llm_{label}") as conninfo:
        env = {"PGBATCH_LLM_BASE_URL": base_url, "PGBATCH_LLM_WINDOW_S": str(args.window_s),
               "PGBATCH_LLM_MAX_ATTEMPTS": "3"}  # fmt: skip
        if shared:
            env |= {"PGBATCH_LLM_RPM": str(int(per_window)),
                    "PGBATCH_LLM_TPM": str(int(tokens_per_window))}  # fmt: skip
        for name in ("PGBATCH_LLM_RPM", "PGBATCH_LLM_TPM"):
            os.environ.pop(name, None)
        os.environ.update(env)
        app = App(settings=Settings(database_url=conninfo))
        app.use(llm.WORKLOAD)
        await app.open()
        try:
            # More than the limit lets through in the run: the queue never runs dry.
            total = int(args.rpm / 60 * args.duration_s * 1.5) + 50
            lines = _requests(total, label, args.max_tokens)
            requests = check_request_lines(lines, "/v1/chat/completions")
            async with WorkerProcesses(
                conninfo, app=APP, count=args.workers, concurrency=args.concurrency, label=label
            ):
                started = time.monotonic()
                await llm.submit_requests(app, requests, shard_size=args.shard_size)
                await asyncio.sleep(args.duration_s)
                ended = time.monotonic()
        finally:
            await app.close()
    # The first window is a burst of the whole budget (the limit starts empty): measure
    # from its end to the end of the run.
    steady_from = started + args.window_s
    admitted = [s for s in fake.served if s.status != 429 and steady_from <= s.at <= ended]
    span = max(ended - steady_from, 1e-9)
    sent = [s for s in fake.served if s.at <= ended]
    return RunResult(
        label,
        len(admitted) / span,
        per_window / args.window_s,
        sum(s.tokens for s in admitted) / span,
        tokens_per_window / args.window_s,
        sum(1 for s in sent if s.status == 429),
        len(sent),
    )


async def _throughput(args: argparse.Namespace, url: str) -> None:
    """No limit: requests/s through pgbatch vs one asyncio client at the same concurrency."""
    in_flight = args.concurrency * args.shard_size
    fake_upstream.WINDOW_S = 60.0
    fake = FakeUpstream(FakeLimits(latency_ms=args.latency_ms))
    async with serving(fake) as base_url:
        lines = _requests(args.requests, "direct")
        client = UpstreamClient(UpstreamConfig(base_url=base_url, max_concurrency=in_flight))
        try:
            started = time.monotonic()
            bodies = [orjson.loads(line) for line in lines]
            replies = await asyncio.gather(*(client.send(b["url"], b["body"]) for b in bodies))
            direct_s = time.monotonic() - started
        finally:
            await client.aclose()
        assert all(r.ok for r in replies)
        async with bench_database(url, "bench_llm_tp") as conninfo:
            os.environ.update({"PGBATCH_LLM_BASE_URL": base_url,
                               "PGBATCH_LLM_MAX_CONCURRENCY": str(in_flight)})  # fmt: skip
            for name in ("PGBATCH_LLM_RPM", "PGBATCH_LLM_TPM"):
                os.environ.pop(name, None)
            app = App(settings=Settings(database_url=conninfo))
            app.use(llm.WORKLOAD)
            await app.open()
            try:
                requests = list(check_request_lines(_requests(args.requests, "pg"),
                                                    "/v1/chat/completions"))  # fmt: skip
                async with WorkerProcesses(conninfo, app=APP, count=1,
                                           concurrency=args.concurrency, label="tp"):  # fmt: skip
                    started = time.monotonic()
                    batch = await llm.submit_requests(app, requests, shard_size=args.shard_size)
                    done = await app.wait(batch.id, timeout_s=600)
                    pgbatch_s = time.monotonic() - started
            finally:
                await app.close()
        assert done.items_ok == args.requests
    direct_rate, pg_rate = args.requests / direct_s, args.requests / pgbatch_s
    print(f"no limit, {args.latency_ms:g} ms latency, {in_flight} requests in flight, "
          f"{args.requests} requests")  # fmt: skip
    print(f"  direct asyncio client: {direct_rate:8.1f} req/s")
    print(f"  pgbatch (1 worker, submit to done): {pg_rate:8.1f} req/s")
    print(f"  ratio pgbatch / direct: {pg_rate / direct_rate:.2f}")
    write_results("llm_throughput", {"args": vars(args), "direct_rps": direct_rate,
                                      "pgbatch_rps": pg_rate})  # fmt: skip


async def _server_cost(conn: psycopg.AsyncConnection[Any]) -> tuple[float, int]:
    """Return the server's CPU seconds so far (its postmaster and every child) and WAL LSN.

    CPU of backends that exited before the reading is not in it: read with the run's
    connections open. The WAL position is the cluster's: keep other work off the server.
    """
    row = await (
        await conn.execute("SELECT pg_backend_pid(), pg_current_wal_lsn() - '0/0'::pg_lsn")
    ).fetchone()
    assert row is not None
    postmaster = psutil.Process(int(row[0])).parent()
    assert postmaster is not None
    cpu = 0.0
    for process in [postmaster, *postmaster.children()]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue  # exited meanwhile
        cpu += times.user + times.system
    return cpu, int(row[1])


async def _cost(args: argparse.Namespace, url: str) -> None:
    """(c) The database's cost per request: server CPU and WAL bytes, vs a raw COPY.

    The baseline stores the same output lines (pgbatch's results of this run) with one
    COPY into a plain table of (id, line jsonb) in the same database: the least any
    durable store of the answers writes.
    """
    fake_upstream.WINDOW_S = 60.0
    fake = FakeUpstream(FakeLimits(latency_ms=args.latency_ms))
    async with serving(fake) as base_url, bench_database(url, "bench_llm_cost") as conninfo:
        os.environ.update({"PGBATCH_LLM_BASE_URL": base_url})
        for name in ("PGBATCH_LLM_RPM", "PGBATCH_LLM_TPM"):
            os.environ.pop(name, None)
        app = App(settings=Settings(database_url=conninfo))
        app.use(llm.WORKLOAD)
        await app.open()
        try:
            requests = list(
                check_request_lines(_requests(args.requests, "cost"), "/v1/chat/completions")
            )
            async with (
                WorkerProcesses(
                    conninfo, app=APP, count=1, concurrency=args.concurrency, label="cost"
                ),  # fmt: skip
                await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as probe,
            ):
                await asyncio.sleep(2)  # the worker's pool is open before the first reading
                cpu0, wal0 = await _server_cost(probe)
                batch = await llm.submit_requests(app, requests, shard_size=args.shard_size)
                done = await app.wait(batch.id, timeout_s=600)
                cpu1, wal1 = await _server_cost(probe)
                lines = [line async for line in llm.output_lines(app, batch.id)]
                await probe.execute("CREATE TABLE raw_answers (id bigint, line jsonb)")
                cpu2, wal2 = await _server_cost(probe)
                async with probe.cursor().copy("COPY raw_answers (id, line) FROM STDIN") as copy:
                    for n, line in enumerate(lines):
                        await copy.write_row((n, orjson.dumps(line).decode()))
                cpu3, wal3 = await _server_cost(probe)
                size = await (
                    await probe.execute("SELECT avg(octet_length(line::text)) FROM raw_answers")
                ).fetchone()
        finally:
            await app.close()
    assert done.items_ok == args.requests
    n = args.requests
    pg_cpu_us, raw_cpu_us = (cpu1 - cpu0) / n * 1e6, (cpu3 - cpu2) / n * 1e6
    pg_wal, raw_wal = (wal1 - wal0) / n, (wal3 - wal2) / n
    answer = float(size[0]) if size and size[0] is not None else 0.0
    print(f"{n} requests, answers of {answer:.0f} bytes (the output line as JSON)")
    print(f"  pgbatch: server CPU {pg_cpu_us:8.1f} us/request, WAL {pg_wal:8.0f} B/request")
    print(f"  raw COPY of the same lines: CPU {raw_cpu_us:8.1f} us/request, "
          f"WAL {raw_wal:8.0f} B/request")  # fmt: skip
    print(f"  ratio pgbatch / raw COPY: CPU {pg_cpu_us / max(raw_cpu_us, 1e-9):.1f}x, "
          f"WAL {pg_wal / max(raw_wal, 1e-9):.1f}x")  # fmt: skip
    write_results("llm_cost", {"args": vars(args), "answer_bytes": answer,
                               "pgbatch_cpu_us": pg_cpu_us, "pgbatch_wal_bytes": pg_wal,
                               "raw_cpu_us": raw_cpu_us, "raw_wal_bytes": raw_wal})  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    """Run the shared-limit run and the baseline, print and store the comparison."""
    url = server_url(args.database_url)
    require_local(url)
    if args.mode == "throughput":
        await _throughput(args, url)
        return
    if args.mode == "cost":
        await _cost(args, url)
        return
    results = [await _run(args, url, shared=True), await _run(args, url, shared=False)]
    print(f"{args.workers} workers x {args.concurrency} slots, limit {args.rpm} rpm / "
          f"{args.tpm} tpm, window {args.window_s:g} s, {args.duration_s:g} s per run")  # fmt: skip
    for r in results:
        print(
            f"  {r.label:>6}: {r.admitted_per_s:6.2f} req/s admitted "
            f"({r.admitted_per_s / r.limit_per_s:5.1%} of {r.limit_per_s:.2f}), "
            f"{r.tokens_per_s:8.1f} tok/s ({r.tokens_per_s / r.token_limit_per_s:5.1%}), "
            f"429s {r.rejected} of {r.sent} sent ({r.share_429:.1%})"
        )
    shared, alone = results
    ratio = shared.rejected / alone.rejected if alone.rejected else 0.0
    print(f"  429s shared / alone: {ratio:.3f}")
    runs = [dataclasses.asdict(r) | {"share_429": r.share_429} for r in results]
    data: dict[str, Any] = {"args": vars(args), "runs": runs}
    print(f"  results: {write_results('llm', data)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=60_000)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--shard-size", type=int, default=10)
    # The answer cap of each request: with 40 (about 68 tokens a request) requests/min binds
    # first; about 150 makes 1,200 rpm and 200k tpm bind together.
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--mode", choices=("limits", "throughput", "cost"), default="limits")
    parser.add_argument("--requests", type=int, default=3000, help="throughput and cost modes")
    return parser


if __name__ == "__main__":
    asyncio.run(main(_parser().parse_args()))

"""`pgbatch demo --llm`: an OpenAI-format request file through the fake upstream's limits.

Worker processes share the fake's rate limit through PostgreSQL; the live bar shows the
batch, and the table after it what the fake saw (429s) and what the batch used. Limits
are per a 10 s window (the fake's and the limit's alike) so the demo takes seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import orjson
from rich.console import Console
from rich.table import Table

from pgbatch.app import App
from pgbatch.progress import watch_batch
from pgbatch.workloads import llm
from pgbatch.workloads.llm import fake_upstream
from pgbatch.workloads.llm.config import LlmConfig
from pgbatch.workloads.llm.fake_upstream import FakeLimits, FakeUpstream, serving
from pgbatch.workloads.llm.requests import check_request_lines
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.status import batch_usage_report, limit_states
from pgbatch.workloads.llm.usage import parse_prices

__all__ = ["run_llm_demo"]

APP = "pgbatch.demo.llm_openai_app:app"
# The demo's window: long enough to show the limit holding, short enough to wait for.
DEMO_WINDOW_S = 10.0
WORKER_STOP_WAIT_S = 30.0


def request_lines(count: int) -> list[bytes]:
    """Return `count` chat requests in the OpenAI batch format (one JSON line each)."""
    return [
        orjson.dumps({"custom_id": f"request-{i}", "method": "POST",
                      "url": "/v1/chat/completions",
                      "body": {"model": "gpt-4o-mini", "max_tokens": 32,
                               "messages": [{"role": "user",
                                             "content": f"Summarise document {i} in a line."}]}})
        for i in range(count)
    ]  # fmt: skip


async def run_llm_demo(
    *, requests: int, workers: int, rpm: int, tpm: int, console: Console
) -> bool:
    """Run `requests` through `workers` processes under an rpm/tpm limit; True if healthy."""
    per_window = max(1, int(rpm * DEMO_WINDOW_S / 60))
    tokens_per_window = max(1, int(tpm * DEMO_WINDOW_S / 60))
    fake_upstream.WINDOW_S = DEMO_WINDOW_S
    fake = FakeUpstream(FakeLimits(rpm=per_window, tpm=tokens_per_window, latency_ms=20))
    prices = {"gpt-4o-mini": {"input": 0.15, "output": 0.60}}
    async with serving(fake) as base_url:
        app = App()
        app.use(llm.WORKLOAD)
        await app.open()
        env = {
            **os.environ, "DATABASE_URL": app.db.url, "PGBATCH_LLM_BASE_URL": base_url,
            "PGBATCH_LLM_RPM": str(per_window), "PGBATCH_LLM_TPM": str(tokens_per_window),
            "PGBATCH_LLM_WINDOW_S": str(DEMO_WINDOW_S),
        }  # fmt: skip
        command = [sys.executable, "-m", "pgbatch", "worker", "--app", APP]
        processes = [
            subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(workers)
        ]
        try:
            console.print(
                f"[bold]pgbatch demo --llm[/]: {requests} requests, {workers} workers, the "
                f"fake upstream allows {rpm} requests/min and {tpm} tokens/min "
                f"(counted per {DEMO_WINDOW_S:g} s)"
            )
            started = time.monotonic()
            checked = check_request_lines(request_lines(requests), "/v1/chat/completions")
            batch = await llm.submit_requests(app, checked, shard_size=10)
            final = await watch_batch(app, batch.id, console=console)
            elapsed = time.monotonic() - started
            # This process sends nothing: its runner only prices the report.
            runner_of(app).configure(LlmConfig({}, parse_prices(prices)))
            report = await batch_usage_report(app, batch.id)
            limits = await limit_states(app)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(WORKER_STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
            with contextlib.suppress(Exception):
                await app.close()
    busiest, _ = fake.max_in_window(DEMO_WINDOW_S)
    table = Table(title=f"batch {batch.id}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("status", str(final.status)),
        ("requests ok / failed", f"{final.items_ok} / {final.items_failed}"),
        ("sent to the upstream", str(len(fake.served))),
        ("answered 429", str(fake.rejected())),
        ("pauses of the shared key", str(sum(s.pauses for s in limits))),
        # The limit holds per window: a rate per minute over a short run would exceed the
        # rpm figure without any window having gone over.
        ("most requests", f"{busiest:,} in the busiest {DEMO_WINDOW_S:g} s (limit {per_window})"),
        ("rate overall", f"{final.items_ok / elapsed * 60:,.0f} requests/min"),
        ("prompt / completion tokens",
         f"{report.total.prompt_tokens:,} / {report.total.completion_tokens:,}"),
        ("estimated cost", f"${report.cost_usd or 0:.6f}"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    return final.items_ok == requests and fake.rejected() * 100 < max(1, len(fake.served))

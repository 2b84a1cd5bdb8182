"""An App running OpenAI-format LLM batches: `pgbatch worker --app pgbatch.demo.llm_openai_app:app`.

The upstream, its limits and prices come from PGBATCH_LLM_* / PGBATCH_LLM_CONFIG
(docs/llm.md): the same module serves the demo, the chaos test and benchmarks/llm.py.
"""

from __future__ import annotations

from pgbatch.app import App
from pgbatch.workloads import llm

__all__ = ["app"]

app = App()
app.use(llm.WORKLOAD)

"""The LLM-batch example is the demo's app, shipped in the package: pgbatch/demo/llm_app.py.

`pgbatch worker --app examples.llm_batch:app` keeps working from a checkout; from an
installed pgbatch, use `--app pgbatch.demo.llm_app:app`.
"""

from pgbatch.demo.llm_app import app, prompts, summarize, verify

__all__ = ["app", "prompts", "summarize", "verify"]

"""LLM batches in the OpenAI batch format: request files, usage and cost, a fake upstream."""

"""The LLM workload's queries on its own tables (the OpenAI Batch API's files and batches)."""

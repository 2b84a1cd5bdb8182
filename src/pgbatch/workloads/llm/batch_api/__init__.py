"""The OpenAI Batch API, self-hosted: Files and Batches under /openai/v1 (issue 10, point 2).

`service.py` holds what the routes do (storing files, validating them as OpenAI does,
deriving OpenAI's batch object from a pgbatch batch); `routes.py` is the HTTP face.
"""

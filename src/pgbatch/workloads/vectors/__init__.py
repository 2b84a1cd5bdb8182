"""The vector-library workload: libraries of documents, chunked, embedded and searched.

`app.use(WORKLOAD)` registers the indexing task, creates the tables
(`pgbatch.vector_libraries`, `pgbatch.vector_documents`) with the workload's migrations
when the app opens, and mounts `/v1/libraries` when the app is served. Each library's
chunks live in a table of its own, made with pgvector when the library is created (a
server without pgvector applies the migrations, and refuses library creation with
ExtensionMissingError). `libraries.py` explains versions and the fenced indexing commit;
`embedders.py` the embedders.
"""

from __future__ import annotations

from typing import Any

from pgbatch.workload import Workload
from pgbatch.workloads.vectors.embedders import (
    DEFAULT_EMBEDDER,
    EmbedderError,
    EmbedderRegistry,
    HashEmbedder,
    OpenAIEmbedder,
    TextEmbedder,
)
from pgbatch.workloads.vectors.libraries import (
    SETTLE_CALLBACK,
    TASK,
    DocumentIn,
    DocumentNotFoundError,
    ExtensionMissingError,
    ImportLineError,
    LibraryExistsError,
    LibraryNotFoundError,
    SearchHit,
    VersionMismatchError,
    add_documents,
    chunk_text,
    create_library,
    delete_document,
    delete_library,
    embedders,
    get_document,
    get_library,
    import_documents,
    list_chunks,
    list_documents,
    list_libraries,
    register_tasks,
    reindex_documents,
    search,
    settle_batch,
    settle_pruned,
    status_counts,
    update_document,
    update_library,
)
from pgbatch.workloads.vectors.limits import (
    SearchBusyError,
    SearchLimits,
    SearchTimeoutError,
    search_limits,
    set_search_limits,
)
from pgbatch.workloads.vectors.queries import COMPONENT_NAME, MIGRATIONS_PACKAGE

__all__ = [
    "DEFAULT_EMBEDDER",
    "SETTLE_CALLBACK",
    "TASK",
    "WORKLOAD",
    "DocumentIn",
    "DocumentNotFoundError",
    "EmbedderError",
    "EmbedderRegistry",
    "ExtensionMissingError",
    "HashEmbedder",
    "ImportLineError",
    "LibraryExistsError",
    "LibraryNotFoundError",
    "OpenAIEmbedder",
    "SearchBusyError",
    "SearchHit",
    "SearchLimits",
    "SearchTimeoutError",
    "TextEmbedder",
    "VersionMismatchError",
    "add_documents",
    "chunk_text",
    "create_library",
    "delete_document",
    "delete_library",
    "embedders",
    "get_document",
    "get_library",
    "import_documents",
    "list_chunks",
    "list_documents",
    "list_libraries",
    "reindex_documents",
    "search",
    "search_limits",
    "set_search_limits",
    "settle_batch",
    "status_counts",
    "update_document",
    "update_library",
]


def _router() -> Any:
    from pgbatch.workloads.vectors.routes import router

    return router


WORKLOAD = Workload(
    name=COMPONENT_NAME,
    install=register_tasks,
    migrations_package=MIGRATIONS_PACKAGE,
    router=_router,
    # A pruned indexing batch leaves no document of its own pending or indexing.
    prune_rows=settle_pruned,
)

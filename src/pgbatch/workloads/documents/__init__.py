"""The document-ingest workload: documents keyed by identity, posted with their references.

`app.use(WORKLOAD)` creates its tables and write functions (`pgbatch.documents`,
`pgbatch.document_references`) with the workload's migrations when the app opens, and
mounts `/v1/documents` when the app is served. `writer.py` explains keys and references;
the group-commit writer it runs on is pgbatch's own (`pgbatch.writer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pgbatch.workload import Workload
from pgbatch.workloads.documents.queries import COMPONENT
from pgbatch.workloads.documents.writer import (
    DEFAULT_PARTITION,
    DOCUMENT_NAMESPACE,
    DocumentRow,
    DocumentSink,
    DocumentWriter,
    Identity,
    StoredDocument,
    create_document_tables,
    document_item,
    document_key,
    get_document,
)

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = [
    "DEFAULT_PARTITION",
    "DOCUMENT_NAMESPACE",
    "WORKLOAD",
    "DocumentRow",
    "DocumentSink",
    "DocumentWriter",
    "Identity",
    "StoredDocument",
    "create_document_tables",
    "document_item",
    "document_key",
    "get_document",
]


def _install(app: App) -> None:
    """Nothing to register: documents are written by the API's writer, not by tasks."""


def _router() -> Any:
    from pgbatch.workloads.documents.routes import router

    return router


WORKLOAD = Workload(
    name=COMPONENT.name,
    install=_install,
    migrations_package=COMPONENT.package,
    router=_router,
)

"""The group-commit writer: concurrent single-item writes committed together.

`Writer` is generic over a `Sink` (the tables it writes); `DocumentWriter` is the writer
of the document-ingest workload. See docs/writer.md.
"""

from pgbatch.writer.documents import (
    DocumentSink,
    DocumentWriter,
    create_document_tables,
    document_item,
    document_key,
)
from pgbatch.writer.errors import InvalidDocumentError, WriteFailedError, WriterClosedError
from pgbatch.writer.models import WriteItem, WriteOutcome, WriterStats, WriteStatus
from pgbatch.writer.sink import Sink
from pgbatch.writer.writer import Writer

__all__ = [
    "DocumentSink",
    "DocumentWriter",
    "InvalidDocumentError",
    "Sink",
    "WriteFailedError",
    "WriteItem",
    "WriteOutcome",
    "WriteStatus",
    "Writer",
    "WriterClosedError",
    "WriterStats",
    "create_document_tables",
    "document_item",
    "document_key",
]

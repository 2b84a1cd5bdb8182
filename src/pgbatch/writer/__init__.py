"""The group-commit writer: concurrent single-item writes committed together.

`Writer` is generic over a `Sink` (the tables it writes); the document-ingest workload
(`pgbatch.workloads.documents`) is one user of it. See docs/writer.md.
"""

from pgbatch.writer.errors import InvalidDocumentError, WriteFailedError, WriterClosedError
from pgbatch.writer.models import WriteItem, WriteOutcome, WriterStats, WriteStatus
from pgbatch.writer.sink import Sink
from pgbatch.writer.writer import Writer

__all__ = [
    "InvalidDocumentError",
    "Sink",
    "WriteFailedError",
    "WriteItem",
    "WriteOutcome",
    "WriteStatus",
    "Writer",
    "WriterClosedError",
    "WriterStats",
]

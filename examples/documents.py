"""The document-ingest workload: many clients post single documents that reference each other.

Each client posts one document at a time and waits for its outcome, the way an API
server handles one request per document. Documents live in school partitions: each
client has a teacher, then posts students and courses that reference the teacher and
enrollments that reference an acknowledged student and course of its school; now and
then it posts a student again (an update). Every reference points at an acknowledged
document, so every post should be written.

    .venv/bin/python -m examples.documents [--mode writer|baseline] [--clients 64]
        [--seconds 10] [--database-url URL] [--print-acks]

`--mode baseline` commits each document in its own transaction, statement by statement
(BEGIN, existence query, upsert, references, COMMIT); `--print-acks` prints "ack <key>"
on stdout the moment a post is acknowledged (the crash test reads it). The figures go
to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pgbatch.config import Settings
from pgbatch.db.database import Database, resolve_url
from pgbatch.workloads.documents import (
    DocumentRow,
    DocumentSink,
    DocumentWriter,
    create_document_tables,
    document_item,
)
from pgbatch.writer import WriteItem, WriteOutcome, WriterStats, WriteStatus
from pgbatch.writer.flush import FlushCounters, FlushPath, write_flush

__all__ = ["IngestResult", "Post", "Workload", "baseline_poster", "main", "run_ingest"]

DocumentItem = WriteItem[uuid.UUID, DocumentRow]
Poster = Callable[[DocumentItem], Awaitable[WriteOutcome[uuid.UUID]]]

# Partitions of the workload: 64 clients share 16 schools, four clients per school.
SCHOOLS = 16
# Enrollments reference one of this many latest acknowledged students (and courses).
RECENT_PER_SCHOOL = 256
# One post in this many re-posts an existing student: the upsert path.
UPDATE_EVERY = 20


@dataclass(frozen=True, slots=True)
class Post:
    """One document a client posts: the writer's item, its identity and its kind."""

    item: DocumentItem
    identity: dict[str, str]
    kind: str
    update: bool = False  # a re-post of a document acknowledged before


@dataclass(slots=True)
class _School:
    students: list[dict[str, str]] = field(default_factory=list)
    courses: list[dict[str, str]] = field(default_factory=list)


class Workload:
    """Generate each client's next document; remember what was acknowledged."""

    def __init__(self, *, seed: int = 0, schools: int = SCHOOLS) -> None:
        self._random = random.Random(seed)
        self._schools = [_School() for _ in range(schools)]
        self._counts: dict[int, int] = {}

    def school_of(self, client: int) -> int:
        """Return the school (partition) a client posts into."""
        return client % len(self._schools)

    def next_document(self, client: int) -> Post:
        """Return the client's next document."""
        n = self._counts.get(client, 0)
        self._counts[client] = n + 1
        school_no = self.school_of(client)
        school = self._schools[school_no]
        partition = f"school-{school_no}"
        teacher = {"type": "teacher", "id": f"T-{client}"}
        body: dict[str, Any] = {"client": client, "n": n, "note": "x" * 64}

        def post(
            identity: dict[str, str], *references: dict[str, str], update: bool = False
        ) -> Post:
            item = document_item(identity, body, references=references, partition=partition)
            return Post(item, identity, identity["type"], update)

        if n == 0:
            return post(teacher)
        if school.students and n % UPDATE_EVERY == 0:
            student = self._random.choice(school.students[-RECENT_PER_SCHOOL:])
            return post(student, teacher, update=True)
        pick = self._random.random()
        if not school.students or not school.courses or pick < 0.3:
            kind = "student" if pick < 0.15 or not school.students else "course"
            return post({"type": kind, "id": f"{kind[0].upper()}-{client}-{n}"}, teacher)
        student = self._random.choice(school.students[-RECENT_PER_SCHOOL:])
        course = self._random.choice(school.courses[-RECENT_PER_SCHOOL:])
        body["grade"] = self._random.randint(1, 6)
        return post({"type": "enrollment", "id": f"E-{client}-{n}"}, student, course)

    def acknowledged(self, client: int, post: Post) -> None:
        """Let later documents reference this acknowledged one."""
        school = self._schools[self.school_of(client)]
        if post.kind == "student" and not post.update:
            school.students.append(post.identity)
        elif post.kind == "course":
            school.courses.append(post.identity)


@dataclass(slots=True)
class IngestResult:
    """What one bounded run measured."""

    mode: str
    clients: int
    seconds: float
    written: int = 0
    rejected: int = 0
    conflicts: int = 0
    latencies_s: list[float] = field(default_factory=list)
    stats: WriterStats | None = None

    @property
    def docs_per_s(self) -> float:
        """Return acknowledged (written) documents per second."""
        return self.written / self.seconds if self.seconds else 0.0


def baseline_poster(db: Database, path: FlushPath = FlushPath.STATEMENT_BY_STATEMENT) -> Poster:
    """Return a poster that commits each document in its own transaction (no group commit).

    It runs the writer's own flush with one item, the same retries, one transaction per
    document. By default statement by statement (BEGIN, existence query, upsert,
    references, COMMIT), as a request handler writes one document; with
    `FlushPath.ONE_STATEMENT`, the writer's single statement in an implicit transaction.
    """
    sink = DocumentSink()
    counters = FlushCounters()

    async def post(item: DocumentItem) -> WriteOutcome[uuid.UUID]:
        return (await write_flush(db, sink, [item], counters, path=path))[0]

    return post


async def run_ingest(
    post: Poster,
    *,
    mode: str,
    clients: int,
    duration_s: float,
    on_ack: Callable[[uuid.UUID], None] | None = None,
    seed: int = 0,
) -> IngestResult:
    """Run `clients` concurrent posting loops for `duration_s`; return what was acknowledged."""
    workload = Workload(seed=seed)
    result = IngestResult(mode=mode, clients=clients, seconds=duration_s)
    started = time.perf_counter()
    deadline = started + duration_s

    async def client(number: int) -> None:
        while time.perf_counter() < deadline:
            posted = workload.next_document(number)
            sent = time.perf_counter()
            outcome = await post(posted.item)
            result.latencies_s.append(time.perf_counter() - sent)
            if outcome.status is WriteStatus.WRITTEN:
                result.written += 1
                workload.acknowledged(number, posted)
                if on_ack is not None:
                    on_ack(posted.item.key)
            elif outcome.status is WriteStatus.REJECTED:
                result.rejected += 1
            else:
                result.conflicts += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def _print_ack(key: uuid.UUID) -> None:
    sys.stdout.write(f"ack {key}\n")
    sys.stdout.flush()


async def main(argv: list[str] | None = None) -> IngestResult:
    """Run the workload from the command line and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=("writer", "baseline"), default="writer")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--print-acks", action="store_true")
    args = parser.parse_args(argv)
    url = args.database_url or resolve_url(Settings())
    on_ack = _print_ack if args.print_acks else None
    pool = args.clients if args.mode == "baseline" else 6
    async with Database(url, max_size=pool) as db:
        await create_document_tables(db)
        if args.mode == "baseline":
            result = await run_ingest(
                baseline_poster(db),
                mode="baseline",
                clients=args.clients,
                duration_s=args.seconds,
                on_ack=on_ack,
            )
        else:
            async with DocumentWriter(db) as writer:
                result = await run_ingest(
                    writer.write,
                    mode="writer",
                    clients=args.clients,
                    duration_s=args.seconds,
                    on_ack=on_ack,
                )
            result.stats = writer.stats
    latencies = sorted(result.latencies_s) or [0.0]
    print(
        f"{result.mode}: {result.docs_per_s:,.0f} docs/s written={result.written} "
        f"rejected={result.rejected} conflicts={result.conflicts} "
        f"p50={latencies[len(latencies) // 2] * 1000:.1f} ms "
        f"p99={latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms",
        file=sys.stderr,
    )
    if result.stats:
        print(f"stats: {result.stats}", file=sys.stderr)
    return result


if __name__ == "__main__":
    asyncio.run(main())

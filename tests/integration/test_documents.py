"""The document-ingest workload through the group-commit writer, on a real PostgreSQL.

References inside one flush (chains, diamonds, cycles) commit; a missing reference
rejects its item and the items of the flush that depend on it, and nothing else; an item
that breaks a constraint is isolated; re-posting an identity replaces body and references;
and for random reference graphs cut into random flushes the committed set is exactly the
satisfiable one. A killed writer process never acknowledged an uncommitted document.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgbatch.db.database import Database
from pgbatch.workloads.documents import (
    DocumentWriter,
    Identity,
    create_document_tables,
    document_key,
)
from pgbatch.writer import WriteOutcome, WriteStatus

ROOT = Path(__file__).resolve().parents[2]
# Flushes in these tests are triggered by size (max_batch = the items posted at once),
# never by time: the delay is far longer than any test.
NEVER_MS = 600_000.0


def ident(name: str, kind: str = "student") -> dict[str, str]:
    """Return the identity of a test document."""
    return {"type": kind, "id": name}


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """Return an open Database on this test's database, with the documents tables."""
    async with Database(database_url, max_size=6) as database:
        await create_document_tables(database)
        yield database


async def stored(db: Database) -> tuple[dict[uuid.UUID, Any], set[tuple[uuid.UUID, uuid.UUID]]]:
    """Return {key: body} of every document and every (parent, target) reference."""
    async with db.connection() as conn:
        docs = await (await conn.execute("SELECT key, body FROM pgbatch.documents")).fetchall()
        refs = await (
            await conn.execute("SELECT parent, target FROM pgbatch.document_references")
        ).fetchall()
    return {k: b for k, b in docs}, {(p, t) for p, t in refs}


async def post_together(
    writer: DocumentWriter,
    posts: Sequence[tuple[Identity, Any, Sequence[Identity]]],
    *,
    partition: str = "p",
) -> list[WriteOutcome[uuid.UUID]]:
    """Post every document from its own task, all released at once; return the outcomes."""
    gate = asyncio.Event()

    async def one(identity: Identity, body: Any, refs: Sequence[Identity]) -> WriteOutcome[Any]:
        await gate.wait()
        return await writer.post(identity, body, references=refs, partition=partition)

    tasks = [asyncio.create_task(one(*post)) for post in posts]
    gate.set()
    return list(await asyncio.gather(*tasks))


@pytest.mark.asyncio
async def test_200_concurrent_documents_that_reference_each_other_all_commit(
    db: Database,
) -> None:
    posts: list[tuple[Identity, Any, Sequence[Identity]]] = []
    for chain in range(5):  # five chains of 20, each link referencing the previous one
        links = [ident(f"chain-{chain}-{n}") for n in range(20)]
        posts += [(links[n], {"n": n}, [links[n - 1]] if n else []) for n in range(20)]
    for d in range(10):  # ten diamonds: top → left, right → bottom
        top, left, right, bottom = (ident(f"diamond-{d}-{p}") for p in "tlrb")
        posts += [
            (top, {}, [left, right]),
            (left, {}, [bottom]),
            (right, {}, [bottom]),
            (bottom, {}, []),
        ]
    cycle = [ident(f"cycle-{n}") for n in range(3)]  # a cycle of three
    posts += [(cycle[n], {}, [cycle[(n + 1) % 3]]) for n in range(3)]
    rng = random.Random(7)
    rest = [ident(f"web-{n}") for n in range(200 - len(posts))]
    everyone = [p[0] for p in posts] + rest
    posts += [(doc, {}, rng.sample(everyone, 3)) for doc in rest]  # forward refs too
    rng.shuffle(posts)
    assert len(posts) == 200

    async with DocumentWriter(db, max_batch=200, max_delay_ms=NEVER_MS) as writer:
        outcomes = await post_together(writer, posts)
    assert [o.status for o in outcomes] == [WriteStatus.WRITTEN] * 200
    docs, refs = await stored(db)
    assert set(docs) == {document_key(p[0]) for p in posts}
    assert refs == {(document_key(p[0]), document_key(r)) for p in posts for r in p[2]}
    assert writer.stats.flush_sizes == {200: 1}


@pytest.mark.asyncio
async def test_a_missing_reference_rejects_its_item_and_dependants_only(db: Database) -> None:
    async with DocumentWriter(db, max_batch=1, max_delay_ms=NEVER_MS) as writer:
        assert (await writer.post(ident("old"), {}, partition="p")).written

    ghost = ident("ghost")
    posts: list[tuple[Identity, Any, Sequence[Identity]]] = [
        (ident("a"), {}, [ghost]),  # missing
        (ident("b"), {}, [ident("a")]),  # depends on a
        (ident("c"), {}, [ident("b")]),  # depends on b, transitively on a
        (ident("g"), {}, [ident("a"), ident("d")]),  # one good and one rejected reference
        (ident("h"), {}, [ident("i")]),  # a cycle with a missing reference
        (ident("i"), {}, [ident("j")]),
        (ident("j"), {}, [ident("h"), ghost]),
        (ident("d"), {}, []),  # unrelated: all of these commit
        (ident("e"), {}, [ident("d")]),
        (ident("f"), {}, [ident("old")]),
        (ident("k"), {}, [ident("k")]),  # itself
    ]
    async with DocumentWriter(db, max_batch=len(posts), max_delay_ms=NEVER_MS) as writer:
        outcomes = await post_together(writer, posts)
    by_name = {p[0]["id"]: o for p, o in zip(posts, outcomes, strict=True)}
    key = document_key

    assert by_name["a"].status is WriteStatus.REJECTED
    assert by_name["a"].missing == {key(ghost)} and "missing references" in by_name["a"].reason
    assert by_name["b"].blocked_by == {key(ident("a"))} and not by_name["b"].missing
    assert by_name["c"].blocked_by == {key(ident("b"))}
    assert by_name["g"].blocked_by == {key(ident("a"))}
    assert by_name["j"].missing == {key(ghost)}
    assert by_name["h"].status is by_name["i"].status is WriteStatus.REJECTED
    assert all(by_name[n].written for n in "defk")
    docs, refs = await stored(db)
    assert set(docs) == {key(ident(n)) for n in ("old", "d", "e", "f", "k")}
    assert refs == {
        (key(ident("e")), key(ident("d"))),
        (key(ident("f")), key(ident("old"))),
        (key(ident("k")), key(ident("k"))),
    }


@pytest.mark.asyncio
async def test_an_item_that_breaks_a_constraint_is_isolated_and_the_others_commit(
    db: Database,
) -> None:
    async with db.connection() as conn:
        # A unique index the fast path does not know about, and a rule on references
        # that fails only in the second statement of a flush.
        await conn.execute(
            "CREATE UNIQUE INDEX documents_email ON pgbatch.documents ((body->>'email'))"
        )
        await conn.execute(
            "ALTER TABLE pgbatch.document_references"
            " ADD CONSTRAINT no_self CHECK (parent <> target)"
        )
    posts: list[tuple[Identity, Any, Sequence[Identity]]] = [
        (ident("array-body"), [1, 2], []),  # check constraint: the body is an object
        (ident("nul"), {"text": "a\u0000b"}, []),  # data exception: jsonb refuses NUL
        (ident("mail-1"), {"email": "x@example.org"}, []),  # one of these two wins
        (ident("mail-2"), {"email": "x@example.org"}, []),
        (ident("self"), {}, [ident("self")]),  # fails in the references statement
        (ident("fan-of-self"), {}, [ident("self")]),  # written before "self" failed: redone
        (ident("fan-of-nul"), {}, [ident("nul")]),
        *[(ident(f"good-{n}"), {"n": n}, [ident(f"good-{n - 1}")] if n else []) for n in range(9)],
    ]
    async with DocumentWriter(db, max_batch=len(posts), max_delay_ms=NEVER_MS) as writer:
        outcomes = await post_together(writer, posts)
    by_name = {p[0]["id"]: o for p, o in zip(posts, outcomes, strict=True)}

    assert by_name["array-body"].sqlstate == "23514"  # check_violation
    assert by_name["nul"].sqlstate is not None and by_name["nul"].sqlstate.startswith("22")
    assert by_name["self"].sqlstate == "23514" and "no_self" in by_name["self"].reason
    assert by_name["fan-of-nul"].blocked_by == {document_key(ident("nul"))}
    assert by_name["fan-of-self"].blocked_by == {document_key(ident("self"))}
    mails = sorted(by_name[n].status for n in ("mail-1", "mail-2"))
    assert mails == [WriteStatus.REJECTED, WriteStatus.WRITTEN]
    loser = next(by_name[n] for n in ("mail-1", "mail-2") if not by_name[n].written)
    assert loser.sqlstate == "23505"  # unique_violation
    assert all(by_name[f"good-{n}"].written for n in range(9))
    docs, refs = await stored(db)
    written = {document_key(p[0]) for p, o in zip(posts, outcomes, strict=True) if o.written}
    assert set(docs) == written and len(written) == 10
    assert len(refs) == 8  # the chain of good documents
    assert writer.stats.isolations == 1 and writer.stats.flushes == 1


@pytest.mark.asyncio
async def test_reposting_an_identity_replaces_its_body_and_references(db: Database) -> None:
    a, b, c = ident("a"), ident("b"), ident("c")
    async with DocumentWriter(db, max_batch=1, max_delay_ms=0) as writer:
        for identity in (b, c):
            assert (await writer.post(identity, {}, partition="p")).written
        assert (await writer.post(a, {"v": 1}, references=[b], partition="p")).written
        assert (await writer.post(a, {"v": 2}, references=[c], partition="p")).written
        refused = await writer.post(a, {"v": 3}, references=[ident("nobody")], partition="p")
        assert refused.status is WriteStatus.REJECTED
    docs, refs = await stored(db)
    assert docs[document_key(a)] == {"v": 2}
    assert refs == {(document_key(a), document_key(c))}


@pytest.mark.asyncio
async def test_the_same_identity_twice_in_one_flush_commits_both_in_order(db: Database) -> None:
    a, b = ident("a"), ident("b")
    posts: list[tuple[Identity, Any, Sequence[Identity]]] = [
        (a, {"v": 1}, [b]),
        (b, {}, []),
        (a, {"v": 2}, []),
    ]
    async with DocumentWriter(db, max_batch=3, max_delay_ms=NEVER_MS) as writer:
        outcomes = await post_together(writer, posts)
    assert all(o.written for o in outcomes)
    assert writer.stats.flushes == 1
    docs, refs = await stored(db)
    assert docs[document_key(a)] == {"v": 2} and refs == set()


# -- property: the committed set is exactly the satisfiable set ---------------------------

NODES = 12


@st.composite
def graphs_and_flushes(draw: st.DrawFn) -> tuple[list[list[int]], list[list[int]]]:
    """Draw references among NODES documents (plus 2 never posted) and an order cut in flushes."""
    size = draw(st.integers(2, NODES))
    refs = [draw(st.lists(st.integers(0, size + 1), max_size=3, unique=True)) for _ in range(size)]
    order = draw(st.permutations(range(size)))
    cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=3)))
    flushes = [list(order[i:j]) for i, j in zip([0, *cuts], [*cuts, size], strict=True)]
    return refs, flushes


def satisfiable(refs: list[list[int]], flushes: list[list[int]]) -> set[int]:
    """Model: per flush, drop items with an unsatisfied reference until nothing changes."""
    committed: set[int] = set()
    for flush in flushes:
        accepted = set(flush)
        changed = True
        while changed:
            changed = False
            for node in sorted(accepted):
                if any(r not in committed and r not in accepted for r in refs[node]):
                    accepted.discard(node)
                    changed = True
        committed |= accepted
    return committed


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=graphs_and_flushes())
def test_property_committed_equals_satisfiable(
    database_url: str, case: tuple[list[list[int]], list[list[int]]]
) -> None:
    refs, flushes = case
    run = uuid.uuid4().hex  # a namespace of its own: examples share the database

    def node(n: int) -> dict[str, str]:
        return ident(f"{run}-{n}")

    async def scenario() -> tuple[set[int], set[uuid.UUID], set[tuple[uuid.UUID, uuid.UUID]]]:
        acknowledged: set[int] = set()
        async with Database(database_url, max_size=2) as db:
            await create_document_tables(db)
            for flush in flushes:
                writer = DocumentWriter(db, max_batch=len(flush), max_delay_ms=NEVER_MS, lanes=1)
                async with writer:
                    posts = [(node(n), {"n": n}, [node(r) for r in refs[n]]) for n in flush]
                    outcomes = await post_together(writer, posts)
                assert writer.stats.flushes == 1
                acknowledged |= {n for n, o in zip(flush, outcomes, strict=True) if o.written}
                # Rejections come from the one existence check, not from a foreign key.
                assert all(o.missing or o.blocked_by for o in outcomes if not o.written)
            async with db.connection() as conn:
                cur = await conn.execute(
                    "SELECT key FROM pgbatch.documents WHERE identity->>'id' LIKE %s", (f"{run}-%",)
                )
                keys = {row[0] for row in await cur.fetchall()}
                cur = await conn.execute(
                    "SELECT parent, target FROM pgbatch.document_references WHERE parent = ANY(%s)",
                    (list(keys),),
                )
                pairs = {(p, t) for p, t in await cur.fetchall()}
        return acknowledged, keys, pairs

    acknowledged, keys, pairs = asyncio.run(scenario())
    expected = satisfiable(refs, flushes)
    assert acknowledged == expected
    assert keys == {document_key(node(n)) for n in expected}  # every ack is stored, nothing else
    assert pairs == {
        (document_key(node(n)), document_key(node(r))) for n in expected for r in refs[n]
    }


# -- a killed writer never acknowledged what is not committed -----------------------------

ACKS_BEFORE_KILL = 400


@pytest.mark.asyncio
async def test_killing_the_process_loses_no_acknowledged_document(database_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.documents", "--database-url", database_url,
        "--clients", "32", "--seconds", "120", "--print-acks",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    acked: list[uuid.UUID] = []
    try:
        async with asyncio.timeout(60):
            while len(acked) < ACKS_BEFORE_KILL:
                line = await child.stdout.readline()
                if not line:
                    raise AssertionError(f"writer exited: {(await child.stderr.read()).decode()}")
                acked.append(uuid.UUID(line.decode().split()[1]))
    finally:
        child.send_signal(signal.SIGKILL)  # mid-run: 32 callers wait on flushes in flight
        # Whatever it printed before dying was acknowledged too.
        acked += [
            uuid.UUID(line.split()[1]) for line in (await child.stdout.read()).decode().splitlines()
        ]
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT key FROM pgbatch.documents WHERE key = ANY(%s)", (acked,))
        present = {row[0] for row in await cur.fetchall()}
    assert not set(acked) - present, "acknowledged documents missing after the crash"

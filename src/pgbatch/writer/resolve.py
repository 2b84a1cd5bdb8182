"""Decide which items of a flush can be written: a fixpoint over their references.

An item is accepted when every key it references either exists in the database or is
another accepted item of the same flush (cycles included). Rejections spread: an item
that references a rejected item of the flush is rejected too. Pure logic, no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic

from pgbatch.writer.models import Key, Payload, WriteItem, WriteOutcome, WriteStatus

__all__ = ["Resolution", "referenced_keys", "resolve"]

# A rejection's reason names at most this many keys; the full sets are in the outcome.
REASON_KEYS_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Resolution(Generic[Key, Payload]):
    """The accepted items of a flush, in key order, and the outcome of each rejected one."""

    accepted: tuple[WriteItem[Key, Payload], ...]
    rejected: dict[Key, WriteOutcome[Key]]


def referenced_keys(items: Iterable[WriteItem[Key, Payload]]) -> list[Key]:
    """Return every key the items reference, sorted: the one existence query's argument."""
    return sorted({ref for item in items for ref in item.references})


def resolve(
    items: Sequence[WriteItem[Key, Payload]],
    existing: Collection[Key],
    excluded: Mapping[Key, WriteOutcome[Key]] | None = None,
) -> Resolution[Key, Payload]:
    """Accept the items whose references are satisfiable; `excluded` items are rejected as given.

    `items` must have distinct keys; `existing` holds the referenced keys found in the
    database. A reference to an item of the flush that also exists in the database is
    satisfied whatever becomes of that item (its current version stays).
    """
    excluded = excluded or {}
    by_key = {item.key: item for item in items}
    if len(by_key) != len(items):
        raise ValueError("a flush resolves items with distinct keys only")
    missing: dict[Key, frozenset[Key]] = {}
    # in-flush key → the items whose reference to it only that item can satisfy
    dependants: dict[Key, list[Key]] = defaultdict(list)
    for item in items:
        absent = frozenset(r for r in item.references if r not in existing and r not in by_key)
        if absent:
            missing[item.key] = absent
        for ref in item.references:
            if ref != item.key and ref in by_key and ref not in existing:
                dependants[ref].append(item.key)
    doomed = {key for key in by_key if key in excluded or key in missing}
    pending = list(doomed)
    while pending:
        for dependant in dependants.get(pending.pop(), ()):
            if dependant not in doomed:
                doomed.add(dependant)
                pending.append(dependant)
    rejected: dict[Key, WriteOutcome[Key]] = {}
    for key in doomed:
        if key in excluded:
            rejected[key] = excluded[key]
            continue
        blocked = frozenset(
            r for r in by_key[key].references if r in doomed and r != key and r not in existing
        )
        rejected[key] = _rejection(missing.get(key, frozenset()), blocked)
    accepted = tuple(sorted((i for i in items if i.key not in doomed), key=lambda i: i.key))
    return Resolution(accepted, rejected)


def _rejection(missing: frozenset[Key], blocked: frozenset[Key]) -> WriteOutcome[Key]:
    reasons = []
    if missing:
        reasons.append(f"missing references: {_shown(missing)}")
    if blocked:
        reasons.append(f"references rejected items of the same flush: {_shown(blocked)}")
    return WriteOutcome(WriteStatus.REJECTED, "; ".join(reasons), missing, blocked)


def _shown(keys: frozenset[Key]) -> str:
    ordered = sorted(keys)
    shown = ", ".join(str(k) for k in ordered[:REASON_KEYS_SHOWN])
    return shown + (
        f" and {len(ordered) - REASON_KEYS_SHOWN} more" if len(ordered) > REASON_KEYS_SHOWN else ""
    )

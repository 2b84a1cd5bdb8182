"""Reference resolution of one flush: the accepted set is the satisfiable fixpoint."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgbatch.writer.models import WriteItem, WriteOutcome, WriteStatus
from pgbatch.writer.resolve import REASON_KEYS_SHOWN, referenced_keys, resolve


def item(key: int, *refs: int) -> WriteItem[int, None]:
    """Return an item with integer keys."""
    return WriteItem(key, None, frozenset(refs))


def accepted_keys(items: list[WriteItem[int, None]], existing: set[int]) -> list[int]:
    """Return the keys resolve accepts, in the order it gives them."""
    return [i.key for i in resolve(items, existing).accepted]


def test_references_inside_the_flush_are_satisfied_cycles_included() -> None:
    chain = [item(1), item(2, 1), item(3, 2)]
    cycle = [item(10, 11), item(11, 12), item(12, 10)]
    diamond = [item(20, 21, 22), item(21, 23), item(22, 23), item(23)]
    assert accepted_keys([*cycle, *diamond, *chain], set()) == [1, 2, 3, 10, 11, 12, 20, 21, 22, 23]


def test_a_missing_reference_rejects_the_item_and_everything_that_depends_on_it() -> None:
    items = [item(1, 99), item(2, 1), item(3, 2), item(4, 5), item(5), item(6, 7), item(7, 6, 98)]
    resolution = resolve(items, existing={50})
    assert [i.key for i in resolution.accepted] == [4, 5]
    assert resolution.rejected[1].missing == {99} and not resolution.rejected[1].blocked_by
    assert resolution.rejected[2].blocked_by == {1} and not resolution.rejected[2].missing
    assert resolution.rejected[3].blocked_by == {2}
    assert resolution.rejected[7].missing == {98} and resolution.rejected[7].blocked_by == {6}
    assert resolution.rejected[6].blocked_by == {7}
    assert {o.status for o in resolution.rejected.values()} == {WriteStatus.REJECTED}


def test_a_reference_to_an_existing_key_survives_the_rejection_of_its_new_version() -> None:
    # 2 exists in the database; its new version is rejected, its old one stays.
    resolution = resolve([item(1, 2), item(2, 99)], existing={2})
    assert [i.key for i in resolution.accepted] == [1]


def test_excluded_items_keep_their_outcome_and_reject_their_dependants() -> None:
    broken: WriteOutcome[int] = WriteOutcome(WriteStatus.REJECTED, "check", sqlstate="23514")
    resolution = resolve([item(1), item(2, 1), item(3)], set(), {1: broken})
    assert resolution.rejected[1] is broken
    assert resolution.rejected[2].blocked_by == {1}
    assert [i.key for i in resolution.accepted] == [3]


def test_accepted_items_come_in_key_order_and_keys_must_be_distinct() -> None:
    assert accepted_keys([item(3), item(1), item(2)], set()) == [1, 2, 3]
    assert referenced_keys([item(1, 9, 4), item(2, 4)]) == [4, 9]
    with pytest.raises(ValueError, match="distinct"):
        resolve([item(1), item(1)], set())


def test_a_reason_names_a_few_keys_and_counts_the_rest() -> None:
    many = range(100, 100 + REASON_KEYS_SHOWN + 3)
    outcome = resolve([item(1, *many)], set()).rejected[1]
    assert outcome.reason.endswith("and 3 more") and len(outcome.missing) == len(many)


@st.composite
def flushes(draw: st.DrawFn) -> tuple[list[WriteItem[int, None]], set[int]]:
    """Draw a flush of items with random references, and the keys that exist already."""
    size = draw(st.integers(0, 30))
    universe = st.integers(0, size + 5)
    items = [item(k, *draw(st.sets(universe, max_size=4))) for k in range(size)]
    return items, draw(st.sets(universe, max_size=10))


@given(flushes())
def test_property_accepted_is_the_greatest_self_satisfying_subset(
    case: tuple[list[WriteItem[int, None]], set[int]],
) -> None:
    items, existing = case
    # The naive model: drop unsatisfied items one pass at a time until nothing changes.
    model = {i.key for i in items}
    while True:
        keep = {i.key for i in items if i.key in model and i.references <= (existing | model)}
        if keep == model:
            break
        model = keep
    resolution = resolve(items, existing)
    assert {i.key for i in resolution.accepted} == model
    assert set(resolution.rejected) == {i.key for i in items} - model
    for key, outcome in resolution.rejected.items():
        assert outcome.missing or outcome.blocked_by, key

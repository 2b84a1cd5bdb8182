"""The worker's fast encoding of a shard's outcomes gives what the general encoder gives.

encode_outcomes (and ShardCompletion.from_outcomes, the worker's path) skips the step per
item when every outcome is ok; these tests hold it to encode_results (and
ShardCompletion.build) byte for byte, errors included, on hostile values.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgbatch.db.copy import encode_outcomes, encode_results
from pgbatch.db.shards import ShardCompletion, _items
from pgbatch.models import Item, Outcome, ShardStatus, TableRows

# Text with NUL, lone surrogates, backslashes, tabs and newlines: what COPY and UTF-8 trip on.
_texts = st.text(
    alphabet=st.sampled_from(["a", "é", "\x00", "\ud800", "\udfff", "\\", "\t", "\n", "\r", "€"])
    | st.characters(),
    max_size=12,
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 64 bits: orjson refuses
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308]),
    st.floats(),
    _texts,
)
# Values orjson cannot encode at all: the item's shard must fail as before.
_not_json = st.sampled_from([{1, 2}, object(), b"bytes", 1 + 2j, {(1, 2): "tuple key"}])
_values = st.recursive(
    _scalars | _not_json,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_texts, inner, max_size=4)
    ),
    max_leaves=12,
)
_outcomes = st.one_of(
    st.builds(Outcome, st.just(True), _values),
    st.builds(Outcome, st.just(True), _values, st.none(), st.none()),
    st.builds(Outcome, st.just(False), st.none(), _texts | st.none(), _texts | st.none()),
    # A failed outcome with an output (stored as null) and truthy or falsy non-bool flags.
    st.builds(Outcome, st.sampled_from([0, 1, "", "yes", None]), _values, _texts, _texts),
)


def _encode_old(batch_id: int, seqs: list[int], outcomes: list[Outcome], traced: bool) -> Any:
    try:
        pairs = list(zip(seqs, outcomes, strict=True))
        items_ok = sum(1 for o in outcomes if o.ok)
        return ("ok", encode_results(batch_id, pairs, traced=traced), items_ok)
    except Exception as exc:
        return ("raised", type(exc), str(exc))


def _encode_new(batch_id: int, seqs: list[int], outcomes: list[Outcome], traced: bool) -> Any:
    try:
        encoded, items_ok = encode_outcomes(batch_id, seqs, outcomes, traced=traced)
        return ("ok", encoded, items_ok)
    except Exception as exc:
        return ("raised", type(exc), str(exc))


@settings(max_examples=400, deadline=None)
@given(
    batch_id=st.integers(min_value=1, max_value=2**63 - 1),
    first=st.integers(min_value=0, max_value=2**40),
    outcomes=st.lists(_outcomes, max_size=20),
    all_ok=st.booleans(),
    traced=st.booleans(),
)
def test_encode_outcomes_equals_encode_results(
    batch_id: int, first: int, outcomes: list[Outcome], all_ok: bool, traced: bool
) -> None:
    if all_ok:  # the fast path: make every outcome ok, keeping its (maybe hostile) output
        outcomes = [Outcome(True, o.output) for o in outcomes]
    seqs = list(range(first, first + len(outcomes)))
    old = _encode_old(batch_id, seqs, outcomes, traced)
    new = _encode_new(batch_id, seqs, outcomes, traced)
    assert new == old
    if old[0] == "ok" and old[1] is not None:
        assert new[1].block_row(batch_id) == old[1].block_row(batch_id)


@pytest.mark.parametrize(
    "output",
    [
        "\ud800",  # a lone surrogate
        2**64,  # beyond 64 bits
        -(2**63) - 1,
        {1, 2},  # not JSON
        {"nested": [object()]},
    ],
)
def test_an_unstorable_ok_output_raises_as_before(output: Any) -> None:
    outcomes = [Outcome(True, 1), Outcome(True, output)]
    old = _encode_old(7, [0, 1], outcomes, False)
    assert old[0] == "raised" and issubclass(old[1], TypeError)
    assert _encode_new(7, [0, 1], outcomes, False) == old


def test_all_ok_outputs_keep_nan_nul_and_nesting_as_before() -> None:
    outputs = [math.nan, math.inf, "\x00\\", [[{"a": [None]}]], 2**64 - 1, -(2**63), None]
    outcomes = [Outcome(True, o) for o in outputs]
    encoded, items_ok = encode_outcomes(3, list(range(5, 12)), outcomes)
    assert items_ok == 7 and encoded is not None
    assert encoded.outputs == orjson.dumps(outputs)  # NaN and inf are null, as orjson writes
    assert encoded == encode_results(3, list(zip(range(5, 12), outcomes, strict=True)))
    assert encode_outcomes(3, [], []) == (None, 0)


@settings(max_examples=150, deadline=None)
@given(outcomes=st.lists(_outcomes, min_size=1, max_size=10), with_rows=st.booleans())
def test_from_outcomes_equals_build(outcomes: list[Outcome], with_rows: bool) -> None:
    seqs = list(range(100, 100 + len(outcomes)))
    writes = [TableRows("t", ("a",), [(1,), ("x\ty",)])] if with_rows else []
    try:
        old: Any = ShardCompletion.build(
            5, 9, 3, ShardStatus.DONE, list(zip(seqs, outcomes, strict=True)), writes
        )
    except Exception as exc:
        old = (type(exc), str(exc))
    try:
        new: Any = ShardCompletion.from_outcomes(5, 9, 3, ShardStatus.DONE, seqs, outcomes, writes)
    except Exception as exc:
        new = (type(exc), str(exc))
    assert new == old


@given(values=st.lists(_values, max_size=20), first=st.integers(min_value=0, max_value=2**62))
def test_items_are_built_as_item_would(values: list[Any], first: int) -> None:
    built = _items(range(first, first + len(values)), values)
    expected = tuple(Item(first + n, v) for n, v in enumerate(values))
    assert all(type(item) is Item for item in built)
    assert [(i.seq, i.value) for i in built] == [(i.seq, i.value) for i in expected]
    assert [id(i.value) for i in built] == [id(i.value) for i in expected]

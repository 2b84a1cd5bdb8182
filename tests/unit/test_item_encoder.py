"""The submit's item encoder: its one-scan-per-chunk checks give what per-item checks gave."""

from __future__ import annotations

import math
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pgbatch.db.batches import BatchSpec, _ItemEncoder


class _PerItemEncoder(_ItemEncoder):
    """The encoder as it was: a Python step per item for the null and backslash checks."""

    def _payloads(self, items: Any) -> tuple[list[bytes], bytes]:
        try:
            payloads = [orjson.dumps(item) for item in items]
        except TypeError:
            self._raise_for_first_bad(items)
            raise
        for offset, payload in enumerate(payloads):
            if b"null" in payload:
                self._check_value(items[offset], self.count + offset)
        self._measure(payloads)
        self.digest.update(b"\n".join(payloads))
        self.digest.update(b"\n")
        if any(b"\\" in p for p in payloads):
            # the old encode() tested each payload; the joined text says the same here
            return payloads, b"\\"
        return payloads, b""


_texts = st.lists(
    st.sampled_from(["a", "\\", "\n", "\t", "null", "\x00", "é", '"']), max_size=4
).map("".join)
_leaves = st.one_of(
    st.none(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.sampled_from([math.nan, math.inf, -math.inf, 1.5]),
    _texts,
    st.sampled_from([{1, 2}, b"x"]),  # not JSON
)
_items = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=6,
)


def _run(encoder_type: type[_ItemEncoder], chunks: list[list[Any]], shard_size: int) -> Any:
    spec = BatchSpec(task="t", shard_size=shard_size, max_attempts=1, lease_ttl_s=1.0)
    encoder = encoder_type(7, spec)
    out: list[Any] = []
    try:
        for chunk in chunks:
            out.append(encoder.encode(chunk))
        out.append(encoder.finish())
    except Exception as exc:
        out.append((type(exc), str(exc), getattr(exc, "seq", None), getattr(exc, "path", None)))
    return out, encoder.digest.hexdigest(), encoder.count


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.lists(_items, max_size=6), max_size=4),
    shard_size=st.integers(min_value=1, max_value=4),
)
def test_the_chunk_scans_encode_and_refuse_as_per_item_checks_did(
    chunks: list[list[Any]], shard_size: int
) -> None:
    new = _run(_ItemEncoder, chunks, shard_size)
    assert new == _run(_PerItemEncoder, chunks, shard_size)
    out = new[0]
    if out and isinstance(out[-1], tuple):
        return  # refused, as before
    # What COPY reads back (a backslash is its only escape here) is each shard's items.
    items = [item for chunk in chunks for item in chunk]
    for shard_no, line in enumerate(b"".join(out).splitlines()):
        batch_id, first_seq, block = line.split(b"\t")
        assert (batch_id, int(first_seq)) == (b"7", shard_no * shard_size)
        shard = items[shard_no * shard_size : (shard_no + 1) * shard_size]
        assert orjson.loads(block.replace(b"\\\\", b"\\")) == orjson.loads(orjson.dumps(shard))


def test_a_nan_after_clean_items_is_found_at_its_seq() -> None:
    spec = BatchSpec(task="t", shard_size=10, max_attempts=1, lease_ttl_s=1.0)
    encoder = _ItemEncoder(1, spec)
    encoder.encode([{"n": n} for n in range(5)])
    try:
        encoder.encode([{"n": 5}, {"n": [1, math.inf]}])
    except ValueError as exc:
        assert "6" in str(exc) and "not a JSON number" in str(exc)
    else:
        raise AssertionError("an Infinity was stored as null")
    # JSON writes the backslash as two, and COPY's text format needs each of them doubled.
    assert _ItemEncoder(1, spec).encode([{"k": "a\\b"}]) == b'1\t0\t[{"k":"a\\\\\\\\b"}'

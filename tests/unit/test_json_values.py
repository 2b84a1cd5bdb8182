"""pgbatch.json_values: numbers JSON holds exactly pass, others are refused with their path."""

from __future__ import annotations

import orjson
import pytest

from pgbatch import json_values
from pgbatch.json_values import INT_MAX, INT_MIN, JsonValueError


def test_long_digit_runs_in_strings_and_fractions_are_not_integers() -> None:
    text = b'{"id": "123456789012345678901234567890", "x": 0.12345678901234567890123}'
    assert json_values.loads(text) == orjson.loads(text)


def test_the_64_bit_bounds_pass_and_one_beyond_is_refused_at_its_path() -> None:
    assert json_values.loads(f"[{INT_MIN}, {INT_MAX}]".encode()) == [INT_MIN, INT_MAX]
    for beyond in (INT_MIN - 1, INT_MAX + 1):
        with pytest.raises(JsonValueError) as raised:
            json_values.loads(f'{{"a": [0, {{"b": {beyond}}}]}}'.encode())
        assert raised.value.path == ("a", 1, "b")
        assert json_values.field_of(raised.value.path) == "a.1.b"


@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b'{"x": -Infinity}', b"[1e400]"])
def test_non_finite_numbers_are_not_json(text: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        json_values.loads(text)


def test_check_value_walks_dicts_lists_and_tuples() -> None:
    json_values.check_value({"a": [1, 2.5, None, True, "x"], "b": (INT_MAX,)})
    with pytest.raises(JsonValueError) as raised:
        json_values.check_value({"a": [1, {"b": (0, float("nan"))}]}, ("items", 7))
    assert raised.value.path == ("items", 7, "a", 1, "b", 1)


def test_a_value_nested_deeper_than_the_exact_parser_goes_is_refused() -> None:
    # orjson parses up to 1024 levels; the standard parser, which locates a long integer,
    # may stop earlier: such a value is refused rather than stored rounded.
    depth = 1000
    text = b"[" * depth + str(INT_MAX + 1).encode() + b"]" * depth
    with pytest.raises(JsonValueError):
        json_values.loads(text)

"""The library and the HTTP API refuse the same option values (one set of bounds)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pgbatch.api.schemas import BatchOptions
from pgbatch.app import _check_options
from pgbatch.errors import InvalidBatchError
from pgbatch.limits import MAX_LEASE_TTL_S, MAX_MAX_ATTEMPTS, MAX_SHARD_SIZE, MIN_LEASE_TTL_S

CASES: list[tuple[str, Any, bool]] = [
    ("lease_ttl_s", 1e-6, False),
    ("lease_ttl_s", MIN_LEASE_TTL_S - 0.01, False),
    ("lease_ttl_s", MIN_LEASE_TTL_S, True),
    ("lease_ttl_s", MAX_LEASE_TTL_S, True),
    ("lease_ttl_s", MAX_LEASE_TTL_S + 1, False),
    ("max_attempts", 0, False),
    ("max_attempts", 1, True),
    ("max_attempts", MAX_MAX_ATTEMPTS, True),
    ("max_attempts", MAX_MAX_ATTEMPTS + 1, False),
    ("shard_size", 0, False),
    ("shard_size", MAX_SHARD_SIZE, True),
    ("shard_size", MAX_SHARD_SIZE + 1, False),
]


def _library_accepts(name: str, value: Any) -> bool:
    options: dict[str, Any] = {
        "shard_size": 10, "max_attempts": 3, "lease_ttl_s": 30.0, "queue": "q", name: value,
    }  # fmt: skip
    try:
        _check_options(**options)
    except InvalidBatchError as exc:
        assert exc.field == name
        return False
    return True


def _api_accepts(name: str, value: Any) -> bool:
    try:
        BatchOptions.model_validate({name: value})
    except ValidationError as exc:
        assert exc.errors()[0]["loc"] == (name,)
        return False
    return True


@pytest.mark.parametrize(("name", "value", "accepted"), CASES)
def test_library_and_api_agree_on_option_bounds(name: str, value: Any, accepted: bool) -> None:
    assert _library_accepts(name, value) is accepted
    assert _api_accepts(name, value) is accepted

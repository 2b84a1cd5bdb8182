"""Bounds on what one search may cost: concurrent exact searches, and a statement timeout.

An exact search compares every chunk that passes its filter (~150 ms of a core at
100,000 chunks of 384, more with size), so without a bound one tenant could keep every
core busy with them. Each app (one per API process) admits at most `exact_per_tenant`
exact searches of one tenant and `exact_total` of all tenants at once; one more is
refused at once with `SearchBusyError` (HTTP 429, Retry-After), not queued: a queue
would hold the client's connection and a pool slot for nothing. The cap is per process
(N API processes admit N x the cap); the statement timeout below bounds every search,
HNSW or exact, in the database itself.

Configured with `set_search_limits(app, SearchLimits(...))` or from the environment:
`PGBATCH_VECTORS_MAX_EXACT_PER_TENANT` (default 2), `PGBATCH_VECTORS_MAX_EXACT` (8),
`PGBATCH_VECTORS_SEARCH_TIMEOUT_MS` (5,000; 0 for none).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from pgbatch.app import App
from pgbatch.errors import ConfigurationError, PgbatchError

__all__ = [
    "RETRY_AFTER_S",
    "ExactSearchSlots",
    "SearchBusyError",
    "SearchLimits",
    "SearchTimeoutError",
    "search_limits",
    "set_search_limits",
]

# What a refused client is told to wait: an exact search lasts a fraction of a second.
RETRY_AFTER_S = 1
_ENV_PER_TENANT = "PGBATCH_VECTORS_MAX_EXACT_PER_TENANT"
_ENV_TOTAL = "PGBATCH_VECTORS_MAX_EXACT"
_ENV_TIMEOUT = "PGBATCH_VECTORS_SEARCH_TIMEOUT_MS"


class SearchBusyError(PgbatchError):
    """Too many exact searches are running (of this tenant, or in this process)."""

    def __init__(self, message: str, *, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SearchTimeoutError(PgbatchError):
    """The search ran past the statement timeout and was cancelled by the server."""


@dataclass(frozen=True, slots=True)
class SearchLimits:
    """How many exact searches may run at once, and how long any search may run."""

    # 2 per tenant: a tenant's exact searches can take at most 2 of this machine's cores'
    # worth of database time from this process; 8 in all, so that four tenants at their
    # cap still leave the pool (10 connections by default) room for everything else.
    exact_per_tenant: int = 2
    exact_total: int = 8
    # 5 s: 30x an exact search at 100,000 chunks here, and short against the API's
    # timeouts; a search cancelled at it answers 503 (the connection is free again).
    statement_timeout_ms: int = 5_000

    def __post_init__(self) -> None:
        if self.exact_per_tenant < 1 or self.exact_total < 1:
            raise ConfigurationError("exact search limits must be at least 1")
        if self.statement_timeout_ms < 0:
            raise ConfigurationError("the search statement timeout cannot be negative")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SearchLimits:
        """Read the limits from PGBATCH_VECTORS_* variables (unset: the defaults)."""
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            exact_per_tenant=_int(env, _ENV_PER_TENANT, default.exact_per_tenant),
            exact_total=_int(env, _ENV_TOTAL, default.exact_total),
            statement_timeout_ms=_int(env, _ENV_TIMEOUT, default.statement_timeout_ms),
        )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer") from None


class ExactSearchSlots:
    """Counts the exact searches in progress, per tenant and in all; refuses past the caps."""

    def __init__(self, limits: SearchLimits) -> None:
        self.limits = limits
        self._active: Counter[str] = Counter()
        self._total = 0

    def active(self, tenant: str | None = None) -> int:
        """Return how many exact searches run (of `tenant`, or in all): a test signal too."""
        return self._total if tenant is None else self._active[tenant]

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Hold one slot for an exact search of `tenant`, or raise SearchBusyError."""
        # No await between the checks and the increments: in one event loop nobody can
        # take a slot in between (the cap is per process, see the module).
        if self._active[tenant] >= self.limits.exact_per_tenant:
            raise SearchBusyError(
                f"this tenant already runs {self.limits.exact_per_tenant} exact searches "
                f"(limit {_ENV_PER_TENANT}); retry when one ends, or search without exact"
            )
        if self._total >= self.limits.exact_total:
            raise SearchBusyError(
                f"{self.limits.exact_total} exact searches are running (limit {_ENV_TOTAL}); "
                "retry when one ends, or search without exact"
            )
        self._active[tenant] += 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            self._active[tenant] -= 1
            if not self._active[tenant]:
                del self._active[tenant]


_SLOTS: weakref.WeakKeyDictionary[App, ExactSearchSlots] = weakref.WeakKeyDictionary()


def search_limits(app: App) -> ExactSearchSlots:
    """Return the app's exact-search slots (made from the environment on first use)."""
    slots = _SLOTS.get(app)
    if slots is None:
        slots = _SLOTS[app] = ExactSearchSlots(SearchLimits.from_env())
    return slots


def set_search_limits(app: App, limits: SearchLimits) -> ExactSearchSlots:
    """Give the app new limits (searches in progress keep the slots they hold)."""
    slots = _SLOTS[app] = ExactSearchSlots(limits)
    return slots

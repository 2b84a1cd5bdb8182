"""Shared rate limits as a service: reserve before calling an upstream, settle, pause.

Providers rate-limit an API key by requests and tokens per minute. Every caller of that
key (LLM batch workers, an embedder indexing a library, on any machine) must draw from
one budget, or ten callers each retrying their own 429s make a 429 storm. This module
names the service; the LLM workload provides it, backed by PostgreSQL
(`pgbatch.workloads.llm.shared_limits`), and registers it on the App it is installed
on. A consumer asks `app.service(RATE_LIMITS)` and, when it gets None, limits itself.

The protocol, for one round of calls to an upstream:

1. `reserve(upstream, model=..., tokens=[estimate per request])` grants the longest
   prefix of the requests the limit allows now (every process sees the charge at once),
   or nothing and how long to wait (the window is spent, or a 429 paused the key).
2. Send the granted requests.
3. `settle(grant, requests=..., tokens=...)` replaces the estimate by what the answers
   really used (a request refused with 429 is not charged: it is reserved again).
4. `pause(upstream, model=..., wait_s=...)` after a 429: nobody, in any process, is
   granted anything on that key until its Retry-After has passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pgbatch.services import ServiceKey

__all__ = ["RATE_LIMITS", "RateGrant", "RequestTooLargeError", "SharedRateLimits"]


class RequestTooLargeError(ValueError):
    """One request's estimate is larger than the limit's tokens per minute: never granted."""


@dataclass(frozen=True, slots=True)
class RateGrant:
    """One reservation: the first `granted` requests and their tokens, or a wait.

    `key` is the limit charged (as shown by the provider's limit listing); `reservation`
    is the provider's handle for `settle`, None when there is nothing to settle (nothing
    granted, or an upstream without a shared limit).
    """

    key: str
    granted: int
    tokens: int
    wait_s: float
    reservation: int | None = None


class SharedRateLimits(Protocol):
    """Rate limits shared by every process calling an upstream (see the module)."""

    async def reserve(self, upstream: str, *, model: str, tokens: Sequence[int]) -> RateGrant:
        """Grant the longest prefix of requests (one token estimate each) the limit allows.

        Raises RequestTooLargeError when an estimate exceeds the tokens per minute, and
        the provider's configuration error when `upstream` is unknown to it.
        """
        ...

    async def settle(self, grant: RateGrant, *, requests: int, tokens: int) -> None:
        """Record what the granted requests really cost: those sent and answered, their tokens."""
        ...

    async def pause(self, upstream: str, *, model: str, wait_s: float) -> None:
        """Pause the key of `upstream` (and `model`) for everyone for `wait_s` (a 429)."""
        ...


RATE_LIMITS: ServiceKey[SharedRateLimits] = ServiceKey("rate_limits")

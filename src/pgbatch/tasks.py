"""Registered tasks and completion callbacks, and the signature a handler must have."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pgbatch.errors import RegistrationError
from pgbatch.models import Batch, Item, Outcome

if TYPE_CHECKING:
    from pgbatch.engine.context import CallbackContext, ShardContext

__all__ = ["ISOLATION_STRATEGIES", "CallbackFn", "CallbackSpec", "Handler", "IsolationStrategy",
           "TaskSpec", "check_registration"]  # fmt: skip

# How a raising shard that will not be retried is searched for its poison items
# (engine/failures.py): "bisect" halves it down to single items, "per_item" runs every
# item alone, "off" fails the whole shard, as before isolation existed.
IsolationStrategy = Literal["bisect", "per_item", "off"]
ISOLATION_STRATEGIES: tuple[IsolationStrategy, ...] = ("bisect", "per_item", "off")

Handler = Callable[[list[Item], "ShardContext"], Awaitable[list[Outcome]]]
CallbackFn = Callable[[Batch, "CallbackContext"], Awaitable[None]]

# Defaults of a task's options, each overridable per task and per submission.
# 100 items per shard: with ~1 ms of overhead per shard that is a few percent even for
# handlers of 0.1 ms per item; docs/sizing.md has the formula.
DEFAULT_SHARD_SIZE = 100
DEFAULT_MAX_ATTEMPTS = 5
# 30 s: long against a heartbeat (every TTL/3) and short enough that a crashed worker's
# shard is picked up within half a minute.
DEFAULT_LEASE_TTL_S = 30.0


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A handler and its defaults."""

    name: str
    fn: Handler
    shard_size: int = DEFAULT_SHARD_SIZE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    timeout_s: float | None = None
    queue: str = "default"
    # Internal tasks (pgbatch.* workloads) are submitted through their own checked entry
    # points; the public batch route refuses them, since hand-made items bypass the checks.
    internal: bool = False
    # When a shard that will not be retried raised, find its poison items so that only
    # they fail. "per_item" suits a handler that pays per item (an HTTP call each), "off"
    # one whose runs must not be repeated (a call that is not idempotent).
    isolate_poison: IsolationStrategy = "bisect"


@dataclass(frozen=True, slots=True)
class CallbackSpec:
    """A completion callback, run once per batch run after the batch ends."""

    name: str
    fn: CallbackFn


def check_registration(kind: str, name: str, fn: object, registered: Mapping[str, object]) -> None:
    """Refuse a `kind` ("task", "callback") that is not async or whose name is taken.

    Both mistakes showed only later: a plain function failed every shard with "object is
    not awaitable", and a second registration under a name silently replaced the first.
    """
    if not _storable_name(name):
        raise RegistrationError(
            f"{kind} {name[:80]!r}: a name has 1 to {MAX_REGISTERED_NAME_CHARS} characters, "
            "no NUL, valid UTF-8 (what PostgreSQL stores and the API accepts)"
        )
    if not callable(fn):
        raise RegistrationError(f"{kind} {name!r}: {fn!r} is not a function")
    if not _is_async(fn):
        raise RegistrationError(
            f"{kind} {name!r}: {getattr(fn, '__qualname__', fn)!r} must be an async function "
            f"(async def), not a plain one: pgbatch awaits it"
        )
    if name in registered:
        raise RegistrationError(
            f"{kind} {name!r} is already registered: give this one another name "
            f'(@app.{kind}("other_name"))'
        )


# The API takes task and callback names of at most this many characters.
MAX_REGISTERED_NAME_CHARS = 200


def _storable_name(name: object) -> bool:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_REGISTERED_NAME_CHARS:
        return False
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in name


def _is_async(fn: object) -> bool:
    # A coroutine function, a functools.partial of one, or an object whose __call__ is one.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the bound __call__ of an instance
    )

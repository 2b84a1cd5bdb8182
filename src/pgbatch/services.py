"""Typed keys under which one workload offers a service to others through the App.

A workload never imports another (tests/unit/test_layers.py). When one needs what
another may provide (the vectors workload's OpenAI embedder wants the LLM workload's
shared rate limits), the core names the service: a protocol and a `ServiceKey` for it,
in a base module both may import. The provider registers an implementation when it is
installed (`app.provide(KEY, impl)`); a consumer asks for it (`app.service(KEY)`) and
gets None when no installed workload provides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["ServiceKey"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServiceKey(Generic[T]):
    """The name of a service and, through its type parameter, the protocol it follows."""

    name: str

"""What a workload gives an App: its tasks, its migrations and its HTTP router."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgbatch.db.migrations import Component
from pgbatch.db.retention import PruneHook

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = ["Workload"]


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload package's plug: `app.use(workload)` installs it on an App.

    `install` registers its tasks and hooks; `migrations_package` holds its `migrations/`
    (applied with pgbatch's own, recorded under `name`); `router` returns its FastAPI
    router, imported only when the API is served, so a library user needs no web stack;
    `metrics` returns Prometheus text-format lines that /metrics appends to its own.
    """

    name: str
    install: Callable[[App], None]
    migrations_package: str | None = None
    router: Callable[[], Any] | None = None
    metrics: Callable[[App], Awaitable[bytes]] | None = None
    # Called in each chunk of a pruned batch's removal: (conn, batch id, max rows) -> rows
    # deleted; retention keeps calling until it returns 0 (db/retention.py).
    prune_rows: PruneHook | None = None

    @property
    def component(self) -> Component | None:
        """Return the workload's migrations as a component of the runner, if it has any."""
        if self.migrations_package is None:
            return None
        return Component(self.name, self.migrations_package)

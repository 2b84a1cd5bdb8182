"""The layers point down: `api`/`cli` → `app` → `engine` | `writer` → `db` → models.

Walks `src/pgbatch` with `ast` and fails on an import that points up, sideways between
peers, or from the core into a workload, and on SQL executed outside `db/` and a
workload's own query modules (`pgbatch/workloads/<name>/queries.py`). A workload's
`routes.py` sits above the API it plugs into; its `cli.py` is CLI. `KNOWN_DEBT` lists
accepted exceptions (none today); it may only shrink: an entry that no longer happens
fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pgbatch

PACKAGE = Path(pgbatch.__file__).resolve().parent

# Rank of each layer: a module may import its own layer and layers of lower rank only.
BASE, DB, COMMIT, RUNTIME, APP, WORKLOAD, API, WORKLOAD_ROUTES, CLI = range(9)
# Longest prefix wins. The package facade (`FACADE`) may import anything; any other module
# must have a layer, so a new module is placed on purpose.
LAYERS: dict[str, tuple[str, int]] = {
    "pgbatch.models": ("base", BASE),
    "pgbatch.errors": ("base", BASE),
    "pgbatch.config": ("base", BASE),
    "pgbatch.tasks": ("base", BASE),
    "pgbatch.sizing": ("base", BASE),
    "pgbatch.export": ("base", BASE),
    "pgbatch.metrics": ("base", BASE),
    "pgbatch.json_values": ("base", BASE),
    "pgbatch.limits": ("base", BASE),
    "pgbatch.fleet": ("base", BASE),
    "pgbatch.labels": ("base", BASE),
    "pgbatch.terminal": ("base", BASE),
    "pgbatch.services": ("base", BASE),
    "pgbatch.ratelimits": ("base", BASE),
    "pgbatch.db": ("db", DB),
    "pgbatch.engine.group_commit": ("commit", COMMIT),
    "pgbatch.engine": ("engine", RUNTIME),
    "pgbatch.writer": ("writer", RUNTIME),
    "pgbatch.app": ("app", APP),
    "pgbatch.workload": ("app", APP),
    "pgbatch.progress": ("app", APP),
    "pgbatch.workloads": ("workloads", WORKLOAD),
    "pgbatch.api": ("api", API),
    "pgbatch.cli": ("cli", CLI),
    "pgbatch.fleet_cli": ("cli", CLI),
    "pgbatch.demo": ("cli", CLI),
}
FACADE = {"pgbatch", "pgbatch.__main__"}
# What the HTTP API may import besides itself: it reads and writes through App only.
API_MAY_IMPORT = {"base", "app", "api"}
# Only these layers run SQL; a workload runs it in its own query modules.
SQL_LAYERS = {"db"}
SQL_CALLS = {"execute", "executemany", "copy", "stream"}
# Apps shipped for the demo: user code, which writes its own tables as any app may.
APPS = {"pgbatch.demo.llm_app", "pgbatch.demo.llm_openai_app"}

# (importer, imported or "sql") pairs accepted for now; issue 14 paid the last of them.
KNOWN_DEBT: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _workload_of(module: str) -> str | None:
    """Return the workload package a module belongs to (`collections`), if any."""
    parts = module.split(".")
    return parts[2] if len(parts) >= 3 and parts[1] == "workloads" else None


def _layer(module: str) -> tuple[str, int] | None:
    # A workload's router sits above the API it plugs into (it uses the API's auth and
    # error shape) and below the CLI that serves it.
    if _workload_of(module) and module.endswith(".routes"):
        return ("workload routes", WORKLOAD_ROUTES)
    # A workload's commands (`workloads/<name>/cli.py`, a Typer sub-app) are CLI.
    if _workload_of(module) and module.endswith(".cli"):
        return ("cli", CLI)
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Return the pgbatch modules imported outside `if TYPE_CHECKING:` blocks."""
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    imported = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported.extend(alias.name for alias in node.names)
    return [name for name in imported if name == "pgbatch" or name.startswith("pgbatch.")]


def _runs_sql(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in SQL_CALLS
        and bool(node.args)  # a statement; `request.stream()` or `hash.copy()` take none
        and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "asyncio")
        for node in ast.walk(tree)
    )


def _is_workload_query_module(module: str) -> bool:
    parts = module.split(".")
    return len(parts) >= 4 and parts[1] == "workloads" and parts[3] in {"db", "queries"}


def violations() -> set[tuple[str, str]]:
    """Return every (importer, imported) that breaks the layers, and (module, "sql")."""
    found: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        own = _layer(module)
        if own is None:
            if module not in FACADE:
                found.add((module, "no layer"))
            continue
        own_name, own_rank = own
        tree = ast.parse(path.read_text(), filename=str(path))
        for imported in _runtime_imports(tree):
            target = _layer(imported)
            if target is None:
                continue
            name, rank = target
            own_workload, other_workload = _workload_of(module), _workload_of(imported)
            if own_workload and other_workload and own_workload != other_workload:
                found.add((module, imported))  # one workload never imports another
                continue
            if name == own_name or (own_workload and own_workload == other_workload):
                continue
            upward = rank > own_rank
            sideways = rank == own_rank
            into_workload = other_workload is not None and own_name != "cli"
            api_bypass = own_name == "api" and name not in API_MAY_IMPORT
            if upward or sideways or into_workload or api_bypass:
                found.add((module, imported))
        if _runs_sql(tree) and own_name not in SQL_LAYERS and module not in APPS:
            if not _is_workload_query_module(module):
                found.add((module, "sql"))
    return found


def test_no_import_points_up_or_sideways_and_sql_stays_in_db() -> None:
    new = violations() - KNOWN_DEBT
    assert not new, "imports or SQL that break the layers:\n" + "\n".join(sorted(map(str, new)))


def test_known_debt_only_shrinks() -> None:
    paid = KNOWN_DEBT - violations()
    assert not paid, "no longer happens, remove from KNOWN_DEBT:\n" + "\n".join(
        sorted(map(str, paid))
    )

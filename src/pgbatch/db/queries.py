"""Load every query from the `sql/*.sql` files into a name → query map.

A line `-- include: other` inside a query is replaced by the text of the query `other`,
so statements that share a part (a CTE and the answer built on it) write it once.
`pgbatch sql NAME` prints a query with its includes expanded, as the server receives
it, to paste into psql (its `%(name)s` placeholders still to fill).
"""

from __future__ import annotations

import re
from functools import cached_property
from importlib import resources

__all__ = ["QueryMap", "expand_includes", "parse_queries", "query"]

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_INCLUDE = re.compile(r"^[ \t]*-- include: (\w+)[ \t]*$", re.MULTILINE)
# Includes nest at most this deep: deeper means a cycle.
MAX_INCLUDE_DEPTH = 8


def parse_queries(text: str) -> dict[str, str]:
    """Split one `.sql` file into its named queries (a `-- name: x` line starts each)."""
    queries: dict[str, str] = {}
    headers = list(_HEADER.finditer(text))
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        end = following.start() if following else len(text)
        body = text[header.end() : end].strip()
        name = header.group(1)
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.rstrip(";").strip()
    return queries


def expand_includes(queries: dict[str, str]) -> dict[str, str]:
    """Return the queries with every `-- include: name` line replaced by that query's text."""

    def expand(name: str, depth: int) -> str:
        if depth > MAX_INCLUDE_DEPTH:
            raise ValueError(f"query {name!r} includes itself, or nests too deep")

        def replace(match: re.Match[str]) -> str:
            included = match.group(1)
            if included not in queries:
                raise ValueError(f"query {name!r} includes {included!r}, which does not exist")
            return expand(included, depth + 1)

        return _INCLUDE.sub(replace, queries[name])

    return {name: expand(name, 0) for name in queries}


class QueryMap:
    """The named queries of one package's `sql/*.sql` files, loaded on first use.

    pgbatch's own queries are `query` (pgbatch.db); a workload keeps its SQL in its own
    package and map, so its names cannot collide with the core's.
    """

    def __init__(self, package: str, folder: str = "sql") -> None:
        """Map the queries of `package`'s `folder`."""
        self.package = package
        self.folder = folder

    @cached_property
    def _queries(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        files = resources.files(self.package).joinpath(self.folder).iterdir()
        for entry in sorted(files, key=str):
            if not entry.name.endswith(".sql"):
                continue
            for name, body in parse_queries(entry.read_text(encoding="utf-8")).items():
                if name in merged:
                    raise ValueError(f"query {name!r} is defined in two files")
                merged[name] = body
        return expand_includes(merged)

    def __call__(self, name: str) -> str:
        """Return the SQL text of the query called `name`."""
        try:
            return self._queries[name]
        except KeyError:
            where = f"{self.package.replace('.', '/')}/{self.folder}"
            raise KeyError(f"no query named {name!r} in {where}") from None


query = QueryMap("pgbatch.db")

"""Load every query from the `sql/*.sql` files into a name → query map."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

__all__ = ["parse_queries", "query"]

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


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


@cache
def _all_queries() -> dict[str, str]:
    merged: dict[str, str] = {}
    for entry in sorted(resources.files("pgbatch.db").joinpath("sql").iterdir(), key=str):
        if not entry.name.endswith(".sql"):
            continue
        for name, body in parse_queries(entry.read_text(encoding="utf-8")).items():
            if name in merged:
                raise ValueError(f"query {name!r} is defined in two files")
            merged[name] = body
    return merged


def query(name: str) -> str:
    """Return the SQL text of the query called `name`."""
    try:
        return _all_queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in pgbatch/db/sql") from None

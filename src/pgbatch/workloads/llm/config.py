"""The deployment's LLM configuration: named upstreams, their shared limits, the price table.

Read from a TOML file named by `PGBATCH_LLM_CONFIG` and/or environment variables (the
file wins for what it names; docs/llm.md shows both):

    [upstreams.default]
    base_url = "http://127.0.0.1:8000/v1"
    api_key_env = "OPENAI_API_KEY"      # or api_key = "..." (never echoed)
    models = { "gpt-4o-mini" = "llama3" }
    max_concurrency = 64                # requests in flight from one worker process
    timeout_s = 600
    max_attempts = 3                    # sends per request on 5xx / timeouts
    [upstreams.default.limit]           # shared by every worker, kept in PostgreSQL
    rpm = 600
    tpm = 60000
    max_in_flight = 32
    per_model = false                   # true: one limit per (upstream, model)
    settle = "prompt"                   # or "total" (see Limit)
    [prices]
    "gpt-4o-mini" = { input = 0.15, output = 0.60, cached_input = 0.075 }

Without a file, `PGBATCH_LLM_BASE_URL`, `PGBATCH_LLM_API_KEY`, `PGBATCH_LLM_RPM`,
`PGBATCH_LLM_TPM`, `PGBATCH_LLM_MAX_IN_FLIGHT`, `PGBATCH_LLM_MAX_CONCURRENCY`,
`PGBATCH_LLM_TIMEOUT_S` and `PGBATCH_LLM_MAX_ATTEMPTS` describe the upstream "default",
and `PGBATCH_LLM_PRICES` names a JSON price table.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from pgbatch.errors import ConfigurationError
from pgbatch.workloads.llm.upstream import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_TIMEOUT_S,
    UpstreamConfig,
)
from pgbatch.workloads.llm.usage import Price, parse_prices

__all__ = ["DEFAULT_UPSTREAM", "Limit", "LlmConfig", "Upstream", "load_config"]

DEFAULT_UPSTREAM = "default"
# Sends of one request when the upstream answers 5xx or times out: two more chances
# cover a blip; more would hold the shard's lease against an upstream that is down.
DEFAULT_MAX_ATTEMPTS = 3

_UPSTREAM_FIELDS = {
    "base_url", "api_key", "api_key_env", "models", "max_concurrency", "timeout_s",
    "max_attempts", "limit",
}  # fmt: skip
_LIMIT_FIELDS = {"rpm", "tpm", "max_in_flight", "per_model", "settle", "name"}


@dataclass(frozen=True, slots=True)
class Limit:
    """A shared rate limit of one upstream key: requests and tokens per minute, in flight.

    `settle` says what a request costs once answered: "prompt" (the real prompt tokens
    plus the answer's cap, as OpenAI counts a request at admission) or "total" (the real
    prompt and completion tokens, for a provider that counts what was generated).
    `name` is the limit's row in PostgreSQL: two upstreams with one key share a name.
    """

    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None
    per_model: bool = False
    settle: Literal["prompt", "total"] = "prompt"

    def key(self, model: str) -> str:
        """Return the name of the limit row a request for `model` is charged to."""
        return f"{self.name}/{model}" if self.per_model else self.name


@dataclass(frozen=True, slots=True)
class Upstream:
    """One named upstream: where to send (with its key), how hard, and its shared limit."""

    name: str
    config: UpstreamConfig
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    limit: Limit | None = None

    def describe(self) -> dict[str, Any]:
        """Return what may be shown of it (API, CLI, logs): everything but the key."""
        limit = self.limit
        return {
            "name": self.name,
            "base_url": self.config.base_url,
            "has_api_key": self.config.api_key is not None,
            "models": dict(self.config.models),
            "max_concurrency": self.config.max_concurrency,
            "timeout_s": self.config.timeout_s,
            "max_attempts": self.max_attempts,
            "limit": None
            if limit is None
            else {
                "name": limit.name,
                "rpm": limit.rpm,
                "tpm": limit.tpm,
                "max_in_flight": limit.max_in_flight,
                "per_model": limit.per_model,
                "settle": limit.settle,
            },
        }


@dataclass(frozen=True, slots=True)
class LlmConfig:
    """The upstreams by name and the price table (US dollars per million tokens)."""

    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    prices: Mapping[str, Price] = field(default_factory=dict)

    def upstream(self, name: str) -> Upstream:
        """Return the named upstream; ConfigurationError naming the known ones if absent."""
        found = self.upstreams.get(name)
        if found is None:
            known = ", ".join(sorted(self.upstreams)) or "none"
            raise ConfigurationError(
                f"no LLM upstream {name!r} is configured (configured: {known}); "
                "set PGBATCH_LLM_BASE_URL or PGBATCH_LLM_CONFIG (docs/llm.md)"
            )
        return found


def load_config(environ: Mapping[str, str] | None = None) -> LlmConfig:
    """Read the configuration from PGBATCH_LLM_CONFIG's file and/or PGBATCH_LLM_* variables."""
    env = os.environ if environ is None else environ
    upstreams: dict[str, Upstream] = {}
    prices: dict[str, Price] = {}
    path = env.get("PGBATCH_LLM_CONFIG")
    if path:
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"PGBATCH_LLM_CONFIG={path}: {exc}") from exc
        for name, table in (document.get("upstreams") or {}).items():
            upstreams[name] = _upstream(name, table, env, source=path)
        prices.update(_prices(document.get("prices") or {}, source=path))
    if DEFAULT_UPSTREAM not in upstreams and env.get("PGBATCH_LLM_BASE_URL"):
        entry: dict[str, Any] = {"base_url": env["PGBATCH_LLM_BASE_URL"]}
        if env.get("PGBATCH_LLM_API_KEY"):
            entry["api_key"] = env["PGBATCH_LLM_API_KEY"]
        for variable, name in (
            ("PGBATCH_LLM_MAX_CONCURRENCY", "max_concurrency"),
            ("PGBATCH_LLM_TIMEOUT_S", "timeout_s"),
            ("PGBATCH_LLM_MAX_ATTEMPTS", "max_attempts"),
        ):
            if env.get(variable):
                entry[name] = _number(env[variable], variable)
        limit = {
            name: _number(env[variable], variable)
            for variable, name in (
                ("PGBATCH_LLM_RPM", "rpm"),
                ("PGBATCH_LLM_TPM", "tpm"),
                ("PGBATCH_LLM_MAX_IN_FLIGHT", "max_in_flight"),
            )
            if env.get(variable)
        }
        if limit:
            entry["limit"] = limit
        upstreams[DEFAULT_UPSTREAM] = _upstream(DEFAULT_UPSTREAM, entry, env, source="environment")
    if env.get("PGBATCH_LLM_PRICES"):
        source = env["PGBATCH_LLM_PRICES"]
        try:
            table = orjson.loads(Path(source).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigurationError(f"PGBATCH_LLM_PRICES={source}: {exc}") from exc
        if not isinstance(table, dict):
            raise ConfigurationError(f"PGBATCH_LLM_PRICES={source}: must be a JSON object")
        prices.update(_prices(table, source=source))
    return LlmConfig(upstreams, prices)


def _number(raw: str, variable: str) -> int | float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{variable} must be a number, not {raw!r}") from None
    return int(value) if value.is_integer() else value


def _prices(table: Mapping[str, Any], *, source: str) -> dict[str, Price]:
    try:
        return parse_prices(table)
    except ValueError as exc:
        raise ConfigurationError(f"{source}: {exc}") from exc


def _upstream(name: str, entry: Any, env: Mapping[str, str], *, source: str) -> Upstream:
    where = f"{source}: upstream {name!r}"
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where} must be a table")
    unknown = set(entry) - _UPSTREAM_FIELDS
    if unknown:
        raise ConfigurationError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    api_key = entry.get("api_key")
    if entry.get("api_key_env"):
        api_key = env.get(str(entry["api_key_env"]))
        if api_key is None:
            raise ConfigurationError(f"{where}: api_key_env {entry['api_key_env']} is not set")
    models = entry.get("models") or {}
    if not isinstance(models, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in models.items()
    ):
        raise ConfigurationError(f"{where}: models must map names to names")
    max_attempts = entry.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigurationError(f"{where}: max_attempts must be an integer >= 1")
    try:
        config = UpstreamConfig(
            base_url=str(entry.get("base_url", "")),
            api_key=api_key,
            models=dict(models),
            timeout_s=float(entry.get("timeout_s", DEFAULT_TIMEOUT_S)),
            max_concurrency=int(entry.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    return Upstream(name, config, max_attempts, _limit(name, entry.get("limit"), where))


def _limit(upstream: str, entry: Any, where: str) -> Limit | None:
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where}: limit must be a table")
    unknown = set(entry) - _LIMIT_FIELDS
    if unknown:
        raise ConfigurationError(f"{where}: limit has unknown field {sorted(unknown)[0]!r}")
    values: dict[str, int | None] = {}
    for name in ("rpm", "tpm", "max_in_flight"):
        value = entry.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigurationError(f"{where}: limit.{name} must be an integer >= 1")
        values[name] = value
    settle = entry.get("settle", "prompt")
    if settle not in ("prompt", "total"):
        raise ConfigurationError(f"{where}: limit.settle must be 'prompt' or 'total'")
    return Limit(
        name=str(entry.get("name") or upstream),
        rpm=values["rpm"],
        tpm=values["tpm"],
        max_in_flight=values["max_in_flight"],
        per_model=bool(entry.get("per_model", False)),
        settle=settle,
    )

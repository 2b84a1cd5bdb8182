"""The LLM workload's configuration: named upstreams from a TOML file or the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgbatch.errors import ConfigurationError
from pgbatch.workloads.llm.config import load_config

TOML = """
[upstreams.default]
base_url = "http://127.0.0.1:8000/v1"
api_key_env = "MY_KEY"
models = { "gpt-4o-mini" = "llama3" }
max_concurrency = 16
max_attempts = 2
[upstreams.default.limit]
rpm = 600
tpm = 60000
max_in_flight = 8
per_model = true
settle = "total"
[upstreams.local]
base_url = "http://127.0.0.1:11434/v1"
[prices]
"gpt-4o-mini" = { input = 0.15, output = 0.6 }
"""


def test_a_file_names_upstreams_limits_and_prices(tmp_path: Path) -> None:
    path = tmp_path / "llm.toml"
    path.write_text(TOML)
    config = load_config({"PGBATCH_LLM_CONFIG": str(path), "MY_KEY": "sk-file-key"})
    default = config.upstream("default")
    assert default.config.api_key == "sk-file-key"
    assert default.config.models == {"gpt-4o-mini": "llama3"}
    assert (default.config.max_concurrency, default.max_attempts) == (16, 2)
    assert default.limit is not None
    assert (default.limit.rpm, default.limit.tpm, default.limit.max_in_flight) == (600, 60000, 8)
    assert default.limit.key("gpt-4o-mini") == "default/gpt-4o-mini"
    assert default.limit.settle == "total"
    assert config.upstream("local").limit is None
    assert config.prices["gpt-4o-mini"].output == 0.6
    assert "sk-file-key" not in repr(config) and "sk-file-key" not in str(default.describe())


def test_the_environment_describes_the_default_upstream() -> None:
    config = load_config({"PGBATCH_LLM_BASE_URL": "http://h/v1", "PGBATCH_LLM_API_KEY": "k",
                          "PGBATCH_LLM_RPM": "100", "PGBATCH_LLM_TPM": "5000"})  # fmt: skip
    upstream = config.upstream("default")
    assert upstream.limit is not None and (upstream.limit.rpm, upstream.limit.tpm) == (100, 5000)
    assert upstream.limit.max_in_flight is None
    with pytest.raises(ConfigurationError, match=r"no LLM upstream 'other'.*default"):
        config.upstream("other")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[upstreams.a]\nbase_url = "ftp://x"', "base_url"),
        ('[upstreams.a]\nbase_url = "http://x"\nbogus = 1', "unknown field 'bogus'"),
        ('[upstreams.a]\nbase_url = "http://x"\n[upstreams.a.limit]\nrpm = 0', "limit.rpm"),
        ('[upstreams.a]\nbase_url = "http://x"\n[upstreams.a.limit]\nsettle = "x"', "settle"),
        ('[upstreams.a]\nbase_url = "http://x"\napi_key_env = "UNSET_VAR"', "UNSET_VAR"),
        ("[prices]\nm = { input = -1, output = 1 }", "input"),
        ("[upstreams.a\n", "PGBATCH_LLM_CONFIG"),
    ],
)
def test_a_bad_file_names_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "llm.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        load_config({"PGBATCH_LLM_CONFIG": str(path)})


def test_a_bad_number_in_the_environment_is_named() -> None:
    with pytest.raises(ConfigurationError, match="PGBATCH_LLM_RPM"):
        load_config({"PGBATCH_LLM_BASE_URL": "http://h/v1", "PGBATCH_LLM_RPM": "lots"})

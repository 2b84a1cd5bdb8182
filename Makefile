# Set-up and checks. `make demo` and `make test` work on a fresh machine: they build .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint unit soak bench clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pgbatch needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: $(BIN)/.installed
	$(BIN)/pgbatch demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The whole suite against the embedded PostgreSQL, or DATABASE_URL when set; long
# chaos/soak runs are excluded (see `make soak`).
test: lint
	$(BIN)/python -m pytest

unit: $(BIN)/.installed
	$(BIN)/python -m pytest tests/unit

# The long chaos/soak runs (minutes).
soak: $(BIN)/.installed
	$(BIN)/python -m pytest -m long -o addopts='-p no:cacheprovider'

bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/ingest.py --private-server

clean:
	rm -rf $(VENV) build dist src/*.egg-info

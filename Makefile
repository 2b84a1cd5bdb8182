# Set-up and checks. `make demo` and `make test` work on a fresh machine: they build .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test suite lint unit soak fuzz bench browser clean

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
test: lint browser suite

# The suite alone, on TEST_WORKERS pytest-xdist processes (0: in this one, serially).
# Its tests mostly wait (on PostgreSQL, subprocesses, timers), so two workers on two
# cores take about half the serial time; each worker has its own template database and
# every test its own database, on one shared server. Tests marked `exclusive` run while
# the other worker waits (tests/conftest.py). `--dist load` hands out tests by index:
# schemathesis gives its 47 generated tests one node id, and the by-name schedulers
# (loadgroup, loadscope) ran only the first. A plain `pytest tests/...` runs serially.
TEST_WORKERS ?= 2
suite: $(BIN)/.installed
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist load

# The dashboard's browser test drives Debian's chromium (Playwright's own browser
# download does not work offline). Installed when missing and we may; otherwise that
# one test says why it is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the browser test"; \
			(apt-get install -y -q chromium >/dev/null 2>&1 || \
			 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
			echo "could not install chromium: the browser test will be skipped"; \
		else echo "chromium missing (apt-get install chromium): the browser test will be skipped"; fi; }

unit: $(BIN)/.installed
	$(BIN)/python -m pytest tests/unit

# The long chaos/soak runs (minutes).
soak: $(BIN)/.installed
	$(BIN)/python -m pytest -m long -o addopts='-p no:cacheprovider'

# The long API fuzzing run (schemathesis against our own OpenAPI); `make test` runs a
# bounded one.
fuzz: $(BIN)/.installed
	PGBATCH_FUZZ_EXAMPLES=500 $(BIN)/python -m pytest tests/api/test_schemathesis.py -m 'long or not long' -o addopts='-p no:cacheprovider'

bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/ingest.py --private-server
	$(BIN)/python benchmarks/ingest_http.py --private-server --rounds 3
	$(BIN)/python benchmarks/collection_copy.py
	$(BIN)/python benchmarks/api_results.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info

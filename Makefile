# sluice: `make run` serves api + worker on :8080 with the real model; `make test` runs every gate.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sluice-installed

.PHONY: install llama-server run test lint fmt bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# llama-cpp-python comes from our own portable wheel (deploy/llama-wheel.sh caches it outside the
# repo); only then is the project installed, so pip finds that requirement already satisfied.
$(STAMP): pyproject.toml deploy/llama-wheel.sh | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$$(PYTHON=$(BIN)/python bash deploy/llama-wheel.sh)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

# llama.cpp's own server: the benchmark's anchor and the tests' real upstream engine
# (deploy/llama-server.sh builds it once, about 8 minutes on 2 cores, and caches it like the wheel).
llama-server: install
	PYTHON=$(BIN)/python bash deploy/llama-server.sh >/dev/null

run: install
	$(BIN)/sluice dev

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint llama-server
	rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

# Each writes bench/results/<name>.json (and .png) and prints its table; see README, Benchmarks.
BENCHES := seed_acceptance peers overhead concurrency supervision scaling batching worker_connections upstream gateways engine_clients

bench: install
	for b in $(BENCHES); do $(BIN)/python -m bench.$$b || exit 1; done
	$(BIN)/python -m bench.batching --structured
	$(BIN)/python -m bench.batching --sampling

# What a change to the token path re-runs before it lands (about 3 minutes): 1000 streams once,
# the per-request and per-token overhead in short, supervision with quiet streams. Results go to
# bench/results/quick/, beside the full runs'.
bench-quick: install
	SLUICE_BENCH_RESULTS=bench/results/quick $(BIN)/python -m bench.concurrency --levels 1000 --rounds 1
	SLUICE_BENCH_RESULTS=bench/results/quick $(BIN)/python -m bench.overhead --requests 20 --bursts 4
	SLUICE_BENCH_RESULTS=bench/results/quick $(BIN)/python -m bench.supervision --levels 0,2000 --seconds 3

clean:
	rm -rf $(VENV) .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache

# filewatch: the single entry point, the same commands locally and in CI.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := .run
AGGREGATOR_ADDRESS ?= grpc://127.0.0.1:50051
REPLICAS ?= 1

.PHONY: help install proto check-proto fmt lint test run stop bench soak clean tools check-observability observe browser

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 24

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project (make run and make test do it too)

proto: $(STAMP) ## regenerate gen/ from proto/
	rm -f gen/*_pb2*.py gen/*_pb2*.pyi
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Igen=proto --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. proto/*.proto

check-proto: proto
	@if [ -n "$$(git status --porcelain gen/)" ]; then \
		echo "gen/ is stale: run 'make proto' and commit the result"; \
		git status --porcelain gen/; exit 1; fi

fmt: $(STAMP) ## format and fix with ruff
	$(VENV)/bin/ruff format aggregator watcher common tests bench scripts
	$(VENV)/bin/ruff check --fix aggregator watcher common tests bench scripts

lint: $(STAMP) ## ruff format --check, ruff check, mypy --strict
	$(VENV)/bin/ruff format --check aggregator watcher common tests bench scripts
	$(VENV)/bin/ruff check aggregator watcher common tests bench scripts
	$(VENV)/bin/mypy

# Debian's prometheus + promtool when missing (apt-get; starts no service).
tools:
	bash observability/install-tools.sh

# Debian's chromium + chromium-driver for the live page's browser tests (apt-get, when
# missing). If they cannot be installed, the browser tests skip and say why.
browser:
	@bash scripts/install-browser.sh || echo "make browser: Chromium could not be installed;" \
		"the live page's browser tests will be skipped" >&2

# promtool check config / check rules / test rules, and the dashboard's JSON.
check-observability: tools
	bash observability/check.sh

test: $(STAMP) check-proto lint check-observability browser ## the whole suite (what CI runs)
	$(PY) -m pytest

# Prometheus on 127.0.0.1:9090 scraping `make run` (foreground; Ctrl-C stops it).
observe: tools ## a local Prometheus on 127.0.0.1:9090 scraping make run
	@bash observability/run_prometheus.sh

run: $(STAMP) ## start the aggregator and two watchers in the background (REPLICAS=2: two aggregators)
	@$(PY) scripts/devrun.py start --aggregator-address '$(AGGREGATOR_ADDRESS)' --replicas '$(REPLICAS)'

stop: ## stop exactly what make run started
	@$(PYTHON) scripts/devrun.py stop

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]' || echo "bench extra not installed: no lag.png, no profiles"
	touch $(BENCH_STAMP)

# Every benchmark scenario (several minutes); QUICK=1 is the one-minute smoke run.
bench: $(BENCH_STAMP) ## the benchmarks and their tables (QUICK=1: a one-minute run)
	$(PY) bench/run.py $(if $(QUICK),--quick) $(BENCH_ARGS)

# The full load test: 200 watchers x 1,000 files, 60 s of churn, three rounds (~5 min).
soak: $(STAMP) ## the full load test: memory level across repeated rounds
	FILEWATCH_SOAK=1 $(PY) -m pytest -p no:cacheprovider -s tests/faults/test_load.py

clean: stop ## stop, then remove .run and the caches
	rm -rf $(RUN) .mypy_cache .ruff_cache .pytest_cache

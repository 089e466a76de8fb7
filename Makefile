# The two commands of the README: `make serve` and `make test` (both set up a fresh machine first).
PY := .venv/bin/python

.PHONY: setup serve test test-all bench lint

setup:
	./scripts/setup.sh

serve: setup
	.venv/bin/tgq serve

# Everything CI runs: unit, API, integration and real-model tests (not the long soak/load suite).
test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.suite $(BENCH_ARGS)

lint: setup
	.venv/bin/ruff check .

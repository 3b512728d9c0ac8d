# Every target sets up .venv on first use, so a fresh clone needs nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-table test test-all bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/amortize train recipes/default.yaml save_overwrite=true   # a rerun replaces runs/default and prints the same numbers
	$(BIN)/amortize eval runs/default/latest-rank0.pt

# runs the demo again and rewrites its table in README.md and docs/index.md (with date, time, CPU, commit)
demo-table: $(STAMP)
	$(BIN)/python scripts/demo_table.py --run

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks tests/studies -m benchmark -q --benchmark-json=results/benchmarks/results.json
	$(BIN)/python -m studies.transfer --quick   # the transfer suite, 2 epochs (full run: docs/benchmarks.md)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf site build dist .hypothesis .benchmarks

# Every target sets up .venv on first use, so a fresh clone needs nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-table test test-all bench bench-all docs clean

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

# the quick set (docs/benchmarks.md says how long each takes): the losses at B = 1024, the estimator accuracy at
# B = 32 and 128, the step overhead at batch 32, then the transfer suite's 2-epoch version; it leaves the
# committed reports alone (its numbers: results/benchmarks/results.json)
bench: $(STAMP)
	AMORTIZE_BENCH=quick $(BIN)/python -m pytest tests/benchmarks -m benchmark -q --benchmark-json=results/benchmarks/results.json
	$(BIN)/python -m studies.transfer --quick   # the transfer suite, 2 epochs (full run: docs/benchmarks.md)

# every benchmark (B up to 16384, the microbatch sweep) and the studies' short runs; rewrites results/benchmarks/<name>.{json,md,png}
bench-all: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks tests/studies -m benchmark -q --benchmark-json=results/benchmarks/results.json
	$(BIN)/python -m studies.transfer --quick

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf site build dist .hypothesis .benchmarks

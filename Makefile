# make demo  -> creates .venv on first use, runs the main job (the driving demo, ~10 min on 2 CPUs) on built-in defaults
# make test  -> creates .venv on first use, runs the test suite (CI runs exactly this)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench bench-driving lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	@# CPU machines get the CPU build of torch (an unpinned torch resolves to a multi-GB CUDA build)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install "torch>=2.2"; \
	else \
		$(BIN)/python -m pip install "torch==2.13.0"; \
	fi
	$(BIN)/python -m pip install -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/trajgen demo --out-dir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_solvers.py --out runs/bench_solvers.json

bench-driving: $(STAMP)
	$(BIN)/python scripts/bench_driving.py --out-dir runs/bench_driving

lint: $(STAMP)
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check trajgen envs agents scripts tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

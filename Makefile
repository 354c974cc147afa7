# Every target installs what it needs into .venv first (a fresh clone needs nothing else).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

# make perf options: MODEL=DIR (any model folder), LAYERS=32 (full-depth synthetic Phi-4-mini), ARGS="..."
LAYERS ?= 4
MODEL  ?=
ARGS   ?=

.PHONY: install build test test-fast perf profile bench lint clean serve serve-bench

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard kernels/*.pyx)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel "cython>=3.0" "numpy>=1.24"
	$(PIP) install -q --no-build-isolation -e ".[dev,bench,serve,ray]"
	touch $(STAMP)

build: install
	$(PY) setup.py -q build_ext --inplace

test: install build
	$(PY) -m pytest -q

test-fast: install build
	$(PY) -m pytest -q -m "not slow"

perf: install build
	$(PY) -m perf.run --layers $(LAYERS) $(if $(MODEL),--model $(MODEL)) $(ARGS)

profile: install build
	$(PY) -m perf.profile --layers $(LAYERS) $(if $(MODEL),--model $(MODEL)) $(ARGS)

bench: install build
	$(PY) -m pytest -q perf/ --benchmark-only --benchmark-enable -p no:cacheprovider

# the OpenAI-compatible server on the built-in synthetic model (MODEL=DIR for another), 127.0.0.1:8000
serve: install build
	$(PY) -m engine serve --model "$(if $(MODEL),$(MODEL),$$($(PY) -c 'from perf.serve_bench import default_model; print(default_model())'))" $(if $(MODEL),,--model-name synthetic-small) $(ARGS)

# serialised vs continuous batching at 1, 8 and 32 concurrent clients (a couple of minutes)
serve-bench: install build
	$(PY) -m perf.serve_bench $(if $(MODEL),--model $(MODEL)) $(ARGS)

lint: install
	$(VENV)/bin/ruff check engine tests perf setup.py
	$(VENV)/bin/ruff format --check engine tests perf setup.py

clean:
	rm -rf build dist *.egg-info engine/_kernels/*.so engine/_kernels/*.c kernels/*.c .pytest_cache .ruff_cache

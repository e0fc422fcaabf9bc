# Two commands for a fresh machine with Python 3.11+ and pip:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# Test files run in parallel worker processes (pytest-xdist), a file per worker so module fixtures
# (servers, compiled engines) are built once: ~9 minutes instead of ~12 on a 2-core machine.
TEST_WORKERS ?= 2

.PHONY: serve test test-fast lint install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# `make serve` starts the OpenAI-compatible server (python -m scalellm_jax.server --help): without
# --model in ARGS, a built-in random-weight Mixtral-architecture demo at http://127.0.0.1:8000/v1.
serve: $(VENV)/.installed
	$(PY) -m scalellm_jax.server $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info

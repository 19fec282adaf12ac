# The two commands of the README: `make run` and `make test`. Each installs into .venv
# first when needed (and only then: the stamp file is newer than pyproject.toml).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.arr_coc-installed
PYTEST_ARGS ?=

.PHONY: install run test test-slow bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, together: the builds that lie on this machine's disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# Everything else under a constraints file that keeps those two pinned.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m arr_coc.info

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks

clean-venv:
	rm -rf $(VENV)

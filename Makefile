# Tessera: README's two commands are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ENV := . .tessera/env.sh &&

.PHONY: setup demo test test-fast storage-up storage-down ray-up ray-down stack-up stack-down lint clean-state

setup: $(STAMP)

# pip (not uv/poetry) so that torch 2.14.1 is taken from the machine's local wheel cache when present.
$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (a few minutes the first time; log in $(VENV)/install.log)"
	@$(PY) -m pip install --disable-pip-version-check -q -e '.[dev,bench]' > $(VENV)/install.log 2>&1 \
		|| { tail -40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

storage-up: setup
	@$(VENV)/bin/tessera storage up

storage-down:
	@$(VENV)/bin/tessera storage down

ray-up: setup
	@$(VENV)/bin/tessera ray up

ray-down:
	@$(VENV)/bin/tessera ray down

stack-up: storage-up ray-up
stack-down: ray-down storage-down

demo: stack-up
	@$(ENV) $(VENV)/bin/ray job submit --working-dir . -- python -m jobs.make_corpus --config configs/corpus.yaml

test: setup
	@$(PY) -m pytest -q

test-fast: setup
	@$(PY) -m pytest -q -m "not slow"

lint: setup
	@$(VENV)/bin/ruff check platform jobs serve_apps bench tests

clean-state: stack-down
	rm -rf .tessera

# Tessera: README's two commands are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the stack's state folder: $TESSERA_HOME when set (as the tessera CLI reads it), else .tessera
STATE := $(or $(TESSERA_HOME),.tessera)
ENV := . $(STATE)/env.sh &&

# the steps share .tessera/env.sh and start on each other's services: never in parallel (make -j)
.NOTPARALLEL:

.PHONY: setup demo test test-fast storage-up storage-down ray-up ray-down prometheus-up prometheus-down stack-up stack-down lint clean-state

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

# after the store: the head hands its credentials (from .tessera/env.sh) to every job's S3 client
ray-up: storage-up
	@$(VENV)/bin/tessera ray up

# also stops the head's Prometheus
ray-down:
	@$(VENV)/bin/tessera ray down

# Prometheus on 127.0.0.1:9090 scraping the head, when `prometheus` is installed (one line saying it is skipped otherwise)
prometheus-up: ray-up
	@$(VENV)/bin/tessera prometheus up

prometheus-down:
	@$(VENV)/bin/tessera prometheus down

stack-up: storage-up ray-up
stack-down: ray-down storage-down

SUBMIT := $(ENV) $(VENV)/bin/ray job submit --working-dir . --
# A job runs in a copy of the working dir, so the real media folder is passed as an absolute path
# (a path on this machine: on a real cluster, disable real_media or copy the media to every node).
SHARED_DATA := $(abspath ../shared/data)
demo: stack-up prometheus-up
	@echo "== 1/6 sample corpus -> s3://tessera-demo/corpus"
	@$(ENV) $(VENV)/bin/ray job submit --working-dir . \
		--runtime-env-json '{"env_vars": {"TESSERA__REAL_MEDIA__DATA_DIR": "$(SHARED_DATA)"}}' \
		-- python -m jobs.make_corpus --config configs/corpus.yaml
	@echo "== 2/6 placeholder image/audio encoder weights -> s3://tessera-demo/models/encoders"
	@$(SUBMIT) python -m jobs.make_models --out s3://tessera-demo/models/encoders
	@echo "== 3/6 embeddings (Ray Data) -> s3://tessera-demo/embeddings/demo"
	@$(SUBMIT) python -m jobs.embed --config configs/embed.yaml
	@echo "== 4/6 fusion two-tower + ranker (Ray Train) -> s3://tessera-demo/models/v1"
	@$(SUBMIT) python -m jobs.train --config configs/train.yaml --keep-existing
	@echo "== 5/6 sharded ScaNN index (Ray tasks) -> s3://tessera-demo/index/v1"
	@$(SUBMIT) python -m jobs.build_index --config configs/index.yaml --keep-existing
	@echo "== 6/6 serve deploy serve_apps/recommender.yaml -> http://127.0.0.1:8000"
	@$(ENV) $(VENV)/bin/serve deploy serve_apps/recommender.yaml
	@$(ENV) $(PY) -m serve_apps.demo_client --wait 300
	@echo "Ray dashboard: http://127.0.0.1:8265 (token in $(STATE)/ray/auth_token); shell set-up: source $(STATE)/env.sh"
	@$(VENV)/bin/tessera prometheus status || true

test: setup
	@$(PY) -m pytest -q

test-fast: setup
	@$(PY) -m pytest -q -m "not slow"

lint: setup
	@$(VENV)/bin/ruff check platform jobs serve_apps bench tests

clean-state: stack-down
	rm -rf $(STATE)

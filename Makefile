# gatecast: `make run` serves the default model (training it first only if models/ has none);
# `make test` runs the suite. Both set everything up on a fresh machine (Python 3.11 on PATH, nothing else).
#
# Each install level has its own stamp, and every stamp depends on pyproject.toml, so a dependency change
# reinstalls and nothing installs more than its target needs:
#   serve  `pip install -e .`              onnxruntime, grpc, pydantic, ... (what `gatecast serve` imports)
#   train  `pip install -e '.[train]'`     + torch and the training stack (~1.9 GB): only when a model is missing
#   dev    `pip install -e '.[train,client,dev]'` + pandas for the client, pytest, ruff, mypy: `make test`
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_REPO ?= models
DEFAULT_MODEL ?= taylor
SERVE_STAMP := $(VENV)/.installed-serve
TRAIN_STAMP := $(VENV)/.installed-train
DEV_STAMP := $(VENV)/.installed-dev
# read when make starts: `run` trains only when the default model has no version in the repository
DEFAULT_MODEL_FILES := $(wildcard $(MODEL_REPO)/$(DEFAULT_MODEL)/*/model.onnx)

.PHONY: run test setup serve-setup proto lint typecheck bench lock train-default clean cluster

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(TRAIN_STAMP): pyproject.toml $(SERVE_STAMP)
	$(PY) -m pip install --quiet -e '.[train]'
	touch $@

# dev includes train, and so serve: its stamps are refreshed too
$(DEV_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[train,client,dev]'
	touch $(SERVE_STAMP) $(TRAIN_STAMP) $@

serve-setup: $(SERVE_STAMP)

setup: $(DEV_STAMP)

train-default: $(TRAIN_STAMP)
	$(VENV)/bin/gatecast train --config training/configs/taylor.toml --repo $(MODEL_REPO)

run: $(SERVE_STAMP) $(if $(DEFAULT_MODEL_FILES),,train-default)
	$(VENV)/bin/gatecast serve --repo $(MODEL_REPO)

# three replicas over $(MODEL_REPO), Redis (the shared session store) and HAProxy (deploy/haproxy.cfg) on
# loopback; haproxy and redis-server come from Debian's packages when missing. Ctrl-C stops them all.
cluster: $(SERVE_STAMP) $(if $(DEFAULT_MODEL_FILES),,train-default)
	$(PY) -m deploy.cluster --repo $(MODEL_REPO)

test: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gatecast service training tests benchmarks
	$(VENV)/bin/pytest -q

proto: $(DEV_STAMP)
	$(PY) -m gatecast.codegen

bench: $(DEV_STAMP)
	$(PY) -m benchmarks.load --out benchmarks/results/load.json

# the images' pinned serving dependencies, from what this venv resolved for pyproject.toml (requirements/README.md)
lock: $(SERVE_STAMP)
	$(PY) requirements/lock.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

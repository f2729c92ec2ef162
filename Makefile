# gatecast: `make run` trains the default model if none exists, then serves it; `make test` runs the suite.
# Both set everything up on a fresh machine (Python 3.11 on PATH, nothing else installed by hand).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_REPO ?= models
DEFAULT_MODEL ?= taylor
STAMP := $(VENV)/.installed

.PHONY: run test setup proto lint typecheck bench train-default clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

setup: $(STAMP)

train-default: $(STAMP)
	@if ls $(MODEL_REPO)/$(DEFAULT_MODEL)/*/model.onnx >/dev/null 2>&1; then \
		echo "model $(DEFAULT_MODEL) present in $(MODEL_REPO)/"; \
	else \
		$(VENV)/bin/gatecast train --config training/configs/taylor.toml --repo $(MODEL_REPO); \
	fi

run: train-default
	$(VENV)/bin/gatecast serve --repo $(MODEL_REPO)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gatecast service training tests benchmarks
	$(VENV)/bin/pytest -q

proto: $(STAMP)
	$(PY) -m gatecast.codegen

bench: $(STAMP)
	$(PY) -m benchmarks.load --out benchmarks/results/load.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

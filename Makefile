# Every target installs what it needs first; each step is idempotent (re-running skips done work).
#   make train [ARGS="method=dino trainer.max_steps=100"]   install everything, then train
#   make test  [PYTEST_ARGS="-m 'not slow'"]                install everything, then run the tests
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssl_vit-installed

.PHONY: install data train test bench
.DEFAULT_GOAL := test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (no download at run time).
data:
	bash scripts/install_data.sh

train: install data
	$(PY) -m ssl_vit.train $(ARGS)

test: install data
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/backbone.py $(ARGS)

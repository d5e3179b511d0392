# Two entry points, each doing its own set-up on a fresh Debian machine:
#   make run   - venv + install + Fashion-MNIST, then the main job
#   make test  - venv + install + Fashion-MNIST, then lint, types and tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data run pipeline test lint

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

data:
	@test -d $(FMNIST) || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q dataset-fashion-mnist; }

run: setup
	$(PY) studies/model_size.py

pipeline: setup
	$(PY) -m scaling.pipeline configs/fmnist-cpu.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy scaling analysis

test: lint
	$(PY) -m pytest -q

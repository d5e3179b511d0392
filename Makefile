# Two entry points, each doing its own set-up on a fresh Debian machine:
#   make run   - venv + install + Fashion-MNIST, then the main job
#   make test  - venv + install + Fashion-MNIST + test tools, then lint, types and tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data test-tools run pipeline test test-fast lint

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

data:
	@test -d $(FMNIST) || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q dataset-fashion-mnist; }

# What the tests drive besides Python: sshd, rsync and nc (`ray up` over SSH on
# 127.0.0.1, tests/test_cluster.py) and Chromium (renders the report).
TOOLS := /usr/sbin/sshd rsync nc chromium
test-tools:
	@for t in $(TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q \
		openssh-server rsync netcat-openbsd chromium; fi

run: setup
	$(PY) studies/model_size.py

pipeline: setup
	$(PY) -m scaling.pipeline configs/fmnist-cpu.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy scaling analysis

# Everything (CI runs this). test-fast: the edit loop, in about 5 minutes on 2 cores:
# every test but those marked slow (Ray, studies, clusters, killed processes).
test: lint test-tools
	$(PY) -m pytest -q

test-fast: lint test-tools
	$(PY) -m pytest -q -m "not slow"

# `make demo`: set up and run the pipeline on Fashion-MNIST. `make test`: set up and run the tests.
# `make test-fast`: the tests not marked slow (no pipeline fixture, no dvc repro or sweep, none over
# ~15 s; tests/conftest.py marks what uses a training fixture), for development.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup setup-core demo test test-fast test-services docs docs-serve ui plots server \
	server-stop lint format params fashion-mnist clean

# The virtual environment, installed from the pinned constraints (a fresh install reproduces ours).
# The demo installs the package alone; the tests, the docs and `make server` add the dev and server
# extras (pyproject.toml: pytest, ruff, mkdocs, selenium, Ray, psycopg2, ...) on top.
$(VENV)/.core: pyproject.toml constraints.txt
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	  else echo "python3 -m venv failed: install python3-venv" >&2; exit 1; fi; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,server]"
	touch $@

setup-core: $(VENV)/.core
setup: $(VENV)/.installed

# The demo data: Debian's dataset-fashion-mnist (IDX files), installed when missing and root.
fashion-mnist:
	@if [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] && [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST IDX files not in $(FASHION_MNIST): 'sudo apt-get install dataset-fashion-mnist'," \
	            "or the ingest stage will try Keras's download." >&2; fi; fi

# The demo profile (conf/experiment/demo.yaml: fewer student steps at twice the learning rate, so
# it ends in about 9-10 minutes on 2 Zen 4 cores, estimated; 16 min 14 s measured on 2 vCPUs of an
# Intel Xeon: docs/speed.md) is recorded in conf/project.yaml first; `pseudolabel compose
# '~experiment'` takes it out, and `dvc repro` then runs the full recipe (what docs/gain.md measures).
demo: setup-core fashion-mnist
	pseudolabel compose +experiment=demo
	time dvc repro
	dvc metrics show metrics/evaluation.json

# Two pytest-xdist workers: most of a test's time is single-threaded (starting TensorFlow, DVC
# and MLflow in each stage process), so two cores finish the suite sooner side by side; each
# module stays on one worker (tests/conftest.py). TEST_WORKERS=0 runs it in one process. Tests
# marked `serial` (they measure the machine's CPU use) then run alone, in one process.
# $(1): a marker expression selecting the tests, or nothing for all of them.
# pytest's exit status 5 (no tests collected) is a failure, not a pass.
TEST_WORKERS ?= 2
define run_pytest
	@rc=0; sel='$(1)'; \
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	  -m "not serial$${sel:+ and ($$sel)}" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure" >&2; exit 1; fi; \
	if [ $$rc -eq 0 ]; then \
	  pytest -m "serial$${sel:+ and ($$sel)}" $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then rc=0; fi; \
	fi; \
	exit $$rc
endef

# What the tests need outside Python (PostgreSQL), installed when missing and root.
test-services:
	scripts/ensure-test-services.sh

test: setup test-services
	ruff check
	$(call run_pytest,)

test-fast: setup
	ruff check
	$(call run_pytest,not slow)

# The documentation site (mkdocs.yml, docs/): built into site/, or served with live reload.
docs: setup
	mkdocs build --strict

docs-serve: setup
	mkdocs serve

ui: setup-core
	@echo "MLflow 3's UI opens in GenAI mode: click 'Model training' (top left) once, or open" \
	  "http://127.0.0.1:5000/#/experiments/<id>?workflowType=machine_learning"
	mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

# `dvc plots show` as a page that also renders offline: DVC's own page loads Vega from a CDN;
# scripts/plots-template.py inlines it. Writes dvc_plots/index.html.
plots: setup
	python scripts/plots-template.py .dvc/tmp/plots-template.html
	dvc plots show --html-template .dvc/tmp/plots-template.html

# A team's tracking server (docs/team.md): PostgreSQL (installed when missing and root, created
# on first start in .mlflow-server/) and `mlflow server` on 127.0.0.1:5000. Stop: make server-stop.
server: setup
	scripts/tracking-server.sh

server-stop:
	scripts/postgres.sh stop $${SERVER_DIR:-.mlflow-server}/postgres

lint: setup
	ruff check
	ruff format --check src tests benchmarks docs/hooks

format: setup
	ruff format src tests benchmarks docs/hooks
	ruff check --fix

# Recompose params.yaml from conf/ after editing conf/ (DVC does this itself on `dvc exp run`).
params: setup
	pseudolabel compose

clean:
	rm -rf $(VENV) mlruns mlflow.db multirun site

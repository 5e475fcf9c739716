# Two entry points that must work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck clean install install-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# An editable install leaves our modules uncompiled; compiling them once (as pip does
# for a regular install) keeps a short stashcp run from paying for it at every start.
COMPILE := $(BIN)/python -m compileall -q cache placement swdist catalog_schema integration > /dev/null

install: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(COMPILE)

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test,postgres]'
	$(COMPILE)

demo: install
	$(BIN)/python -m stashflow.integration.demo

lint: install-test
	$(BIN)/ruff check cache placement swdist catalog_schema integration tests benchmarks
	$(BIN)/mypy cache placement swdist catalog_schema integration

test: install-test lint
	$(BIN)/pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info

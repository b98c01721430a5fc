# One command to run, one to test; each does its own set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: run test check lint clean system-deps

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "trioproxy needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $@

run: $(STAMP)  ## start the gateway on the embedded demo profile (mock upstreams)
	$(BIN)/trioproxy serve --profile demo $(ARGS)

test: $(STAMP) system-deps  ## the whole suite: lint, types, then every test
	$(BIN)/ruff check trioproxy tests loadtest
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q $(ARGS)

system-deps:  ## Chromium, nginx and valgrind for the browser, load-balancer and instruction-count tests (Debian packages)
	@sh scripts/system-deps

lint: $(STAMP)
	$(BIN)/ruff check trioproxy tests loadtest
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build dist *.egg-info

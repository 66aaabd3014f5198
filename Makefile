# Two commands: `make plan` (offline plan of staging) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: plan test venv system-deps clean

$(VENV)/.installed: requirements.txt requirements-dev.txt $(wildcard payloads/*/requirements.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

system-deps:
	scripts/install-system-deps

plan: venv
	$(PY) -m components.plan staging

test: venv system-deps
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache plan-out

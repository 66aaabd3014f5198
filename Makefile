# Two commands: `make local` (the whole bridge on this machine) and `make test` (the whole suite).
# Also: `make local-down`, `make plan` (offline plan of staging).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: local local-down plan id-token test venv system-deps engine lock clean

$(VENV)/.installed: requirements.txt requirements-dev.txt $(wildcard payloads/*/requirements.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

system-deps:
	scripts/install-system-deps

# The container engine (Podman behind Docker's API) and the locally made base image.
engine:
	scripts/container-engine setup >/dev/null

local: venv engine
	eval "$$(scripts/container-engine env)" && $(PY) -m components.local up

local-down: venv
	eval "$$(scripts/container-engine env)" && $(PY) -m components.local down

plan: venv
	$(PY) -m components.plan staging

# An ID token the local bridge trusts (its stand-in Google or Apple): make -s id-token PROVIDER=google SUB=alice [EMAIL=...]
id-token: venv
	@$(PY) -m components.local_oidc $(or $(PROVIDER),google) $(or $(SUB),$(error SUB= is required)) $(EMAIL)

test: venv system-deps engine
	$(PY) -m pytest

# Re-lock a payload's Python dependencies (hashes; Debian bookworm's Python 3.11 in the images).
lock: venv
	$(PY) -m pip install -q pip-tools
	for p in billing proxy; do (cd payloads/$$p && ../../$(VENV)/bin/pip-compile -q --generate-hashes --allow-unsafe \
	  --strip-extras --no-emit-find-links --no-emit-index-url -o requirements.lock requirements.txt \
	  && sed -i '/^--extra-index-url/d' requirements.lock); done
	# The released agent the contract tests drive: its requirements, then the agent itself (--no-deps).
	cd tests/agent_lock && ../../$(VENV)/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-find-links --no-emit-index-url -o requirements.lock requirements.in \
	  && sed -i '/^--extra-index-url/d' requirements.lock && rm -rf .wheel \
	  && ../../$(VENV)/bin/pip download -q --no-deps -d .wheel "$$(cat ciris-agent.txt)" \
	  && printf '%s \\\n    %s\n' "$$(cat ciris-agent.txt)" "$$(../../$(VENV)/bin/pip hash .wheel/*.whl | tail -1)" >> requirements.lock \
	  && rm -rf .wheel

clean:
	rm -rf $(VENV) .pytest_cache plan-out local

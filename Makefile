# Two commands for a fresh machine: `make run` and `make test`.
# Both set up .venv from the pinned requirements.lock on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
PYTEST ?= -q

.PHONY: setup run test lint ci-gate baseline benchmark clean

setup: $(STAMP)

# Re-installs only when the lock or the project metadata changes (idempotent).
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	PATH="$(BIN):$$PATH" dvc repro

test: setup
	PATH="$(BIN):$$PATH" $(PY) -m pytest $(PYTEST)

lint: setup
	$(BIN)/ruff check src stages tests benchmarks

clean:
	rm -rf $(VENV)

# Two commands for a fresh machine: `make run` and `make test`.
# Both set up .venv from the pinned requirements.lock on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
PYTEST ?= -q

.PHONY: setup run test lint predict ci-pipeline ci-gate baseline benchmark reproduce clean

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

# The champion (or any model) on your own images: make predict ARGS="digit.png photos/ --top 3"
# (python -m mnistlab.predict --help; --model models/<ds>/<arch>/model.pt or models:/<name>@<alias>)
predict: setup
	PATH="$(BIN):$$PATH" $(PY) -m mnistlab.predict $(ARGS)

# The CI regression gate (src/mnistlab/ci/gate.py, settings in ci/gate.yaml): the real
# pipeline on ci/profile.yaml in a copy of this working tree at build/ci/ (your params.yaml,
# outputs and mlflow.db stay as they are; an unchanged tree reruns nothing), then a
# comparison with ci/baseline.json.
GATE := PATH="$(BIN):$$PATH" $(PY) -m mnistlab.ci.gate

ci-pipeline: setup
	$(GATE) pipeline

# Markdown table on stdout (and in $$GITHUB_STEP_SUMMARY when set); exits 1 on a regression.
ci-gate: ci-pipeline
	$(GATE) check $(if $(GITHUB_STEP_SUMMARY),--summary "$(GITHUB_STEP_SUMMARY)")

# Accept the CI profile's current results as the baseline, then commit ci/baseline.json.
baseline: ci-pipeline
	$(GATE) accept

# The five tutorials at their exact settings on full MNIST / Fashion-MNIST, and resnet_bn on
# both (ci/reproduce.yaml), in copies under build/reproduce/ like the gate's; writes
# reports/reproduction.{md,json} and exits 1 if a run misses its published number or target.
reproduce: setup
	PATH="$(BIN):$$PATH" $(PY) -m mnistlab.ci.reproduce run

# Classic DataLoader loop vs mnistlab's training function on ../shared/datasets/mnist-mini
# (benchmarks/results/loops-<device>.{json,md}); run on an otherwise idle machine.
benchmark: setup
	PATH="$(BIN):$$PATH" $(PY) benchmarks/compare_loops.py

lint: setup
	$(BIN)/ruff check src stages tests benchmarks

clean:
	rm -rf $(VENV)

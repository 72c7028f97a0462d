# Two commands for a fresh machine: `make run` and `make test`.
# Both set up .venv from the pinned requirements.lock on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
PYTEST ?= -q
# pytest-xdist: one worker per core, each test handed to the next idle worker (worksteal), every
# worker starting on its share of the slow end-to-end tests (tests/helpers/schedule.py), so that
# none is left running alone on one core at the end. Most of a test's
# time is single-threaded Python (imports, subprocesses, DVC), so two workers on two cores ran
# the suite in 13 min against 18 min for one. `make test XDIST=` runs it in one process.
XDIST  ?= -n auto --dist worksteal

.PHONY: setup run test lint predict exps ci-pipeline ci-gate baseline benchmark benchmark-pipeline benchmark-quickstart benchmark-gpu benchmark-concurrency reproduce clean

# Vega, Vega-Lite and vega-embed for `dvc plots show` offline (.dvc/plots.html loads them from
# node_modules/, pinned with integrity in package-lock.json).
VEGA   := node_modules/.installed

setup: $(STAMP) $(VEGA)

# Re-installs only when the lock or the project metadata changes (idempotent).
# pip byte-compiles what it installs one file at a time (~50 s here); compileall does the same on
# every core (~33 s on 2), with pip's tolerance: a module that does not compile on this Python
# (torch ships one in 3.12 syntax) stays uncompiled, as pip leaves it. A fresh venv on 2 cores,
# alternating: 149 / 121 s with pip compiling, 134 / 113 s this way. Compiled at setup because a
# stage process imports ~2,000 modules and may run with PYTHONDONTWRITEBYTECODE set, where
# nothing compiled at import is kept.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --no-compile --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	touch $(STAMP)

# npm ci only when the lock changes (npm ci empties node_modules/, stamp included), from npm's
# cache when it has the tarballs. Without npm, or offline with an empty cache, only the plots
# page lacks its scripts, so setup warns and goes on (and retries next time).
$(VEGA): package.json package-lock.json
	@if ! command -v npm >/dev/null; then \
	  echo "warning: npm not found: dvc plots show needs node_modules/ (see package.json)" >&2; \
	elif npm ci --prefer-offline --omit=optional --no-audit --no-fund --loglevel=error; then \
	  touch $@; \
	else echo "warning: npm ci failed: dvc plots show will lack its Vega scripts" >&2; fi

# make run: `dvc repro`, its independent stage chains (one per dataset x arch) on one worker
# per core, then compare in the foreground (src/mnistlab/repro.py); JOBS=1: plain `dvc repro`.
# make run PROFILE=thorough: profiles/thorough.yaml's overrides as a DVC experiment
# (dvc exp run -S key=value ...; python -m mnistlab.profile prints them). Either way the stages
# fork from a stage server with their imports done (src/mnistlab/stageserver.py).
run: setup
ifdef PROFILE
	args=$$($(PY) -m mnistlab.profile $(PROFILE)) && PATH="$(BIN):$$PATH" eval $(PY) -m mnistlab.stageserver -- dvc exp run $$args
else
	PATH="$(BIN):$$PATH" $(PY) -m mnistlab.repro $(if $(JOBS),--jobs $(JOBS))
endif

test: setup
	PATH="$(BIN):$$PATH" $(PY) -m pytest $(XDIST) $(PYTEST)

# The champion (or any model) on your own images: make predict ARGS="digit.png photos/ --top 3"
# (python -m mnistlab.predict --help; --model models/<ds>/<arch>/model.pt or models:/<name>@<alias>)
predict: setup
	PATH="$(BIN):$$PATH" $(PY) -m mnistlab.predict $(ARGS)

# `dvc exp show` with ~20 of its ~230 columns: Experiment (rev: the workspace's and baseline's
# name), Created, each <ds>/<arch>/seed-<seed>'s test_accuracy, best_val_accuracy and
# train_seconds, and seed, seeds, datasets, archs and hparams.<arch>.lr/epochs where they differ
# between rows; printed by src/mnistlab/exps.py with short column names (DVC's own table cuts
# columns past 1,024 characters). More flags: make exps ARGS="-A" (--sort-by: a full column name);
# ARGS=--csv/--md/--json: DVC's output. --keep protects columns from every drop; the (?!...)
# --drop removes all but those params (and State, shown while a queue runs), which
# --only-changed then thins (tests/test_exps.py).
EXPS_FLAGS := --keep '(Experiment|rev|Created)$$' \
	--keep '(.+/test\.json:)?test_accuracy$$' \
	--keep '(.+/train\.json:)?(best_val_accuracy|train_seconds)$$' \
	--drop '(?!(State|(params\.yaml:)?(seeds?|datasets|archs|hparams\.[^.:]+\.(lr|epochs)))$$)' \
	--only-changed

exps: setup
	PATH="$(BIN):$$PATH" $(BIN)/python -m mnistlab.exps $(EXPS_FLAGS) $(ARGS)

# The CI regression gate (src/mnistlab/ci/gate.py, settings in ci/gate.yaml): the real
# pipeline up to compare (gate.yaml's targets: all the gate reads; features is left out)
# on ci/profile.yaml in a copy of this working tree at build/ci/ (your params.yaml,
# outputs and mlflow.db stay as they are; an unchanged tree reruns nothing), then a
# comparison with ci/baseline.json.
GATE := PATH="$(BIN):$$PATH" $(PY) -m mnistlab.ci.gate

# GATE_JOBS=N: copies at once, over ci/gate.yaml's jobs (.ci/run: 1, beside the test suite).
ci-pipeline: setup
	$(GATE) pipeline $(if $(GATE_JOBS),--jobs $(GATE_JOBS))

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

# Classic DataLoader loop vs mnistlab's training function on full MNIST, 1 epoch each
# (../shared/datasets/mnist; benchmarks/results/loops-<device>.{json,md}); on an idle machine.
benchmark: setup
	PATH="$(BIN):$$PATH" $(PY) benchmarks/compare_loops.py

# One `dvc repro` over every arch on full MNIST in build/pipeline/, its wall time split
# (benchmarks/results/pipeline-<device>.{json,md}). Hours on a 2-core CPU.
benchmark-pipeline: setup
	PATH="$(BIN):$$PATH" $(PY) benchmarks/pipeline.py

# make run's pipeline time on fresh clones of HEAD, parallel and one stage at a time (issue #15:
# <= 5 min; benchmarks/results/quickstart-cpu.{json,md}). ~12 min on 2 cores; on an idle machine.
benchmark-quickstart: setup
	PATH="$(BIN):$$PATH" $(PY) benchmarks/quickstart.py $(ARGS)

# On a GPU machine: the CUDA tests, benchmark, the pipeline as make run runs it, and the
# loops with train.cuda_graph: false, each with its own time limit (benchmarks/gpu.sh).
benchmark-gpu: setup
	PATH="$(BIN):$$PATH" PYTHON=$(PY) sh benchmarks/gpu.sh

# N = 1, 2, 4 training runs at once on the CPU, train.threads: auto vs torch's default in every
# run (benchmarks/results/concurrency-cpu.{json,md}, issue #14); on an otherwise idle machine.
benchmark-concurrency: setup
	PATH="$(BIN):$$PATH" $(PY) benchmarks/concurrency.py

lint: setup
	$(BIN)/ruff check src stages tests benchmarks

clean:
	rm -rf $(VENV) node_modules

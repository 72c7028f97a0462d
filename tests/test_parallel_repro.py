"""``make run``'s parallel ``dvc repro`` (mnistlab.repro): the chains it forms from the real
pipeline, the scheduler's order, worker limit, failure and interruption handling, and its
errors. The end-to-end run is in test_pipeline_full.py (the pipeline it checks is made by it).
"""

from __future__ import annotations

import copy
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers.checks import assert_one_line_error
from helpers.repo import committed_params, run

from mnistlab import repro
from mnistlab.errors import MnistlabError
from mnistlab.repro import Chain, Running


def test_chains_of_the_real_pipeline_one_per_dataset_and_per_dataset_arch_seed(tmp_repo):
    params = yaml.safe_load((tmp_repo / "params.yaml").read_text())
    params["datasets"] = ["digits", "mnist_mini"]
    params["seeds"] = [1234, 7]  # two training seeds: a chain each
    (tmp_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    archs = params["archs"]

    chains, rest = repro.plan(*repro.read_pipeline(tmp_repo))

    assert rest == ["compare"]  # reads every chain's results: runs last, in the foreground
    by_key = {c.key: c for c in chains}
    assert list(by_key) == ["digits", "mnist_mini"] + [f"{ds}-{a}-{s}" for ds in ("digits", "mnist_mini")
                                                        for a in archs for s in (1234, 7)]
    for ds in ("digits", "mnist_mini"):
        assert by_key[ds] == Chain(ds, (f"download@{ds}", f"split@{ds}"), frozenset())
        for a in archs:
            for seed in (1234, 7):
                k = f"{ds}-{a}-{seed}"
                assert by_key[k] == Chain(k, (f"train@{k}", f"evaluate@{k}", f"features@{k}"),
                                          frozenset({ds}))


def test_plan_gives_a_shared_unkeyed_upstream_stage_a_chain_and_leaves_the_rest():
    order = ["prepare", "train@a", "train@b", "sub/dvc.yaml:eval@b", "report", "lint"]
    edges = [("train@a", "prepare"), ("train@b", "prepare"), ("sub/dvc.yaml:eval@b", "train@b"),
             ("report", "train@a"), ("report", "sub/dvc.yaml:eval@b")]
    chains, rest = repro.plan(order, edges)
    assert chains == [Chain("prepare", ("prepare",), frozenset()),
                      Chain("a", ("train@a",), frozenset({"prepare"})),
                      Chain("b", ("train@b", "sub/dvc.yaml:eval@b"), frozenset({"prepare"}))]
    assert rest == ["report", "lint"]
    assert repro.key_of("sub/dvc.yaml:eval@b") == "b" and repro.key_of("compare") is None


def test_chains_that_would_wait_on_each_other_leave_every_stage_to_dvc_alone():
    order = ["split@d", "train@d-a", "summary@d"]
    edges = [("train@d-a", "split@d"), ("summary@d", "train@d-a")]
    assert repro.plan(order, edges) == ([], order)  # chain d needs d-a, which needs d


class FakeProc:
    """A worker process that exits with ``rc`` at its ``polls``-th poll."""

    def __init__(self, polls: int, rc: int):
        self.left, self.rc, self.returncode, self.pid = polls, rc, None, None

    def poll(self):
        self.left -= 1
        if self.left <= 0:
            self.returncode = self.rc
        return self.returncode

    def wait(self):
        self.returncode = self.rc
        return self.rc


class Harness:
    """``schedule``'s ``start``: records what started, checks each chain's needs had finished."""

    def __init__(self, tmp_path, polls: dict[str, int], fail: frozenset[str] = frozenset()):
        self.tmp, self.polls, self.fail = tmp_path, polls, fail
        self.started: list[str] = []
        self.running: list[Running] = []
        self.peak = 0
        self.lines: list[str] = []

    def finished(self) -> set[str]:
        return {r.chain.key for r in self.running if r.proc.returncode == 0}

    def start(self, chain: Chain) -> Running:
        assert chain.needs <= self.finished(), (chain.key, self.finished())
        self.started.append(chain.key)
        log = self.tmp / f"{chain.key}.log"
        text = "".join(f"Running stage '{s}':\n" for s in chain.stages)
        if chain.key in self.fail:
            text += "some output\nerror: hparams.mlp.lr: must be > 0, got -1\nmore output\n"
        log.write_text(text)
        r = Running(chain, FakeProc(self.polls.get(chain.key, 1), 1 if chain.key in self.fail else 0),
                    log, time.monotonic())
        self.running.append(r)
        self.peak = max(self.peak, sum(x.proc.returncode is None for x in self.running))
        return r


CHAINS = [Chain("d", ("download@d", "split@d"), frozenset()),
          *(Chain(f"d-{a}", (f"train@d-{a}", f"evaluate@d-{a}"), frozenset({"d"})) for a in "abcd")]


def test_schedule_waits_for_needs_keeps_to_the_workers_and_starts_in_order(tmp_path):
    h = Harness(tmp_path, {"d": 2, "d-a": 5, "d-b": 1, "d-c": 3, "d-d": 1})
    assert repro.schedule(CHAINS, 2, h.start, h.lines.append, poll=0) == []
    assert h.started == ["d", "d-a", "d-b", "d-c", "d-d"]
    assert h.peak == 2  # both workers busy once the dataset chain is done, never three
    assert sum("done in" in line for line in h.lines) == 5
    assert any(line.endswith("d done in 0.0 s (2 ran, 0 up to date)") for line in h.lines), h.lines


def test_schedule_stops_starting_after_a_failure_and_shows_its_error(tmp_path):
    h = Harness(tmp_path, {"d": 1, "d-a": 4, "d-b": 1}, fail=frozenset({"d-b"}))
    assert repro.schedule(CHAINS, 2, h.start, h.lines.append, poll=0) == ["d-b"]
    assert h.started == ["d", "d-a", "d-b"]  # d-c, d-d never start
    assert h.running[1].proc.returncode == 0  # d-a, already running, finished
    failed = next(i for i, line in enumerate(h.lines) if "d-b FAILED (exit 1)" in line)
    assert str(tmp_path / "d-b.log") in h.lines[failed]
    assert h.lines[failed + 1] == "    error: hparams.mlp.lr: must be > 0, got -1"


# A worker that stops on Ctrl-C, and one started with SIGINT ignored (as a background job of a
# non-interactive shell is, and whatever it starts): both must be gone soon after an interrupt.
# Each says it is ready (its SIGINT handling set) by creating the file named by its argument.
SLEEPERS = {
    "default": "signal.signal(signal.SIGINT, signal.default_int_handler)",
    "ignores SIGINT": "signal.signal(signal.SIGINT, signal.SIG_IGN)",
}


@pytest.mark.parametrize("worker", list(SLEEPERS))
def test_an_interrupted_schedule_stops_its_workers_and_reaps_them(tmp_path, worker):
    procs = []

    ready = tmp_path / "ready"
    code = f"import pathlib, signal, sys, time; {SLEEPERS[worker]}; pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"

    def start(chain):  # a real worker in its own process group, as main() starts them
        p = subprocess.Popen([sys.executable, "-c", code, str(ready)], process_group=0)
        procs.append(p)
        return Running(chain, p, tmp_path / "x.log", time.monotonic())

    def say(line):
        if "d-a" in line:
            while not ready.exists() and time.monotonic() - t0 < 20:
                time.sleep(0.05)
            raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        repro.schedule([Chain("d-a", ("train@d-a",), frozenset())], 2, start, say, poll=0, grace=1.0)
    expected = -signal.SIGINT if worker == "default" else -signal.SIGTERM
    assert ready.exists() and procs[0].returncode == expected and time.monotonic() - t0 < 30


def test_error_lines_prefer_error_lines_else_the_tail(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("a\nERROR: failed to reproduce 'train@d-a'\n\nb\n")
    assert repro.error_lines(log) == ["ERROR: failed to reproduce 'train@d-a'"]
    log.write_text("".join(f"line {i}\n" for i in range(9)))
    assert repro.error_lines(log, 3) == ["line 6", "line 7", "line 8"]
    assert repro.error_lines(tmp_path / "missing.log") == []


def test_last_status_is_the_bars_latest_state_else_the_last_line(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("Running stage 'train@d-a':\n> sh stages/run.sh python stages/train.py\n"
                   "d-a:  10%|#   | 10/100 [00:01<00:09]\rd-a:  20%|##  | 20/100 [00:02<00:08]\r")
    assert repro.last_status(log) == "d-a:  20%|##  | 20/100 [00:02<00:08]"
    log.write_text("some\n12:00:01 INFO mnistlab.evaluate: writing\n\n")
    assert repro.last_status(log) == "12:00:01 INFO mnistlab.evaluate: writing"
    assert repro.last_status(tmp_path / "missing.log") == ""


def test_display_draws_live_lines_only_on_a_terminal_and_erases_them_before_an_event(tmp_path):
    log = tmp_path / "d-a.log"
    log.write_text("d-a:  50%|##  | 50/100\r")
    running = [Running(Chain("d-a", ("train@d-a",), frozenset()), FakeProc(9, 0), log, time.monotonic())]
    out = io.StringIO()
    quiet = repro.Display(out, live=False, every=0)
    quiet.status(running)
    quiet.event("[   1.0 s] d-a done")
    assert out.getvalue() == "[   1.0 s] d-a done\n"

    out = io.StringIO()
    shown = repro.Display(out, live=True, every=0)
    shown.status(running)
    assert out.getvalue().startswith("  d-a (0 s): 50%|##  | 50/100") and out.getvalue().endswith("\n")
    shown.event("[   2.0 s] d-a done")
    assert out.getvalue().endswith("\n\x1b[1F\x1b[J[   2.0 s] d-a done\n")  # up one line, erase, then the event
    shown.clear()
    assert out.getvalue().endswith("d-a done\n")  # nothing left to erase


def test_workers_never_outnumber_the_chains():
    assert repro.workers(8, CHAINS[:3]) == 3 and repro.workers(2, CHAINS) == 2
    assert repro.workers(4, []) == 1


def test_bad_jobs_and_a_directory_without_a_pipeline_are_one_line_errors(tmp_path):
    bad = run([sys.executable, "-m", "mnistlab.repro", "--jobs", "0"], tmp_path, check=False)
    assert bad.returncode == 2 and "--jobs must be at least 1, got 0" in bad.stderr
    nodvc = run([sys.executable, "-m", "mnistlab.repro", "--jobs", "2"], tmp_path, check=False)
    assert nodvc.returncode == 2, nodvc.stderr
    assert nodvc.stderr.startswith(f"error: {tmp_path}: DVC cannot read the pipeline: ")
    assert len(nodvc.stderr.strip().splitlines()) == 1 and "Traceback" not in nodvc.stderr


def test_a_failing_chain_is_shown_and_the_run_exits_2_without_starting_the_rest(tmp_repo):
    params = yaml.safe_load((tmp_repo / "params.yaml").read_text())
    params["sources"]["digits"] = str(tmp_repo / "no-such-folder")  # download@digits fails
    (tmp_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = run([sys.executable, "-m", "mnistlab.repro", "--jobs", "2"], tmp_repo, check=False, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "digits FAILED (exit" in p.stdout and "digits-mlp" not in p.stdout, p.stdout
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: dvc repro: chain(s) digits failed; see the lines above and {repro.LOGS}/<chain>.log")
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.parametrize(("seeds", "message"), [
    ("7", "error: params.yaml: seeds must be a non-empty list of integers (got 7)"),
    ("[1, 1]", "error: params.yaml: seeds: 1 listed more than once"),
])
def test_bad_seeds_stop_make_run_before_dvc_with_one_line(tmp_path, seeds, message):
    """Was: DVC's "unexpected error - 'Value' object is not iterable" for `seeds: 7`, and a
    seed listed twice trained twice before compare refused it."""
    from helpers.repo import committed_params_text

    text = committed_params_text()
    assert "\nseeds: [1234]\n" in text
    (tmp_path / "params.yaml").write_text(text.replace("\nseeds: [1234]\n", f"\nseeds: {seeds}\n"))
    p = subprocess.run([sys.executable, "-m", "mnistlab.repro"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == message, p.stderr
    assert p.stdout == "" and not (tmp_path / "build").exists()  # nothing started


def test_a_tracking_server_that_is_down_stops_make_run_before_dvc(tmp_path):
    """Found by a second tester: under DVC a stage's outputs are gone before the stage finds the
    server down (DVC deletes them first), so `make run` probes it before any stage."""
    import socket

    from helpers.repo import committed_params_text

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing answers
    (tmp_path / "params.yaml").write_text(committed_params_text())
    uri = f"http://user:secret@127.0.0.1:{port}"
    p = subprocess.run([sys.executable, "-m", "mnistlab.repro"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert p.returncode == 2 and p.stderr.startswith(
        f"error: MLflow tracking server http://127.0.0.1:{port} unreachable"), p.stderr
    assert p.stderr.count("\n") == 1 and "secret" not in p.stderr
    assert p.stdout == "" and not (tmp_path / "build").exists()  # nothing started


BAD_SETTINGS = {  # key: (value, what the one line says)
    "train.device": ("gpu", "params.yaml: train.device: unknown device 'gpu'"),
    "hparams.mlp.lr": (-0.01, "params.yaml: hparams.mlp.lr must be a positive number"),
    "hparams.lenet5.epochs": ("five", "params.yaml: hparams.lenet5.epochs must be a positive integer"),
    "evaluate.batch_size": (1.5, "params.yaml: evaluate.batch_size must be a positive integer"),
    "features.device": ("tpu", "params.yaml: features.device: unknown device 'tpu'"),
    "download.retries": (-1, "params.yaml: download.retries must be a positive integer"),
    "datasets": (["digits", "nosuch"], "unknown dataset 'nosuch'"),
    "archs": (["mlp", "mlpp"], "unknown arch 'mlpp' (valid: "),
    "seeds": (7, "params.yaml: seeds must be a non-empty list of integers"),
    # the data seed and the split: DVC would delete the split files before the stage refuses them
    "seed": ("x", "params.yaml: seed must be an integer in [0, 2**32) (got 'x')"),
    "split.val_fraction": (1.5, "params.yaml: split.val_fraction must be a fraction in (0, 1)"),
    "split.test_fraction": (0, "params.yaml: split.test_fraction must be a fraction in (0, 1) or a count >= 1"),
    "split.bogus": (1, "params.yaml: split: unknown key(s) bogus"),
}


def with_setting(params: dict, key: str, value) -> dict:
    params = copy.deepcopy(params)
    *path, last = key.split(".")
    section = params
    for k in path:
        section = section[k]
    section[last] = value
    return params


def test_the_committed_settings_pass_the_check_before_dvc():
    repro.check_settings(committed_params())


@pytest.mark.parametrize("key", list(BAD_SETTINGS))
def test_a_setting_a_stage_would_refuse_stops_make_run_before_dvc_deletes_anything(key):
    """DVC deletes a stage's cached outputs before starting it: `make run` checks every
    setting its stages read first, as they would (walkthrough 3: `train.device: gpu` cost
    the resnet_bn and lenet5 outputs before the train stage refused it)."""
    value, says = BAD_SETTINGS[key]
    with pytest.raises(MnistlabError) as e:
        repro.check_settings(with_setting(committed_params(), key, value))
    assert says in str(e.value), str(e.value)


def test_make_run_with_a_bad_setting_is_one_line_and_runs_no_stage(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        with_setting(committed_params(), "train.device", "gpu"), sort_keys=False))
    p = run([sys.executable, "-m", "mnistlab.repro", "--jobs", "2"], tmp_path, check=False)
    assert_one_line_error(p, "train.device: unknown device 'gpu'")
    assert "Running stage" not in p.stdout + p.stderr and not (tmp_path / "build").exists()

"""The train stage's MLflow record, read back from the store; resume; unreachable servers.

The tests share one sqlite store in a temp dir (``MLFLOW_TRACKING_URI``; creating
a store's schema costs seconds) and tell their runs apart by run id. Each runs
:func:`mnistlab.stages.train.train` in-process on the digits split with the small,
fast ``mlp`` (``train.min_steps: 0``, 2 epochs), from a temp git repo as working
directory (so the git tags are real and ``mlruns/`` lands in the temp dir).
"""

from __future__ import annotations

import copy
import csv
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers.repo import no_step_floor

from mnistlab import tracking
from mnistlab.artifacts import split_digest as data_digest
from mnistlab.config import load_params, run_dir
from mnistlab.data.digits import write_digits
from mnistlab.data.sources import resolve_source
from mnistlab.data.split import split
from mnistlab.errors import MnistlabError
from mnistlab.hparams import HParams
from mnistlab.models import build_model
from mnistlab.stages.train import TrainPaths, train
from mnistlab.utils import torch_load

SEED = 1234  # the training seed of these runs (params.yaml's seeds: [1234])
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


@pytest.fixture(scope="module")
def params(params_file):
    p = load_params(params_file)
    no_step_floor(p)
    p["hparams"]["mlp"]["epochs"] = 2
    return p


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory, params):
    """The digits quickstart split, made once by the data module's own functions."""
    tmp = tmp_path_factory.mktemp("digits")
    write_digits(tmp / "raw")
    source = resolve_source(params, "digits")
    split(tmp / "raw", tmp / "split", list(source.classes), params["split"]["val_fraction"],
          params["split"]["test_fraction"], params["seed"], "digits")
    return tmp / "split"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def workdir(tmp_path, monkeypatch, store_uri):
    """A committed git repo as cwd, tracking into the shared sqlite store."""
    (tmp_path / "README").write_text("x\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "README")
    git(tmp_path, "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def paths_in(base: Path, split_dir: Path, arch: str = "mlp", seed: int = SEED) -> TrainPaths:
    """dvc.yaml's layout under ``base``: models/digits/<arch>/seed-<seed>/, ..."""
    return TrainPaths(split_dir, run_dir(base / "models", "digits", arch, seed),
                      run_dir(base / "metrics", "digits", arch, seed),
                      run_dir(base / "checkpoints", "digits", arch, seed) / "last.pt")


def run_id_of(paths: TrainPaths) -> str:
    return json.loads((paths.model_dir / "run.json").read_text())["run_id"]


def steps(client, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def stopped_in_epoch_2(monkeypatch, params: dict, paths: TrainPaths) -> None:
    """Run the train stage and stop it in epoch 2 (KeyboardInterrupt: what a signal becomes),
    before that epoch's checkpoint; the stage's epoch logger is itself again afterwards."""
    from mnistlab.stages.train import EpochLogger

    real = EpochLogger.__call__

    def stop_in_epoch_2(self, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
        real(self, row)

    monkeypatch.setattr(EpochLogger, "__call__", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(params, "digits", "mlp", SEED, paths)
    monkeypatch.setattr(EpochLogger, "__call__", real)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- content


def test_mlflow_content_read_back(params, split_dir, workdir, monkeypatch):
    import mlflow.pyfunc
    import mlflow.pytorch
    from mlflow.models import get_model_info
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DVC_EXP_NAME", "exp-42")
    # Tracked outputs that earlier stages rewrote (dvc.lock, another run's metrics): the
    # checkout's code and settings are still the commit's, so the run is not dirty.
    other = workdir / "metrics" / "digits" / "cnn_4_8" / "seed-1234" / "train.json"
    other.parent.mkdir(parents=True)
    for path in (workdir / "dvc.lock", other):
        path.write_text("{}\n")
    git(workdir, "add", "dvc.lock", "metrics")
    git(workdir, "commit", "-qm", "outputs")
    for path in (workdir / "dvc.lock", other):
        path.write_text('{"rewritten": true}\n')
    batches: list[list] = []  # the metrics of every log_batch call
    real_log_batch = MlflowClient.log_batch

    def counting_log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            batches.append(list(metrics))
        return real_log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counting_log_batch)
    # MLflow's requirements check (a scan of every installed distribution, seconds) is
    # skipped while the model is logged: our pins are this environment's own versions
    from mlflow.utils import environment, requirements_utils

    checked: list[str] = []
    real_check = requirements_utils._check_requirement_satisfied
    monkeypatch.setattr(requirements_utils, "_check_requirement_satisfied",
                        lambda req: checked.append(req) or real_check(req))
    warn = requirements_utils.warn_dependency_requirement_mismatches
    seed = 7  # not params.yaml's data seed (1234): the run is the training seed's
    assert seed != params["seed"]
    p = paths_in(workdir, split_dir, seed=seed)
    summary = train(params, "digits", "mlp", seed, p)
    assert checked == []
    for module in (environment, mlflow.pyfunc):  # both checks are back in place
        assert module.warn_dependency_requirement_mismatches is warn

    run_id = run_id_of(p)
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "digits-mlp-7" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "mnistlab/digits"

    # params: every hyperparameter, the training seed, device, data digest
    hp = HParams.from_params(params, "mlp")
    logged = run.data.params
    for k, v in hp.flat().items():
        assert logged[k] == str(v), k
    assert logged["seed"] == str(seed) and logged["device"] == "cpu"
    assert logged["data_digest"] == data_digest(split_dir)
    assert logged["min_steps"] == "0" and logged["effective_epochs"] == "2"

    # tags
    tags = run.data.tags
    assert tags["git_commit"] == git(workdir, "rev-parse", "HEAD") and tags["git_dirty"] == "false"
    assert tags["dvc_stage"] == "train@digits-mlp-7" and tags["dvc_exp_name"] == "exp-42"
    assert tags["dataset"] == "digits" and tags["arch"] == "mlp"
    assert tags[tracking.SEED_TAG] == "7" and tags[tracking.GROUP_TAG] == "digits/mlp@exp-42"

    # per-epoch metrics with step=epoch, equal to history.csv
    history = list(csv.DictReader((p.metrics_dir / "history.csv").open()))
    assert len(history) == 2
    for name in EPOCH_METRICS:
        points = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        assert [m.step for m in points] == [1, 2], name
        for m, row in zip(points, history, strict=True):
            assert m.value == pytest.approx(float(row[name]), rel=1e-5), name
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(summary["best_val_accuracy"])
    # flat names only: a "/" opens a chart section of its own in the MLflow UI (issue #15)
    assert {"best_val_accuracy", "final_val_accuracy", "final_train_loss"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if "/" in k]
    assert json.loads((p.metrics_dir / "train.json").read_text())["epochs"] == 2

    # batched: whole epoch rows, at most one request per epoch (rows are buffered while a
    # request would cost more than 2 % of the time since the last one), plus one summary
    epoch_batches, summary_batches = batches[:-1], batches[-1:]
    assert 1 <= len(epoch_batches) <= 2
    for batch in epoch_batches:
        for step in {m.step for m in batch}:
            assert {m.key for m in batch if m.step == step} >= set(EPOCH_METRICS)
    assert sorted(m.step for b in epoch_batches for m in b if m.key == "train_loss") == [1, 2]
    assert {m.key for m in summary_batches[0]} >= {"best_val_accuracy", "final_val_accuracy"}

    # artifacts: final and best model files, not every epoch's checkpoint
    files = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert files == {"checkpoints/model.pt", "checkpoints/best.pt", "checkpoints/history.csv"}

    # the mlflow.pytorch model: signature, loads, predicts like model.pt
    # (runs:/ URIs resolve through MLflow's process-global URI, which another test may
    # have set: point it at this store for the two calls.)
    with tracking.fluent_uri(tracking.tracking_uri()):
        info = get_model_info(f"runs:/{run_id}/model")
        logged_model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        requirements = Path(mlflow.pyfunc.get_model_dependencies(f"runs:/{run_id}/model"))
    assert set(requirements.read_text().split()) >= set(tracking.model_requirements())
    shape = info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]
    assert list(shape) == [-1, 1, 28, 28]
    record = torch_load(p.model_dir / "model.pt")
    net = build_model(record["arch"], **record["args"]).eval()
    net.load_state_dict(record["state_dict"])
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        out = logged_model(x)
        assert out.shape == (4, 10)
        torch.testing.assert_close(out, net(x))

    # the run id travels with the stage outputs and the checkpoint
    assert torch_load(p.checkpoint)["run_id"] == run_id
    assert set(record) == {"arch", "args", "state_dict", "normalize", "classes", "sha256"}


# --------------------------------------------------------------------------- resume and reruns


def test_git_dirty_counts_code_and_settings_not_the_pipelines_outputs(tmp_path):
    """git_info's dirty flag: a tracked source or params.yaml edit makes it true; the
    pipeline's tracked outputs (dvc.lock, metrics/, reports/) and untracked files do not,
    when named; unnamed, every tracked change counts."""
    from mnistlab.config import pipeline_outputs
    from mnistlab.utils import git_info

    files = {"params.yaml": "a: 1\n", "src/m.py": "x = 1\n", "dvc.lock": "s: {}\n",
             "metrics/d/mlp/seed-1/train.json": "{}\n", "reports/leaderboard.md": "|\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "init")
    outputs = pipeline_outputs({"paths": {"metrics": "metrics", "reports": "reports",
                                          "models": "models"}})
    assert outputs == ["dvc.lock", "metrics", "reports", "models"]

    def dirty(named=outputs) -> str:
        return git_info(tmp_path, named)["git_dirty"]

    assert dirty() == "false"
    for name in ("dvc.lock", "metrics/d/mlp/seed-1/train.json", "reports/leaderboard.md"):
        (tmp_path / name).write_text("rewritten by a stage\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert dirty() == "false" and dirty(()) == "true"
    for name in ("src/m.py", "params.yaml"):
        (tmp_path / name).write_text("edited\n")
        assert dirty() == "true", name
        git(tmp_path, "checkout", "--", name)
    assert dirty() == "false"
    assert git_info(tmp_path / "src", outputs)["git_commit"] == git(tmp_path, "rev-parse", "HEAD")


def test_interrupted_run_resumes_into_the_same_mlflow_run(params, split_dir, workdir, monkeypatch):
    """Killed in epoch 2 (before its checkpoint): the rerun resumes after epoch 1 and
    logs into the same run, each epoch once. (Bit-identity of the resumed weights is
    test_training's job.)"""
    from mlflow.tracking import MlflowClient

    p = paths_in(workdir, split_dir)
    stopped_in_epoch_2(monkeypatch, params, p)
    first_id = torch_load(p.checkpoint)["run_id"]  # run.json is written only on success
    assert not (p.model_dir / "run.json").exists()
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(first_id).info.status == "KILLED"
    assert torch_load(p.checkpoint)["epoch"] == 1

    train(params, "digits", "mlp", SEED, p)
    assert run_id_of(p) == first_id
    assert client.get_run(first_id).info.status == "FINISHED"
    assert steps(client, first_id, "val_accuracy") == [1, 2]


def test_a_stopped_experiment_resumes_after_dvc_restores_the_committed_checkpoint(
        params, split_dir, workdir, monkeypatch, tmp_path_factory):
    """`dvc exp run -S ...` stopped mid-training, then run again: DVC first checks out every
    output of dvc.lock, replacing the experiment's last.pt with the committed run's (found by
    a new user: the rerun said "fingerprint differs" and started over). The copy kept beside
    the DVC output resumes it: same MLflow run, each epoch once, the weights of a run that
    was never stopped, and no copy left once it has finished."""
    from mlflow.tracking import MlflowClient

    from mnistlab.checkpoint import kept_copy

    p = paths_in(workdir, split_dir)
    kept = kept_copy(p.checkpoint)
    assert kept == workdir / "checkpoints" / "digits" / "mlp" / "seed-1234.unfinished.pt"
    train(params, "digits", "mlp", SEED, p)  # the committed run (params.yaml's lr)
    assert not kept.exists()
    committed = p.checkpoint.read_bytes()

    exp = copy.deepcopy(params)
    exp["hparams"]["mlp"]["lr"] = 0.002  # dvc exp run -S hparams.mlp.lr=0.002
    stopped_in_epoch_2(monkeypatch, exp, p)
    stopped_id = torch_load(kept)["run_id"]
    assert torch_load(kept)["epoch"] == 1 and kept.read_bytes() == p.checkpoint.read_bytes()

    p.checkpoint.write_bytes(committed)  # what `dvc exp run`'s checkout does first
    train(exp, "digits", "mlp", SEED, p)
    assert run_id_of(p) == stopped_id and not kept.exists()
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(stopped_id).info.status == "FINISHED"
    assert steps(client, stopped_id, "val_accuracy") == [1, 2]

    whole = tmp_path_factory.mktemp("whole")  # the reference: the experiment never stopped
    ref = paths_in(whole, split_dir)
    train(exp, "digits", "mlp", SEED, ref)
    a, b = torch_load(p.model_dir / "model.pt"), torch_load(ref.model_dir / "model.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_reruns_reuse_finished_checkpoints_and_restart_on_changed_params(params, split_dir, workdir,
                                                                        caplog):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    p = paths_in(workdir / "a", split_dir)
    first = train(params, "digits", "mlp", SEED, p)
    first_id = run_id_of(p)

    # A setting outside the fingerprint changed (DVC re-runs the stage): the finished
    # checkpoint is reused, nothing retrained, and its own run (the checkpoint names it)
    # is completed again, not duplicated: it still holds every epoch's metrics, once, and
    # the model.
    other_eval = copy.deepcopy(params)
    other_eval["train"]["eval_batch_size"] = 100
    exp_id = client.get_run(first_id).info.experiment_id

    def run_ids() -> set[str]:
        return {r.info.run_id for r in client.search_runs([exp_id])}

    runs_before = run_ids()
    with caplog.at_level(logging.INFO, logger="mnistlab"):
        again = train(other_eval, "digits", "mlp", SEED, p)
    assert "reusing it" in caplog.text
    # same history, same timings: nothing was retrained (only logging time differs)
    assert {k: v for k, v in again.items() if k != "tracking_seconds"} == \
        {k: v for k, v in first.items() if k != "tracking_seconds"}
    reuse_id = run_id_of(p)
    assert reuse_id == first_id and client.get_run(reuse_id).info.status == "FINISHED"
    assert run_ids() == runs_before  # no new run
    for name in EPOCH_METRICS:
        assert steps(client, reuse_id, name) == [1, 2], name
    assert {a.path for a in client.list_artifacts(reuse_id, "checkpoints")} == {
        "checkpoints/model.pt", "checkpoints/best.pt", "checkpoints/history.csv"}

    # The lr changed: the checkpoint is not resumed; a fresh run from epoch 1.
    caplog.clear()
    new_lr = copy.deepcopy(params)
    new_lr["hparams"]["mlp"]["lr"] = 0.002
    with caplog.at_level(logging.INFO, logger="mnistlab"):
        train(new_lr, "digits", "mlp", SEED, p)
    assert "fingerprint differs" in caplog.text and "resuming" not in caplog.text
    new_id = run_id_of(p)
    assert new_id not in (first_id, reuse_id)
    assert client.get_run(new_id).data.params["lr"] == "0.002"
    assert steps(client, new_id, "val_accuracy") == [1, 2]

    fresh = paths_in(workdir / "b", split_dir)  # the same new params in a clean directory
    train(new_lr, "digits", "mlp", SEED, fresh)
    a, b = torch_load(p.model_dir / "model.pt"), torch_load(fresh.model_dir / "model.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_a_run_left_running_is_ended_when_a_new_run_replaces_it(params, split_dir, workdir):
    """A run an older crash left RUNNING (no owner recorded: made before runs had one), named
    by a checkpoint the new params do not resume, is marked KILLED when the new run replaces
    it, tagged with why. A RUNNING run whose process is alive (this one) is left alone:
    parallel experiments share a store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    p = paths_in(workdir, split_dir)
    train(params, "digits", "mlp", SEED, p)
    old = run_id_of(p)
    client.update_run(old, status="RUNNING")
    client.delete_tag(old, tracking.OWNER_TAG)
    live = tracking.start_run("digits", "mlp", SEED, {}, {"dvc_stage": "test"})  # held by this process

    new_lr = copy.deepcopy(params)
    new_lr["hparams"]["mlp"]["lr"] = 0.002
    train(new_lr, "digits", "mlp", SEED, p)
    new = run_id_of(p)
    assert new != old and client.get_run(new).info.status == "FINISHED"
    ended = client.get_run(old)
    assert ended.info.status == "KILLED"
    assert f"replaced by run {new}" in ended.data.tags[tracking.ENDED_TAG]
    assert client.get_run(live).info.status == "RUNNING"
    tracking.set_terminated(live, "KILLED")


def test_stale_runs_are_ended_per_seed_and_runs_carry_seed_and_group_tags(workdir):
    """Each seed of a dataset x arch has a train stage of its own, and they may train side by
    side (``make run``, a DVC queue): a stage ends only its own seed's runs whose process is
    gone (and a run from before seeds, which has no seed tag), never another seed's. Every
    run is tagged with its seed and its group (dataset/arch, @ the DVC experiment if any),
    which the MLflow UI groups the seeds by. No training: runs are made by start_run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    gone = f"{socket.gethostname()}:{int(ended.stdout)}:"  # a train process that was killed
    assert tracking.owner_gone(gone)

    arch = "cnn_4_8"  # no other test of this module trains it: no runs of theirs in the way
    seed1 = tracking.start_run("digits", arch, 1, {}, {"dvc_stage": "test"})
    seed2 = tracking.start_run("digits", arch, "2", {}, {"dvc_stage": "test"})  # as the CLI gives it
    legacy = tracking.start_run("digits", arch, 1, {}, {"dvc_stage": "test"})
    client.delete_tag(legacy, tracking.SEED_TAG)  # made before runs had seeds
    for run_id in (seed1, seed2, legacy):
        client.set_tag(run_id, tracking.OWNER_TAG, gone)
    exp = tracking.start_run("digits", arch, 1, {}, {"dvc_stage": "test", "dvc_exp_name": "exp-7"})

    # tags and names
    for run_id, seed, group in ((seed1, "1", "digits/cnn_4_8"), (seed2, "2", "digits/cnn_4_8"),
                                (exp, "1", "digits/cnn_4_8@exp-7")):
        run = client.get_run(run_id)
        assert run.info.run_name == f"digits-cnn_4_8-{seed}"
        assert run.data.tags[tracking.SEED_TAG] == seed, run_id
        assert run.data.tags[tracking.GROUP_TAG] == group, run_id
        assert run.data.tags["dataset"] == "digits" and run.data.tags["arch"] == arch

    # seed 1's stage (its own run: exp) ends seed 1's dead run and the seedless one, not seed 2's
    assert sorted(tracking.end_stale_runs("digits", arch, 1, keep=exp)) == sorted([seed1, legacy])
    for run_id in (seed1, legacy):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", run_id
        assert "killed before it could end the run" in run.data.tags[tracking.ENDED_TAG]
    other = client.get_run(seed2)
    assert other.info.status == "RUNNING" and tracking.ENDED_TAG not in other.data.tags
    assert client.get_run(exp).info.status == "RUNNING"  # keep: never touched

    # seed 2's own stage does end it
    assert tracking.end_stale_runs("digits", arch, "2", keep=exp) == [seed2]
    assert client.get_run(seed2).info.status == "KILLED"
    tracking.set_terminated(exp, "KILLED")


def test_a_runs_owner_is_gone_only_when_that_is_sure():
    host = socket.gethostname()
    assert not tracking.owner_gone(tracking.owner())  # this process
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    pid = int(ended.stdout)
    assert tracking.owner_gone(f"{host}:{pid}:")
    assert not tracking.owner_gone(f"another-{host}:{pid}:")  # another machine: cannot tell
    assert not tracking.owner_gone("no owner") and not tracking.owner_gone(f"{host}:x:1")
    if Path("/proc/self/stat").is_file():  # a live pid that started at another time: reused
        me = tracking.owner().rsplit(":", 1)[0]
        assert tracking.owner_gone(f"{me}:1")


# --------------------------------------------------------------------------- failures


def test_unreachable_server_fails_before_training(params, split_dir, workdir, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    p = paths_in(workdir, split_dir)
    start = time.monotonic()
    with pytest.raises(MnistlabError) as e:
        train(params, "digits", "mlp", SEED, p)
    msg = str(e.value)
    assert "\n" not in msg and uri in msg and "unreachable" in msg
    assert time.monotonic() - start < 30  # fails fast, not after MLflow's minutes of retries
    assert not p.checkpoint.exists() and not (p.model_dir / "run.json").exists()


def test_stage_script_reports_unreachable_server_in_one_line(root, params_file, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, str(root / "stages" / "train.py"), "--dataset", "digits", "--arch", "mlp",
           "--seed", str(SEED), "--split", str(tmp_path / "split"), "--model-dir", str(tmp_path / "m"),
           "--metrics-dir", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "c" / "last.pt"),
           "--params", str(params_file)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and uri in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()


def test_unusable_store_is_one_line_naming_the_uri(params, split_dir, workdir, monkeypatch):
    (workdir / "blocker").write_text("a file where a directory should be")
    uri = f"sqlite:///{workdir / 'blocker' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    p = paths_in(workdir, split_dir)
    with pytest.raises(MnistlabError) as e:
        train(params, "digits", "mlp", SEED, p)
    assert "\n" not in str(e.value) and uri in str(e.value)
    assert not p.checkpoint.exists()


# --------------------------------------------------------------------------- URIs and credentials


@pytest.mark.parametrize("uri, shown", [
    ("http://alice:s3cret@mlflow.example:5000/x", "http://mlflow.example:5000/x"),
    ("https://token@mlflow.example", "https://mlflow.example"),
    ("http://mlflow.example:5000", "http://mlflow.example:5000"),
    ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("databricks", "databricks"),
])
def test_redact(uri, shown):
    assert tracking.redact(uri) == shown


class _Health(http.server.BaseHTTPRequestHandler):
    code = 200
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 - the stdlib's name
        type(self).seen.append(self.path)
        self.send_response(type(self).code)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Health.seen.clear()
    _Health.code = 200
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("code, ok", [(200, True), (401, True), (403, True), (500, False)])
def test_check_reachable_probes_health_without_credentials(health_server, code, ok):
    _Health.code = code
    port = health_server.server_address[1]
    uri = f"http://alice:s3cret@127.0.0.1:{port}/"
    if ok:
        tracking.check_reachable(uri)
    else:
        with pytest.raises(MnistlabError) as e:
            tracking.check_reachable(uri)
        assert f"http://127.0.0.1:{port}" in str(e.value) and "s3cret" not in str(e.value)
    assert _Health.seen == ["/health"]


def test_check_reachable_ignores_local_stores():
    tracking.check_reachable("sqlite:///mlflow.db")  # nothing to probe; must not raise


def test_credentials_in_the_uri_never_reach_tags_params_outputs_or_logs(
        params, split_dir, workdir, monkeypatch, health_server, store_uri, caplog):
    """The stage believes it talks to ``http://alice:s3cret@host`` (the /health probe
    really goes there); the MLflow calls themselves are redirected to the sqlite
    store, so everything the stage wrote can be read back and searched."""
    from mlflow.tracking import MlflowClient

    port = health_server.server_address[1]
    secret_uri = f"http://alice:s3cret@127.0.0.1:{port}"
    store = MlflowClient(store_uri)
    fluent = tracking.fluent_uri
    monkeypatch.setattr(tracking, "tracking_uri", lambda: secret_uri)
    monkeypatch.setattr(tracking, "client", lambda: store)
    monkeypatch.setattr(tracking, "fluent_uri", lambda uri: fluent(store_uri))
    one_epoch = copy.deepcopy(params)
    one_epoch["hparams"]["mlp"]["epochs"] = 1
    p = paths_in(workdir, split_dir)
    with caplog.at_level(logging.DEBUG, logger="mnistlab"):
        train(one_epoch, "digits", "mlp", SEED, p)

    assert _Health.seen == ["/health"]  # probed, without the credentials
    run_json = (p.model_dir / "run.json").read_text()
    assert json.loads(run_json)["tracking_uri"] == f"http://127.0.0.1:{port}"
    run = store.get_run(run_id_of(p))
    ckpt = torch_load(p.checkpoint)
    written = json.dumps({
        "tags": run.data.tags, "params": run.data.params, "run.json": run_json,
        "train.json": (p.metrics_dir / "train.json").read_text(), "log": caplog.text,
        "checkpoint": {k: v for k, v in ckpt.items() if isinstance(v, (str, int, float))},
    })
    assert "s3cret" not in written and "alice" not in written


def test_logging_the_model_leaves_mlflows_global_uri_as_it_was(monkeypatch, tmp_path):
    """mlflow.set_tracking_uri rewrites a process global and $MLFLOW_TRACKING_URI;
    after the model is logged both must be back, or later runs would go astray."""
    import os

    import mlflow
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mine)
    monkeypatch.setattr(mlflow_tracking_utils, "_tracking_uri", None)
    with tracking.fluent_uri(f"sqlite:///{tmp_path / 'other.db'}"):
        assert mlflow.get_tracking_uri().endswith("other.db")
    assert mlflow_tracking_utils._tracking_uri is None
    assert os.environ["MLFLOW_TRACKING_URI"] == mine and mlflow.get_tracking_uri() == mine


def test_logging_a_channels_last_conv_model_prints_no_pt2_warning(monkeypatch, tmp_path, recwarn):
    """torch's pt2 writer warned "No complete tensor found in the group! ... may cause issues
    when your weights are not on CPU" for every conv arch trained channels-last (found in the
    train logs by a new user): the logged copy is on the CPU, so the warning is silenced there,
    and the logged model still loads and answers as the network does."""
    import functools

    import mlflow.pyfunc
    import numpy as np

    from mnistlab import serving

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    net = build_model("cnn_16_32").to(memory_format=torch.channels_last).eval()
    run_id = tracking.start_run("digits", "cnn_16_32", 1, {}, {"dvc_stage": "test"})
    classes = [str(i) for i in range(10)]
    example = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28)).astype(np.float32)
    tracking.log_pytorch_model(run_id, net, example, functools.partial(
        serving.log_model, classes=classes, normalize={"mean": 0.0, "std": 1.0}))
    assert not [w for w in recwarn if "No complete tensor" in str(w.message)]
    with tracking.fluent_uri(tracking.tracking_uri()):
        got = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(example)
    with torch.inference_mode():
        want = net(torch.from_numpy(example) / 255).softmax(1).numpy()  # grey levels in, as served
    np.testing.assert_allclose(got[classes].to_numpy(), want, atol=1e-5)


def test_the_schema_lock_covers_opening_the_store_not_importing_it(tmp_path):
    """Stages that start together (make run's workers) queue for the sqlite store's schema lock,
    so it must be held only while the store is opened: MLflow's SQLAlchemy store modules
    (~90 % of the time it was held, 0.7 s a process on a 2-core CPU) are imported before it is
    taken. A fresh interpreter, where nothing of MLflow's store is imported yet."""
    probe = f"""
import contextlib, sys
from mnistlab import tracking
taken = tracking._schema_lock
seen = {{}}

@contextlib.contextmanager
def watched(uri):
    with taken(uri):
        seen["imported"] = [m for m in ("mlflow.store.tracking.sqlalchemy_store",
                                        "mlflow.store.model_registry.sqlalchemy_store")
                            if m in sys.modules]
        yield

tracking._schema_lock = watched
tracking._client("sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
print(len(seen["imported"]))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out[0] == "2"  # both store modules were imported before the lock was taken
    # and the lock still covered what it is for: the new file's schema was created inside it
    assert (tmp_path / "mlflow.db").stat().st_size > 0


def test_reopen_run_starts_afresh_only_when_the_store_says_the_run_is_gone(monkeypatch, caplog):
    """"No such run" (another store, mlflow.db recreated): a warning and a new run. Any other
    answer (a 401, a 500) is the store's failure and is raised, not reported as a missing run
    (a 401 used to log "not found; starting a new run" before the stage failed)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, UNAUTHENTICATED

    class Store:
        def __init__(self, code):
            self.code = code

        def get_run(self, run_id):
            raise MlflowException(f"run {run_id}: answered {self.code}", error_code=self.code)

    monkeypatch.setattr(tracking, "client", lambda: Store(RESOURCE_DOES_NOT_EXIST))
    with caplog.at_level(logging.WARNING, logger="mnistlab.tracking"):
        assert tracking.reopen_run("abc123") is False
    assert "MLflow run abc123 not found in" in caplog.text
    caplog.clear()
    monkeypatch.setattr(tracking, "client", lambda: Store(UNAUTHENTICATED))
    with pytest.raises(MlflowException, match="answered"):
        tracking.reopen_run("abc123")
    assert "not found" not in caplog.text

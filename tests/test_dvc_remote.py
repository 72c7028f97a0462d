"""Scale-out through a DVC remote: push from one clone, pull into another, nothing to redo.

The remote is a local folder (the same commands work for s3://, gs://, ssh://...):
``dvc remote add -d``, ``dvc push`` the data, models and checkpoints of a tiny pipeline
(download + split + train of one arch on digits), commit code + dvc.lock + the small
metrics to git, ``git clone`` to a fresh folder, ``dvc pull`` there, and the clone's
``dvc status``/``dvc repro`` must have nothing to do: every output arrived.
"""

from __future__ import annotations

import filecmp
import subprocess

import pytest
from helpers.repo import edit_params, no_step_floor, run, stage_env

pytestmark = pytest.mark.slow

TARGET = "train@digits-mlp-1234"
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def test_push_clone_pull_then_nothing_to_reproduce(tmp_repo, tmp_path):
    def small(p: dict) -> None:
        p["datasets"], p["archs"], p["seeds"] = ["digits"], ["mlp"], [1234]
        no_step_floor(p)
        p["hparams"]["mlp"]["epochs"] = 1

    edit_params(tmp_repo, small)
    run(["dvc", "repro", TARGET], tmp_repo)
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], tmp_repo)
    pushed = run(["dvc", "push", TARGET, "--with-deps"], tmp_repo)
    assert "pushed" in pushed.stdout and any(remote.rglob("*")), pushed.stdout
    for cmd in (["git", "add", "-A"], [*GIT, "commit", "-qm", "pipeline run"]):
        run(cmd, tmp_repo)
    assert "dvc.lock" in run(["git", "ls-files"], tmp_repo).stdout

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(tmp_repo), str(clone)], check=True, timeout=120)
    assert not (clone / "models").exists() and not (clone / "data").exists()  # only git came
    run(["dvc", "pull", TARGET, "--with-deps"], clone)

    for rel in ("data/raw/digits/train-images-idx3-ubyte", "data/split/digits/train.pt",
                "data/split/digits/summary.json", "models/digits/mlp/seed-1234/model.pt",
                "models/digits/mlp/seed-1234/run.json", "checkpoints/digits/mlp/seed-1234/last.pt",
                "metrics/digits/mlp/seed-1234/train.json"):
        assert filecmp.cmp(tmp_repo / rel, clone / rel, shallow=False), rel

    status = run(["dvc", "status", TARGET, "--with-deps"], clone)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    env = {**stage_env(clone), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # must not be needed
    repro = run(["dvc", "repro", TARGET], clone, env=env)
    assert "Running stage" not in repro.stdout, repro.stdout
    assert f"Stage '{TARGET}' didn't change, skipping" in repro.stdout

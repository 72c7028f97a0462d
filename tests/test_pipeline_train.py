"""End to end: ``dvc repro`` of the train stages in a temp copy of the project.

One test, three reproductions: every arch trains on digits; a second repro runs
nothing; changing one arch's lr re-runs only that arch's train stage. The temp
repo's params.yaml is shrunk to test the mechanics, not the accuracy: one epoch
per arch, no min_steps floor, and a test split of 80% so only ~320 digits train.
``dvc repro train`` targets the train stages (and what they depend on), so
downstream stages added to dvc.yaml later do not slow this test down.
"""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml
from helpers.repo import no_step_floor, run

pytestmark = pytest.mark.slow


def ran(output: str) -> set[str]:
    """Names of the stages a ``dvc repro`` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_trains_every_arch_then_nothing_then_only_the_changed_one(tmp_repo):
    from mlflow.tracking import MlflowClient

    params_file = tmp_repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["datasets"] = ["digits"]
    no_step_floor(params)
    params["split"]["test_fraction"] = 0.8
    for section in params["hparams"].values():
        section["epochs"] = 1
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    archs = params["archs"]
    trains = {f"train@digits-{arch}" for arch in archs}

    first = run(["dvc", "repro", "train"], tmp_repo)
    assert ran(first.stdout) == {"download@digits", "split@digits"} | trains
    client = MlflowClient(f"sqlite:///{tmp_repo / 'mlflow.db'}")
    for arch in archs:
        models, metrics = tmp_repo / "models/digits" / arch, tmp_repo / "metrics/digits" / arch
        for f in (models / "model.pt", models / "best.pt", models / "run.json",
                  metrics / "history.csv", metrics / "train.json",
                  tmp_repo / "checkpoints/digits" / arch / "last.pt"):
            assert f.is_file(), f
        summary = json.loads((metrics / "train.json").read_text())
        assert summary["epochs"] == 1 and 0 <= summary["final_val_accuracy"] <= 1
        assert summary["train_images_per_second"] > 0
        assert len(list(csv.DictReader((metrics / "history.csv").open()))) == 1
        run_info = client.get_run(json.loads((models / "run.json").read_text())["run_id"]).info
        assert run_info.run_name == f"digits-{arch}" and run_info.status == "FINISHED"

    second = run(["dvc", "repro", "train"], tmp_repo)
    assert ran(second.stdout) == set(), second.stdout

    params["hparams"]["mlp"]["lr"] = 0.002
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro", "train"], tmp_repo)
    assert ran(third.stdout) == {"train@digits-mlp"}, third.stdout

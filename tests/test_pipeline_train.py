"""End to end: ``dvc repro`` of the train stages in a temp copy of the project.

One test, three reproductions: every arch trains on digits (one seed); a second repro
runs nothing; changing one arch's lr re-runs only that arch's train stage. Then a dry
run: adding a seed to ``seeds`` adds that seed's train stages and leaves the others cached. The temp
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

from mnistlab.config import run_dir

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
    archs, (seed,) = params["archs"], params["seeds"]  # seeds: [1234]
    trains = {f"train@digits-{arch}-{seed}" for arch in archs}

    first = run(["dvc", "repro", "train"], tmp_repo)
    assert ran(first.stdout) == {"download@digits", "split@digits"} | trains
    client = MlflowClient(f"sqlite:///{tmp_repo / 'mlflow.db'}")
    for arch in archs:
        # models/digits/<arch>/seed-1234/, metrics/..., checkpoints/...
        models, metrics = (run_dir(tmp_repo / d, "digits", arch, seed) for d in ("models", "metrics"))
        for f in (models / "model.pt", models / "best.pt", models / "run.json",
                  metrics / "history.csv", metrics / "train.json",
                  run_dir(tmp_repo / "checkpoints", "digits", arch, seed) / "last.pt"):
            assert f.is_file(), f
        summary = json.loads((metrics / "train.json").read_text())
        assert summary["epochs"] == 1 and 0 <= summary["final_val_accuracy"] <= 1
        assert summary["train_images_per_second"] > 0
        assert len(list(csv.DictReader((metrics / "history.csv").open()))) == 1
        run_info = client.get_run(json.loads((models / "run.json").read_text())["run_id"]).info
        assert run_info.run_name == f"digits-{arch}-{seed}" and run_info.status == "FINISHED"

    second = run(["dvc", "repro", "train"], tmp_repo)
    assert ran(second.stdout) == set(), second.stdout

    params["hparams"]["mlp"]["lr"] = 0.002
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro", "train"], tmp_repo)
    assert ran(third.stdout) == {f"train@digits-mlp-{seed}"}, third.stdout

    # A second seed: only its stages would run (no train stage reads `seeds`), the first's stay cached.
    params["seeds"] = [seed, 7]
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = run(["dvc", "repro", "--dry", "train"], tmp_repo)
    assert ran(fourth.stdout) == {f"train@digits-{arch}-7" for arch in archs}, fourth.stdout

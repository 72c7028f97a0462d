"""Seeds as a dimension, end to end: `dvc exp run -S 'seeds=[1,2,3,4,5]'` on digits trains each
arch once per seed (one DVC stage and one MLflow run each), and the leaderboard shows each
arch's mean ± std and 95 % interval over the five, ranked by the mean.

Two fast archs with a few epochs, and only up to compare (features is no input of the
leaderboard): 10 train and 10 evaluate stages.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers.repo import no_step_floor, run

from mnistlab.stats import seed_interval

ARCHS = ["mlp", "cnn_16_32"]
SEEDS = [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_five_seeds_give_mean_std_and_interval_per_arch(tmp_repo):
    repo = tmp_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(datasets=["digits"], archs=ARCHS)
    no_step_floor(params)
    params["hparams"]["mlp"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "small"], repo)

    p = run(["dvc", "exp", "run", "-n", "five-seeds", "-S", "seeds=[1,2,3,4,5]", "compare"], repo,
            timeout=1200)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for kind in ("train", "evaluate"):
        assert {s for s in lock if s.startswith(f"{kind}@")} == \
            {f"{kind}@digits-{a}-{s}" for a in ARCHS for s in SEEDS}, p.stdout
    assert not any(s.startswith("features@") for s in lock)  # compare does not need it

    runs = pd.read_csv(repo / "reports" / "runs.csv")
    assert sorted(zip(runs["arch"], runs["seed"], strict=True)) == sorted(
        (a, s) for a in ARCHS for s in SEEDS)
    board = pd.read_csv(repo / "reports" / "leaderboard.csv")
    assert sorted(board["arch"]) == sorted(ARCHS) and board["seeds"].tolist() == [5, 5]
    for row in board.itertuples():
        accs = runs.loc[runs["arch"] == row.arch, "test_accuracy"].to_numpy()
        # each seed's run is its own model: the five do not all agree
        assert len(set(accs.round(6))) > 1, accs
        assert row.test_accuracy == pytest.approx(accs.mean(), abs=1e-6)
        assert row.accuracy_std == pytest.approx(accs.std(ddof=1), abs=1e-6)
        lo, hi = seed_interval(accs)
        assert (row.accuracy_ci_low, row.accuracy_ci_high) == pytest.approx(
            (max(lo, 0.0), min(hi, 1.0)), abs=1e-6)
        assert row.ci == "t, 5 seeds" and row.best_seed in SEEDS
    assert board["test_accuracy"].is_monotonic_decreasing  # ranked by the mean
    md = (repo / "reports" / "leaderboard.md").read_text()
    assert "mean of 5 seeds" in md and md.count(" ± ") == 2
    champions = json.loads((repo / "reports" / "champions.json").read_text())["digits"]
    assert champions["arch"] == board["arch"][0] and champions["seeds"] == 5
    assert champions["seed"] == board["best_seed"][0]

    # MLflow: one run per arch x seed, tagged with its seed and grouped per arch and experiment
    probe = (
        "import json; from mlflow import MlflowClient; c = MlflowClient();"
        "e = c.get_experiment_by_name('mnistlab/digits');"
        "print(json.dumps([r.data.tags for r in c.search_runs([e.experiment_id], max_results=100)]))"
    )
    tags = json.loads(run([sys.executable, "-c", probe], repo).stdout.strip().splitlines()[-1])
    assert sorted((t["arch"], int(t["seed"])) for t in tags) == sorted(
        (a, s) for a in ARCHS for s in SEEDS)
    assert {t["group"] for t in tags} == {f"digits/{a}@five-seeds" for a in ARCHS}
    assert {t["dvc_exp_name"] for t in tags} == {"five-seeds"}
    assert np.all([t["dvc_stage"] == f"train@digits-{t['arch']}-{t['seed']}" for t in tags])

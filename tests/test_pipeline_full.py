"""End to end in a temp copy: train → evaluate → features → compare with DVC, run as `make run`
runs it (mnistlab.repro, two workers), what DVC shows of it, the MLflow champion, and the
regression gate catching a planted bad learning rate.

One pipeline run serves every check (two stage runs per arch would double the
minutes). Two archs keep it short while covering both kinds of feature pictures:
``mlp`` (first-layer weights) and ``lenet5`` (kernels and feature maps); every
other arch's extraction is tested in test_features.py.
"""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml
from helpers.checks import assert_png
from helpers.repo import ROOT, no_step_floor, run, stage_env

from mnistlab.config import run_key
from mnistlab.utils import torch_load

ARCHS = ["mlp", "lenet5"]
SEED = 1234  # params.yaml's seeds: [1234]: one run per arch, under <root>/digits/<arch>/seed-1234/


def run_of(arch: str) -> str:
    """``digits/<arch>/seed-1234``: the run's folder under metrics/, reports/, ... and its gate key."""
    return run_key("digits", arch, SEED)


def configure(repo) -> dict:
    """Small and fast: digits only, tutorial step counts cut to a few epochs."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"] = ["digits"]
    params["archs"] = ARCHS
    assert params["seeds"] == [SEED]
    no_step_floor(params)
    params["hparams"]["mlp"]["epochs"] = 3
    params["hparams"]["lenet5"]["epochs"] = 2
    params["features"]["tsne_max_points"] = 150
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def gate(repo, command: str, tmp, check: bool = True):
    """The gate on the temp repo's results.

    The gate reads ``<workdir>/params.yaml`` and one shard per dataset,
    ``<workdir>/<dataset>/``; here the pipeline ran in the temp repo itself (with
    git, for `dvc exp`), so the workdir's only shard is a link to it. Its settings
    (metrics, tolerances) are this repository's ci/gate.yaml.
    """
    work = tmp / "ci"
    if not work.exists():
        work.mkdir()
        (work / "digits").symlink_to(repo)
    (work / "params.yaml").write_text((repo / "params.yaml").read_text())
    return run([sys.executable, "-m", "mnistlab.ci.gate", command, "--root", str(repo),
                "--config", str(ROOT / "ci" / "gate.yaml"), "--workdir", str(work),
                "--profile", str(tmp / "profile.yaml"), "--baseline", str(tmp / "baseline.json")],
               repo, check=check)


@pytest.mark.slow
def test_pipeline_outputs_dvc_views_champion_and_gate(tmp_repo):
    repo, tmp = tmp_repo, tmp_repo.parent
    configure(repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "small"], repo)
    # as `make run` runs it: each arch's train -> evaluate -> features chain on its own worker
    # MNISTLAB_PROGRESS: what it sets on a terminal, so that each train stage draws its bar
    # into its chain's log, where the live lines read it
    env = {**stage_env(repo), "MNISTLAB_PROGRESS": "always"}
    repro = run([sys.executable, "-m", "mnistlab.repro", "--jobs", "2"], repo, timeout=900, env=env)
    assert "dvc repro on 2 workers" in repro.stdout, repro.stdout
    for arch in ARCHS:
        assert f"digits-{arch}-{SEED} done in" in repro.stdout, repro.stdout
        log = (repo / "build/run" / f"digits-{arch}-{SEED}.log").read_text()
        assert f"Running stage 'features@digits-{arch}-{SEED}'" in log
        bar = next(p for p in reversed(log.split("\r")) if "step" in p)  # the bar's last state
        assert "100%" in bar and "train_loss" in bar and "val_acc" in bar, bar
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}  # the lock file dvc repro writes
    # one progress display per stage: no per-epoch lines at the default log level
    assert "epoch 1/" not in repro.stdout + repro.stderr
    # the last stage (compare) ends the output with where to look
    tail = repro.stdout[repro.stdout.index("\nWhere to look:\n"):]
    for pointer in ("reports/leaderboard.md", "champion     digits: ", "mlflow ui --backend-store-uri",
                    "dvc plots show", 'make predict ARGS="my-digit.png --model models:/mnistlab-digits@champion"'):
        assert pointer in tail, tail

    # ---- every output exists and is valid
    n_test = json.loads((repo / "data/split/digits/summary.json").read_text())["test"]["count"]
    for arch in ARCHS:
        m = repo / "metrics" / run_of(arch)
        test = json.loads((m / "test.json").read_text())
        assert {"test_accuracy", "test_loss", "macro_f1"} <= set(test)
        assert test["test_samples"] == n_test
        with open(m / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n_test  # the confusion data counts every test image once
        assert sum(r["actual"] == r["predicted"] for r in rows) / n_test == pytest.approx(
            test["test_accuracy"])
        for png in ("confusion.png", "misclassified.png"):
            assert_png(repo / "reports" / run_of(arch) / "evaluate" / png)
        emb = torch_load(repo / "features" / run_of(arch) / "embeddings.pt")
        assert emb["embeddings"].shape == (n_test, {"mlp": 500, "lenet5": 84}[arch])
        assert len(emb["labels"]) == n_test
        pics = sorted(p.name for p in (repo / "reports" / run_of(arch) / "features").iterdir())
        assert "embedding-map.png" in pics
        assert any(p.startswith("weights-" if arch == "mlp" else "fmaps-") for p in pics), pics
        for p in pics:
            assert_png(repo / "reports" / run_of(arch) / "features" / p)
    with open(repo / "reports" / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert sorted(r["arch"] for r in board) == sorted(ARCHS)
    assert all(r["seeds"] == "1" and r["best_seed"] == str(SEED) for r in board), board
    with open(repo / "reports" / "runs.csv") as f:  # one row per dataset x arch x seed
        assert sorted((r["arch"], r["seed"]) for r in csv.DictReader(f)) == \
            sorted((a, str(SEED)) for a in ARCHS)
    assert "| digits" in (repo / "reports" / "leaderboard.md").read_text()
    assert_png(repo / "reports" / "curves" / "val-curves-digits.png", 200)

    # ---- MLflow: evaluation in the training run, and the champion alias
    champions = json.loads((repo / "reports" / "champions.json").read_text())
    best = max(board, key=lambda r: float(r["test_accuracy"]))["arch"]
    assert champions["digits"]["arch"] == best and champions["digits"]["seed"] == SEED
    probe = (
        "import json, sys; from mlflow import MlflowClient; c = MlflowClient();"
        "mv = c.get_model_version_by_alias('mnistlab-digits', 'champion');"
        "run = c.get_run(mv.run_id);"
        "arts = [a.path for d in ('evaluation', 'features') for a in c.list_artifacts(mv.run_id, d)];"
        "print(json.dumps({'run': mv.run_id, 'acc': run.data.metrics.get('test_accuracy'),"
        " 'arch': run.data.tags.get('arch'), 'seed': run.data.tags.get('seed'), 'arts': arts}))"
    )
    got = json.loads(run([sys.executable, "-c", probe], repo).stdout.strip().splitlines()[-1])
    assert got["run"] == champions["digits"]["run_id"] and got["arch"] == best
    assert got["seed"] == str(SEED)
    assert got["acc"] == pytest.approx(champions["digits"]["test_accuracy"])
    assert "evaluation/confusion.png" in got["arts"] and "features/embedding-map.png" in got["arts"]

    # ---- what DVC shows: every arch's metrics, curves, confusion matrices and pictures
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    files = next(iter(shown.values()))["data"]
    for arch in ARCHS:
        assert files[f"metrics/{run_of(arch)}/test.json"]["data"]["test_accuracy"] >= 0
        assert "best_val_accuracy" in files[f"metrics/{run_of(arch)}/train.json"]["data"]
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    for arch in ARCHS:
        confusion = plots[f"metrics/{run_of(arch)}/predictions.csv"][0]["content"]
        assert '"rect"' in json.dumps(confusion)  # DVC's confusion template
        assert len(confusion["data"]["values"]) == n_test
        assert plots[f"metrics/{run_of(arch)}/history.csv"][0]["type"] == "vega"
        for png in ("evaluate/confusion.png", "evaluate/misclassified.png",
                    "features/embedding-map.png"):
            assert plots[f"reports/{run_of(arch)}/{png}"][0]["type"] == "image"
    assert plots["reports/curves/val-curves-digits.png"][0]["type"] == "image"

    # ---- a mistyped param fails its stage under `dvc repro` and loses no git-tracked output
    # (persist: true; DVC deletes the others first, which `dvc checkout` restores from its cache)
    tracked = [p for p in ("reports/leaderboard.csv", "reports/leaderboard.md", "reports/runs.csv",
                           "reports/champions.json",
                           *(f"metrics/{run_of(a)}/{f}" for a in ARCHS for f in (
                               "train.json", "history.csv", "test.json", "predictions.csv",
                               "per_class.csv")))]
    before = {p: (repo / p).read_bytes() for p in tracked}
    good = (repo / "params.yaml").read_text()
    for key, typo in (("rank_by: test_accuracy", "rank_by: accuracy"),
                      ("eval_batch_size: 2000", "eval_batch_size: 2000.5")):
        assert key in good, key
        (repo / "params.yaml").write_text(good.replace(key, typo, 1))
        p = run(["dvc", "repro"], repo, check=False, env=stage_env(repo))
        assert p.returncode != 0 and "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
        assert "error: params.yaml: " in p.stdout + p.stderr, p.stdout + p.stderr
        assert {p: (repo / p).read_bytes() for p in tracked} == before, typo
    (repo / "params.yaml").write_text(good)
    run(["dvc", "checkout"], repo)
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}

    # ---- the gate: unchanged results pass
    (tmp / "profile.yaml").write_text("datasets: [digits]\n")
    gate(repo, "accept", tmp)
    p = gate(repo, "check", tmp)
    assert "**Gate passed**" in p.stdout

    # ---- a planted regression: a deliberately bad learning rate for one arch
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "results"], repo)
    run(["dvc", "exp", "run", "-n", "bad-lr", "-S", "hparams.mlp.lr=0.0001"], repo, timeout=900)
    p = gate(repo, "check", tmp, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"- {run_of('mlp')} test_accuracy: REGRESSION" in p.stdout
    assert f"- {run_of('mlp')} macro_f1: REGRESSION" in p.stdout
    assert "digits/lenet5" not in p.stdout.split("**Gate FAILED**")[1]  # only the culprit is named
    assert "regression gate failed" in p.stderr

    # DVC compares the experiment with the committed results, arch by arch
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)
    acc = diff[f"metrics/{run_of('mlp')}/test.json"]["test_accuracy"]
    assert acc["new"] < acc["old"]
    assert f"metrics/{run_of('lenet5')}/test.json" not in diff  # untouched arch: not rerun
    exp = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    assert "bad-lr" in json.dumps(exp) and f"metrics/{run_of('lenet5')}/test.json" in json.dumps(exp)
    run(["dvc", "plots", "diff", "HEAD", "-o", "plots_diff"], repo)  # the HTML, both revisions
    html = (repo / "plots_diff" / "index.html").read_text()
    assert f"digits/mlp seed {SEED} test confusion" in html  # dvc.yaml's title of the confusion plot
    assert f"reports_digits_mlp_seed-{SEED}_evaluate_confusion_png" in html

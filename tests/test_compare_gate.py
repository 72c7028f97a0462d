"""compare (leaderboard, curves, champion registration) and the CI regression gate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers.checks import assert_png
from helpers.mlflow import open_run
from helpers.repo import ROOT, write_committed_params

from mnistlab import tracking
from mnistlab.ci import copies, gate
from mnistlab.config import run_dir, run_key
from mnistlab.errors import MnistlabError
from mnistlab.models import build_model
from mnistlab.stages import compare
from mnistlab.stats import holm, mcnemar, seed_interval, welch, wilson_interval
from mnistlab.utils import json_digest, write_json

RULES = {"test_accuracy": gate.Rule("max", 0.01, "evidence"), "macro_f1": gate.Rule("max", 0.01),
         "test_loss": gate.Rule("min", 0.05)}
GATE = {"metrics": {"test_accuracy": {"direction": "max", "tolerance": 0.01},
                    "macro_f1": {"direction": "max", "tolerance": 0.01},
                    "test_loss": {"direction": "min", "tolerance": 0.05}},
        "require_best": {"ds": "b"}}


SEED = 1234  # the runs' training seed where a test does not choose one


def write_run(root, ds: str, arch: str, acc: float, loss: float = 0.1, params: int = 1000,
              epochs: int = 3, n: int = 100, seed: int = SEED) -> None:
    """train.json, test.json, history.csv and predictions.csv as train and evaluate write them,
    in ``root/<ds>/<arch>/seed-<seed>/``.

    Of the ``n`` test images (classes ``i % 10``), the first ``round(acc * n)`` are right.
    """
    d = run_dir(root, ds, arch, seed)
    k = round(acc * n)
    write_json(d / "train.json", {"parameters": params, "train_seconds": 2.5, "epochs": epochs,
                                  "train_images_per_second": 1234.5, "best_val_accuracy": acc,
                                  "final_val_accuracy": acc})
    lo, hi = wilson_interval(k, n)
    write_json(d / "test.json", {"test_accuracy": acc, "test_loss": loss, "macro_f1": acc - 0.01,
                                 "test_samples": n, "test_accuracy_ci_low": lo,
                                 "test_accuracy_ci_high": hi})
    write_predictions(d, np.arange(n) < k)
    rows = [f"{e},{acc * e / epochs:.4f},{1.0 / e:.4f}" for e in range(1, epochs + 1)]
    (d / "history.csv").write_text("epoch,val_accuracy,val_loss\n" + "\n".join(rows) + "\n")


def write_predictions(d, correct) -> None:
    """predictions.csv: image i has class ``i % 10``, predicted right where ``correct[i]``."""
    rows = [f"{i % 10},{i % 10 if c else (i + 1) % 10}" for i, c in enumerate(correct)]
    (d / "predictions.csv").write_text("actual,predicted\n" + "\n".join(rows) + "\n")


# --------------------------------------------------------------------------- compare


def compare_params(datasets: list[str], archs: list[str], seeds: Sequence[int] = (SEED,),
                   rank_by: str = "test_accuracy") -> dict:
    """The params.yaml keys the compare stage reads, with the registry off."""
    return {"datasets": datasets, "archs": archs, "seeds": list(seeds),
            "compare": {"rank_by": rank_by, "register": False, "registry_prefix": "x",
                        "alias": "champion"}}


def compare_paths(tmp_path, pairwise: bool = False) -> compare.ComparePaths:
    """dvc.yaml's compare outputs under ``tmp_path`` (reading ``tmp_path/metrics``)."""
    return compare.ComparePaths(tmp_path / "metrics", tmp_path / "models", tmp_path / "out",
                                tmp_path / "curves",
                                pairwise=tmp_path / "pairwise" if pairwise else None)


def test_leaderboard_ranks_each_dataset_with_tie_breaks(tmp_path):
    write_run(tmp_path, "ds", "a", 0.90)
    write_run(tmp_path, "ds", "b", 0.95, loss=0.2, params=500)
    write_run(tmp_path, "ds", "c", 0.95, loss=0.2, params=100)  # tie with b: fewer parameters wins
    write_run(tmp_path, "ds", "d", 0.95, loss=0.1, params=900)  # tie on accuracy: lower loss wins
    write_run(tmp_path, "other", "a", 0.5)
    board = compare.leaderboard(_two_datasets(tmp_path), "test_accuracy")
    ds = board[board["dataset"] == "ds"]
    assert ds["arch"].tolist() == ["d", "c", "b", "a"] and ds["rank"].tolist() == [1, 2, 3, 4]
    assert board["dataset"].tolist()[-1] == "other"  # params order of datasets kept
    by_loss = compare.leaderboard(_two_datasets(tmp_path), "test_loss")
    # a and d share the lowest loss (0.1): fewer parameters (a: 1000, d: 900) breaks the tie
    assert by_loss[by_loss["dataset"] == "ds"]["arch"].tolist() == ["d", "a", "c", "b"]
    assert list(board.columns) == compare.COLUMNS


def _two_datasets(root):
    return pd.concat([compare.collect(root, ["ds"], ["a", "b", "c", "d"], [SEED]),
                      compare.collect(root, ["other"], ["a"], [SEED])], ignore_index=True)


def test_collect_names_the_missing_file(tmp_path):
    write_run(tmp_path, "ds", "a", 0.9)
    (run_dir(tmp_path, "ds", "a", SEED) / "test.json").unlink()
    with pytest.raises(MnistlabError, match=r"a/seed-1234/test.json: missing \(run its evaluate stage\)"):
        compare.collect(tmp_path, ["ds"], ["a"], [SEED])


def test_markdown_table_has_every_row(tmp_path):
    write_run(tmp_path, "ds", "a", 0.9123456, params=1234567)
    write_run(tmp_path, "ds", "b", 0.8)
    md = compare.to_markdown(compare.leaderboard(compare.collect(tmp_path, ["ds"], ["a", "b"], [SEED]),
                                                 "test_accuracy"))
    lines = md.strip().splitlines()
    assert lines[0].startswith("| dataset") and "test_accuracy" in lines[0]
    assert len(lines) == 4 and "0.9123" in lines[2] and "1,234,567" in lines[2]


def test_run_compare_writes_leaderboard_and_curves_without_registry(tmp_path):
    metrics = tmp_path / "metrics"
    for ds in ("d1", "d2"):
        write_run(metrics, ds, "a", 0.9, epochs=4)
        write_run(metrics, ds, "b", 0.8, epochs=40)
    params = compare_params(["d1", "d2"], ["a", "b"], rank_by="macro_f1")
    paths = compare_paths(tmp_path)
    board = compare.run_compare(params, paths)
    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert len(csv) == 4 and csv["test_accuracy"].tolist() == board["test_accuracy"].tolist()
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert md.count("\n| d1 ") == 2 and md.count("\n| d2 ") == 2
    for ds in ("d1", "d2"):
        assert_png(tmp_path / "curves" / f"val-curves-{ds}.png", 200)
    assert json.loads((tmp_path / "out" / "champions.json").read_text()) == {}
    with pytest.raises(MnistlabError, match="compare.rank_by: unknown value 'speed'"):
        compare.run_compare({**params, "compare": {**params["compare"], "rank_by": "speed"}}, paths)


def test_compare_output_ends_with_where_to_look(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics"
    for ds in ("d1", "d2"):
        write_run(metrics, ds, "a", 0.9)
        write_run(metrics, ds, "b", 0.8)
    params = compare_params(["d1", "d2"], ["a", "b"])
    paths = compare_paths(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    out = compare.report(params, paths)
    board, block = out.split("\nWhere to look:\n")
    assert board.startswith("| dataset") and "| d2 " in board
    assert f"leaderboard  {tmp_path / 'out' / 'leaderboard.md'}" in block
    for ds in ("d1", "d2"):  # not registered: the champion's model file
        assert f"champion     {ds}: a (test_accuracy 0.9000) -> " \
               f"{tmp_path / 'models' / ds / 'a' / 'seed-1234' / 'model.pt'}" in block
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db\n" in block
    assert "dvc plots show" in block
    assert f'make predict ARGS="my-digit.png --model {tmp_path / "models/d1/a/seed-1234/model.pt"}"' in block

    # A registered champion is named by its alias; a server with credentials is shown without them.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cr3t@mlflow.example.com:5000/")
    block = compare.where_to_look(compare.leaderboard(compare.collect(metrics, ["d1"], ["a", "b"], [SEED]),
                                                      "test_accuracy"),
                                  paths, {"d1": {"uri": "models:/x-d1@champion"}})
    assert "open https://mlflow.example.com:5000/  (credentials removed)" in block
    assert "s3cr3t" not in block and "alice" not in block
    assert "-> models:/x-d1@champion" in block and "--model models:/x-d1@champion" in block
    pointer = compare.mlflow_pointer("postgresql://bob:pw@db.example.com/mlflow")
    assert pointer == ("mlflow ui --backend-store-uri postgresql://db.example.com/mlflow"
                       "  (credentials removed)")


def test_register_champion_sets_alias_and_reuses_versions(tmp_path, mlflow_store):
    runs = []
    for arch in ("mlp", "lenet5"):
        run_id = open_run(tmp_path / arch, "ds", arch)
        example = np.zeros((2, 1, 28, 28), dtype=np.float32)  # as the train stage logs it
        tracking.log_pytorch_model(run_id, build_model(arch), example)
        runs.append(run_id)
    c = tracking.client()
    v1 = compare.register_champion("mnistlab-test", runs[0], "champion", {"arch": "mlp"})
    assert compare.register_champion("mnistlab-test", runs[0], "champion", {}) == v1  # no new version
    assert c.get_model_version_by_alias("mnistlab-test", "champion").run_id == runs[0]
    v2 = compare.register_champion("mnistlab-test", runs[1], "champion", {"arch": "lenet5"})
    assert v2 != v1
    mv = c.get_model_version_by_alias("mnistlab-test", "champion")
    assert mv.run_id == runs[1] and str(mv.version) == v2 and mv.tags["arch"] == "lenet5"
    # the champion loads back as the model that was logged
    import mlflow.pytorch

    with tracking.fluent_uri(tracking.tracking_uri()):  # restored after: no global left behind
        model = mlflow.pytorch.load_model("models:/mnistlab-test@champion")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)  # same batch as the example


def test_register_champion_names_a_missing_run(mlflow_store):
    with pytest.raises(MnistlabError, match="MLflow run 0123456789abcdef not found"):
        compare.register_champion("x", "0123456789abcdef", "champion", {})


# --------------------------------------------------------------------------- the gate: judging


@pytest.mark.parametrize(("metric", "base", "new", "verdict"), [
    ("test_accuracy", 0.95, 0.95, "ok"),
    ("test_accuracy", 0.95, 0.941, "ok"),          # within tolerance
    ("test_accuracy", 0.95, 0.93, "REGRESSION"),
    ("test_accuracy", 0.95, 0.97, "improved"),
    ("test_loss", 0.20, 0.30, "REGRESSION"),       # lower is better
    ("test_loss", 0.20, 0.10, "improved"),
    ("test_loss", 0.20, 0.24, "ok"),
    ("test_accuracy", 0.95, math.nan, "REGRESSION"),
])
def test_judge(metric, base, new, verdict):
    assert gate.judge(base, new, RULES[metric]) == verdict


def test_compare_results_planted_regression_missing_and_new():
    base = {"ds/a": {"test_accuracy": 0.95, "macro_f1": 0.94, "test_loss": 0.2},
            "ds/b": {"test_accuracy": 0.97, "macro_f1": 0.96, "test_loss": 0.1},
            "ds/gone": {"test_accuracy": 0.9, "macro_f1": 0.9, "test_loss": 0.3}}
    new = {"ds/a": {"test_accuracy": 0.50, "macro_f1": 0.94, "test_loss": 0.2},   # planted
           "ds/b": {"test_accuracy": 0.99, "macro_f1": 0.96, "test_loss": 0.1},
           "ds/extra": {"test_accuracy": 0.8, "macro_f1": 0.8, "test_loss": 0.5}}
    rows = {(r.key, r.metric): r for r in gate.compare_results(base, new, RULES)}
    assert rows[("ds/a", "test_accuracy")].verdict == "REGRESSION"
    assert rows[("ds/a", "test_accuracy")].delta == pytest.approx(-0.45)
    assert rows[("ds/a", "macro_f1")].verdict == "ok"
    assert rows[("ds/b", "test_accuracy")].verdict == "improved"
    assert {rows[("ds/gone", m)].verdict for m in RULES} == {"MISSING"}
    assert {rows[("ds/extra", m)].verdict for m in RULES} == {"new"}
    report = gate.render(list(rows.values()), [], "t")
    assert ("| run | metric | baseline | new | delta | tolerance | p-value | discordant "
            "| verdict |") in report
    assert "**Gate FAILED**" in report
    # no per-image outcomes here: test_accuracy falls back to its tolerance, and says so
    assert ("- ds/a test_accuracy: REGRESSION (tolerance: the baseline has no per-image outcomes), "
            "0.9500 → 0.5000") in report
    assert "- ds/gone test_accuracy: MISSING (no result)" in report
    assert "- ds/b test_accuracy: improved 0.9700 → 0.9900" in report


def test_unchanged_results_pass():
    base = {"ds/a": {"test_accuracy": 0.95, "macro_f1": 0.94, "test_loss": 0.2}}
    rows = gate.compare_results(base, json.loads(json.dumps(base)), RULES)
    assert [r.verdict for r in rows] == ["ok"] * 3
    assert "**Gate passed**: 3 checks, 0 improvement(s)." in gate.render(rows, [], "t")


def test_check_best():
    new = {"ds/a": {"test_accuracy": 0.97}, "ds/b": {"test_accuracy": 0.98},
           "other/a": {"test_accuracy": 0.99}}
    assert [r.verdict for r in gate.check_best(new, {"ds": "b"})] == ["ok"]
    (row,) = gate.check_best(new, {"ds": "a"})
    assert row.verdict == "FAILED" and "best other: ds/b 0.9800" in row.note
    tie = {"ds/a": {"test_accuracy": 0.98}, "ds/b": {"test_accuracy": 0.98}}
    assert gate.check_best(tie, {"ds": "b"})[0].verdict == "FAILED"  # must beat, not tie
    assert gate.check_best(new, {"ds": "zzz"})[0].verdict == "MISSING"
    assert gate.check_best(new, {"not_run": "a"}) == []  # a dataset the profile does not run


def test_gate_rules_validate():
    assert gate.gate_rules(GATE) == RULES
    bad = {"metrics": {"test_accuracy": {"direction": "up", "tolerance": 0.1}}}
    with pytest.raises(MnistlabError, match="gate.yaml: metrics.test_accuracy.direction: unknown value 'up'"):
        gate.gate_rules(bad)
    bad = {"metrics": {"test_accuracy": {"direction": "max", "tolerance": -1}}}
    with pytest.raises(MnistlabError, match="gate.yaml: metrics.test_accuracy.tolerance must be"):
        gate.gate_rules(bad)


# --------------------------------------------------------------------------- the gate: files + CLI


def gate_workdir(tmp_path, accs: dict[str, float]):
    """A finished CI run (merged params.yaml + the shard ``ds/`` with its metrics) and a profile.

    The gate's settings are ``GATE``.
    """
    work = tmp_path / "work"
    archs = sorted({k.split("/")[1] for k in accs})
    params = {"datasets": ["ds"], "archs": archs, "seeds": [SEED], "paths": {"metrics": "metrics"}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for key, acc in accs.items():
        write_run(work / "ds" / "metrics", *key.split("/"), acc)
    profile = tmp_path / "profile.yaml"
    if not profile.exists():
        profile.write_text("datasets: [ds]\n")
    return work, profile


def test_accept_then_check_passes_and_a_planted_regression_fails(tmp_path):
    work, profile = gate_workdir(tmp_path, {"ds/a": 0.90, "ds/b": 0.95})
    baseline = tmp_path / "baseline.json"
    base = gate.accept(tmp_path, work, profile, baseline, GATE)
    assert base["results"]["ds/a/seed-1234"] == {"test_accuracy": 0.90, "macro_f1": pytest.approx(0.89),
                                       "test_loss": 0.1}
    assert base["profile_digest"] == json_digest({"datasets": ["ds"]})

    passed, report = gate.check(work, profile, baseline, GATE)
    assert passed, report

    write_run(work / "ds" / "metrics", "ds", "a", 0.60)  # the planted regression
    passed, report = gate.check(work, profile, baseline, GATE)
    assert not passed
    assert "ds/a/seed-1234 test_accuracy: REGRESSION" in report
    assert "ds/a/seed-1234 macro_f1: REGRESSION" in report
    assert "ds/b/seed-1234 test_accuracy" not in report.split("**Gate FAILED**")[1]


def test_check_fails_when_an_arch_is_missing_or_the_profile_changed(tmp_path):
    work, profile = gate_workdir(tmp_path, {"ds/a": 0.90, "ds/b": 0.95})
    baseline = tmp_path / "baseline.json"
    gate.accept(tmp_path, work, profile, baseline, GATE)
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump({**params, "archs": ["b"]}))
    passed, report = gate.check(work, profile, baseline, GATE)  # ds/a's old files stay on disk
    assert not passed and "ds/a/seed-1234 test_accuracy: MISSING (no result)" in report

    assert "archs b (baseline: a, b)" in report and "git checkout params.yaml" in report

    (work / "params.yaml").write_text(yaml.safe_dump(params))
    passed, report = gate.check(work, profile, baseline, GATE)
    assert passed and "other datasets x archs x seeds" not in report, report
    profile.write_text("datasets: [ds]\ntrain: {min_steps: 1}\n")
    passed, report = gate.check(work, profile, baseline, GATE)
    assert not passed and "was made with another profile.yaml" in report


def test_accept_refuses_incomplete_results(tmp_path):
    work, profile = gate_workdir(tmp_path, {"ds/a": 0.9, "ds/b": 0.95})
    (run_dir(work / "ds" / "metrics", "ds", "b", SEED) / "test.json").unlink()
    with pytest.raises(MnistlabError, match="no complete results for ds/b/seed-1234"):
        gate.accept(tmp_path, work, profile, tmp_path / "baseline.json", GATE)


def test_cli_exit_codes_and_summary(tmp_path):
    work, profile = gate_workdir(tmp_path, {"ds/a": 0.90, "ds/b": 0.95})
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "gate.yaml").write_text(yaml.safe_dump(GATE))  # the default --config
    base, summary = tmp_path / "baseline.json", tmp_path / "summary.md"
    args = ["--root", str(tmp_path), "--workdir", str(work), "--profile", str(profile),
            "--baseline", str(base)]

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "mnistlab.ci.gate", *extra, *args],
                              capture_output=True, text=True, cwd=tmp_path)

    p = cli("check")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "make baseline" in p.stderr
    assert cli("accept").returncode == 0
    p = cli("check", "--summary", str(summary))
    assert p.returncode == 0 and "**Gate passed**" in p.stdout
    write_run(work / "ds" / "metrics", "ds", "b", 0.5)
    p = cli("check", "--summary", str(summary))
    assert p.returncode == 1, p.stdout
    assert "ds/b/seed-1234 test_accuracy: REGRESSION" in p.stdout and "regression gate failed" in p.stderr
    assert "ds/b best test_accuracy: FAILED" in p.stdout  # require_best {ds: b}
    assert summary.read_text().count("## Regression gate") == 2  # appended, as GitHub expects
    assert (work / "gate-report.md").read_text() in p.stdout


# --------------------------------------------------------------------------- the gate: the CI copy


def test_deep_merge_and_rebased_sources(tmp_path):
    merged = copies.deep_merge({"a": {"x": 1, "y": 2}, "l": [1, 2], "k": 1},
                               {"a": {"y": 3}, "l": [9]})
    assert merged == {"a": {"x": 1, "y": 3}, "l": [9], "k": 1}
    params = {"sources": {"rel": "../shared/d", "url": "https://h/x/", "emb": {"embedded": "e"},
                          "m": {"mirrors": ["here", "/abs", "http://u/"]}}}
    out = copies.rebase_sources(params, tmp_path)["sources"]
    assert out["rel"] == str((tmp_path / "../shared/d").resolve())
    assert out["url"] == "https://h/x/" and out["emb"] == {"embedded": "e"}
    assert out["m"]["mirrors"] == [str(tmp_path / "here"), "/abs", "http://u/"]


def test_prepare_copies_the_tree_with_the_profile(tmp_path):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "m.py").write_text("x = 1\n")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "dvc.lock").write_text("lock of the default run\n")
    (repo / "metrics" / "ds").mkdir(parents=True)
    (repo / "metrics" / "ds" / "train.json").write_text("{}")  # a tracked DVC output
    (repo / ".gitignore").write_text("/ignored/\n/build/\n")
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_text("no")
    params = {"datasets": ["a"], "paths": {"metrics": "metrics"}, "train": {"min_steps": 9, "bf16": True},
              "sources": {"mini": "../shared/mini"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "profile.yaml").write_text("datasets: [a, mini]\ntrain: {min_steps: 1}\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    (repo / "src" / "new.py").write_text("untracked but not ignored: copied\n")

    work = repo / "build" / "ci"
    gate.prepare(repo, work, repo / "profile.yaml")
    assert yaml.safe_load((work / "params.yaml").read_text())["datasets"] == ["a", "mini"]
    for ds in ("a", "mini"):  # one complete copy per dataset
        shard = work / ds
        got = yaml.safe_load((shard / "params.yaml").read_text())
        assert got["datasets"] == [ds] and got["train"] == {"min_steps": 1, "bf16": True}
        assert got["sources"]["mini"] == str((tmp_path / "shared" / "mini").resolve())
        assert (shard / "src" / "new.py").is_file() and (shard / "dvc.yaml").is_file()
        assert not (shard / "dvc.lock").exists() and not (shard / "metrics").exists()
        assert not (shard / "ignored").exists() and not (shard / "build").exists()
        assert "no_scm = true" in (shard / ".dvc" / "config.local").read_text()
    assert yaml.safe_load((repo / "params.yaml").read_text()) == params  # the repo is untouched

    # idempotent: unchanged files are not rewritten (DVC sees nothing new); removed ones go
    shard = work / "mini"
    (shard / "dvc.lock").write_text("the copy's own lock\n")
    stamps = [(shard / f).stat().st_mtime_ns for f in ("src/m.py", "params.yaml")]
    (repo / "src" / "new.py").unlink()
    gate.prepare(repo, work, repo / "profile.yaml")
    assert [(shard / f).stat().st_mtime_ns for f in ("src/m.py", "params.yaml")] == stamps
    assert not (shard / "src" / "new.py").exists()
    assert (shard / "dvc.lock").read_text() == "the copy's own lock\n"

    (repo / "profile.yaml").write_text("nonsense: 1\n")
    with pytest.raises(MnistlabError, match="override\\(s\\) nonsense name no key of params.yaml"):
        gate.prepare(repo, work, repo / "profile.yaml")


def test_run_pipeline_runs_every_shard_and_names_the_failed_one(tmp_path, monkeypatch, capsys):
    # A stand-in `dvc` that records its environment, and fails in shard "bad".
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text("#!/bin/sh\necho \"threads=$OMP_NUM_THREADS uri=$MLFLOW_TRACKING_URI\"\n"
                                 "echo \"code=$PYTHONPATH\"\n"
                                 "echo \"args=$*\"\n"
                                 "[ \"$(basename $PWD)\" != bad ]\n")
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    for ds in ("good", "bad", "fine"):
        (tmp_path / "w" / ds).mkdir(parents=True)
    params = {"datasets": ["good", "bad", "fine"]}
    settings = {"jobs": 2, "threads": 1, "targets": ["compare"]}
    with pytest.raises(MnistlabError, match=r"failed in \S*/w/bad \(exit 1\); its output is above"):
        gate.run_pipeline(tmp_path / "w", params, settings)
    out = capsys.readouterr().out
    assert out.count("threads=1 uri=sqlite:///mlflow.db") == 3  # every shard ran, pinned
    assert out.count("args=repro compare\n") == 3  # only the stages the gate reads
    for ds in ("good", "bad", "fine"):
        assert f"----- [{ds}] dvc repro exited" in out
        # each copy runs its own synced code, not the working tree's editable install
        assert f"code={(tmp_path / 'w' / ds / 'src').resolve()}" in out


@pytest.mark.parametrize("argv, jobs", [([], 2), (["--jobs", "1"], 1), (["--jobs", "0"], None)])
def test_pipeline_jobs_from_the_command_line_over_gate_yaml(tmp_path, monkeypatch, capsys, argv, jobs):
    """`make ci-gate GATE_JOBS=1` (.ci/run, beside the tests): --jobs beats ci/gate.yaml's jobs,
    and is checked like it."""
    seen = {}
    monkeypatch.setattr(gate, "prepare", lambda root, workdir, profile: None)
    write_committed_params(tmp_path / "params.yaml")  # what prepare would have written
    monkeypatch.setattr(gate, "run_shards", lambda shards, j, threads, what, targets=None:
                        seen.update(jobs=j, threads=threads, targets=targets))
    call = ["pipeline", "--root", str(ROOT), "--workdir", str(tmp_path), *argv]
    if jobs is None:
        with pytest.raises(SystemExit) as e:
            gate.main(call)
        assert e.value.code == 2 and not seen
        assert "argument --jobs: must be a positive integer, got '0'" in capsys.readouterr().err
    else:
        assert gate.main(call) == 0
        assert seen == {"jobs": jobs, "threads": 1, "targets": ["compare"]}
        assert gate.load_settings(ROOT / gate.CONFIG)["jobs"] == 2  # the file's, for the default


@pytest.mark.parametrize("settings, expected", [
    ({}, []), ({"targets": None}, []), ({"targets": []}, []), ({"targets": ["compare"]}, ["compare"]),
    ({"targets": ["train@digits-mlp", "compare"]}, ["train@digits-mlp", "compare"])])
def test_repro_targets_name_stages_or_mean_every_stage(settings, expected):
    assert gate.repro_targets(settings) == expected


@pytest.mark.parametrize("targets", ["compare", [""], [3], {"compare": 1}])
def test_bad_repro_targets_are_one_line_naming_the_file(targets):
    with pytest.raises(MnistlabError, match=r"^ci/gate.yaml: targets must be a list of stage names"):
        gate.repro_targets({"targets": targets})


def test_the_gate_reproduces_every_stage_its_verdict_reads():
    """ci/gate.yaml's targets reach every train and evaluate stage of dvc.yaml: compare depends on
    the whole metrics/ and models/ trees, so a gate that skipped one could not judge it."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    targets = gate.repro_targets(gate.load_settings(ROOT / gate.CONFIG))
    assert targets == ["compare"]
    deps = dvc["compare"]["deps"]
    assert {"${paths.metrics}", "${paths.models}", "${paths.split}"} <= set(deps)
    assert "${paths.features}" not in deps  # features feeds nothing the gate reads


def test_repo_profile_and_baseline_agree(tmp_path):
    """The committed baseline belongs to the committed CI profile and covers all it runs."""
    write_committed_params(tmp_path / "params.yaml")  # not the working tree's `dvc exp run -S` edits
    params = gate.profile_params(tmp_path, ROOT / "ci" / "profile.yaml")
    base = gate.read_baseline(ROOT / "ci" / "baseline.json")
    assert base["profile_digest"] == json_digest(gate.load_profile(ROOT / "ci" / "profile.yaml")), \
        "ci/profile.yaml changed since ci/baseline.json was made: run `make baseline`"
    expected = {run_key(d, a, s) for d in params["datasets"] for a in params["archs"]
                for s in params["seeds"]}
    assert set(base["results"]) == expected
    for metrics in base["results"].values():
        assert set(metrics) == set(gate.load_settings(ROOT / gate.CONFIG)["metrics"])


# --------------------------------------------------------------------------- intervals, paired tests


def test_leaderboard_intervals_and_paired_tests_against_the_best(tmp_path):
    write_run(tmp_path, "ds", "a", 0.90)  # rank 1: images 0..89 right
    write_run(tmp_path, "ds", "b", 0.80)  # a-only 10, b-only 0: clearly below
    write_run(tmp_path, "ds", "c", 0.89)  # a-only 1: no evidence
    correct = {"ds": compare.read_correct(tmp_path, "ds", ["a", "b", "c"], SEED)}
    board = compare.leaderboard(compare.collect(tmp_path, ["ds"], ["a", "b", "c"], [SEED]), "test_accuracy",
                                correct)
    assert list(board.columns) == compare.COLUMNS
    assert compare.COLUMNS[:11] == ["dataset", "rank", "arch", "test_accuracy", "test_loss",
                                    "macro_f1", "parameters", "train_seconds", "images_per_second",
                                    "epochs", "best_val_accuracy"]  # old columns first, in order
    row = board.set_index("arch")
    assert (row.at["a", "accuracy_ci_low"], row.at["a", "accuracy_ci_high"]) == \
        pytest.approx(wilson_interval(90, 100))
    p_b, p_c = mcnemar(correct["ds"]["a"], correct["ds"]["b"]).p_value, 1.0
    assert row.at["b", "p_vs_best"] == pytest.approx(holm([p_b, p_c])[0])  # 2 * 2**-9
    assert row.at["c", "p_vs_best"] == pytest.approx(1.0)
    assert math.isnan(row.at["a", "p_vs_best"])
    assert row["below_best"].to_dict() == {"a": "no", "b": "yes", "c": "no"}

    md = compare.to_markdown(board)
    header = md.splitlines()[0]
    assert header.index("best_val_accuracy") < header.index("accuracy_ci") < header.index("p_vs_best")
    assert "accuracy_ci_low" not in header
    lo, hi = wilson_interval(90, 100)
    assert f"0.9000 [{lo:.4f}, {hi:.4f}]" in md and " 0.0039 " in md  # b's p_vs_best, 2 significant digits


def test_pairwise_table_and_heat_map(tmp_path):
    metrics = tmp_path / "metrics"
    write_run(metrics, "ds", "a", 0.90)
    write_run(metrics, "ds", "b", 0.80)
    write_run(metrics, "ds", "c", 0.89)
    compare.run_compare(compare_params(["ds"], ["a", "b", "c"]), compare_paths(tmp_path, pairwise=True))
    pairs = pd.read_csv(tmp_path / "pairwise" / "ds.csv")
    assert list(pairs.columns) == compare.PAIRWISE
    # in rank order a, c, b
    assert list(zip(pairs["arch_a"], pairs["arch_b"], strict=True)) == [("a", "c"), ("a", "b"), ("c", "b")]
    assert pairs["a_only"].tolist() == [1, 10, 9] and pairs["b_only"].tolist() == [0, 0, 0]
    assert pairs["p_value"].tolist() == pytest.approx([1.0, 2 * 0.5**10, 2 * 0.5**9], rel=1e-5)
    assert pairs["p_holm"].tolist() == pytest.approx(holm(pairs["p_value"]).tolist(), rel=1e-5)
    assert_png(tmp_path / "curves" / "pairwise-ds.png", 100)
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert {"accuracy_ci_low", "accuracy_ci_high", "p_vs_best", "below_best"} <= set(board.columns)
    assert "accuracy_ci" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_one_arch_writes_a_pairwise_table_without_pairs_and_no_heat_map(tmp_path):
    # `dvc exp run -S 'archs=[mlp]'`: no pair to test, but the table is there (DVC warns of an
    # empty output folder), with the columns of a full one
    metrics = tmp_path / "metrics"
    write_run(metrics, "ds", "a", 0.90)
    compare.run_compare(compare_params(["ds"], ["a"]), compare_paths(tmp_path, pairwise=True))
    pairs = pd.read_csv(tmp_path / "pairwise" / "ds.csv")
    assert list(pairs.columns) == compare.PAIRWISE and pairs.empty
    assert not (tmp_path / "curves" / "pairwise-ds.png").exists()
    assert (tmp_path / "curves" / "val-curves-ds.png").is_file()


def test_paired_tests_need_the_same_test_images(tmp_path):
    write_run(tmp_path, "ds", "a", 0.9)
    write_run(tmp_path, "ds", "b", 0.8, n=90)
    with pytest.raises(MnistlabError, match=r"b/seed-1234/predictions.csv: not the test images of ds/a/seed-1234"):
        compare.read_correct(tmp_path, "ds", ["a", "b"], SEED)
    write_run(tmp_path, "ds", "b", 0.8)
    (run_dir(tmp_path, "ds", "b", SEED) / "predictions.csv").unlink()  # an old tree: no paired test, no error
    board = compare.leaderboard(compare.collect(tmp_path, ["ds"], ["a", "b"], [SEED]), "test_accuracy",
                                {"ds": compare.read_correct(tmp_path, "ds", ["a", "b"], SEED)})
    assert board["below_best"].tolist() == ["no", "n/a"]
    assert "| —" in compare.to_markdown(board)


# --------------------------------------------------------------------------- the gate: evidence


def flip(correct: np.ndarray, n_break: int = 0, n_fix: int = 0) -> np.ndarray:
    """``correct`` with its first ``n_break`` right images made wrong, first ``n_fix`` wrong ones right."""
    out = correct.copy()
    out[np.flatnonzero(correct)[:n_break]] = False
    out[np.flatnonzero(~correct)[:n_fix]] = True
    return out


def judged(before: np.ndarray, after: np.ndarray, rules=RULES) -> gate.Row:
    """The test_accuracy row of the gate for one entry whose outcomes go from ``before`` to ``after``."""
    rows = gate.compare_results({"ds/a": {"test_accuracy": float(before.mean())}},
                                {"ds/a": {"test_accuracy": float(after.mean())}},
                                {"test_accuracy": rules["test_accuracy"]},
                                {"ds/a": gate.encode_correct(before)}, {"ds/a": after})
    (row,) = rows
    return row


BASE_2000 = np.arange(2000) % 20 != 0  # 1,900 of 2,000 right (0.95)
BASE_360 = np.arange(360) % 20 != 0    # 342 of 360 right (0.95)


def test_evidence_passes_an_unchanged_result():
    row = judged(BASE_2000, BASE_2000.copy())
    assert row.verdict == "ok" and row.test == (0, 0, 1.0) and row.tolerance == 0.005
    report = gate.render([row], [], "t")
    assert "| 1 | +0/−0 | ok |" in report and "**Gate passed**" in report


def test_evidence_fails_a_planted_regression_naming_arch_metric_and_p_value():
    row = judged(BASE_2000, flip(BASE_2000, n_break=40))  # 40 more errors of 2,000
    assert row.verdict == "REGRESSION" and row.delta == pytest.approx(-0.02)
    assert row.test.p_value == pytest.approx(2 * 0.5**40)
    report = gate.render([row], [], "t")
    assert "**Gate FAILED**" in report
    assert ("- ds/a test_accuracy: REGRESSION, 0.9500 → 0.9300, McNemar p=1.8e-12 "
            "(+0/−40 images)") in report
    assert "| 1.8e-12 | +0/−40 | ❌ REGRESSION |" in report


def test_evidence_passes_changes_that_prove_nothing():
    assert judged(BASE_2000, flip(BASE_2000, n_break=1)).verdict == "ok"  # one image of 2,000
    assert judged(BASE_360, flip(BASE_360, n_break=1)).verdict == "ok"    # one image of 360
    # four images of 360 (-0.0111): beyond the old 0.01 tolerance, but p = 2 / 2**4 = 0.125
    four = flip(BASE_360, n_break=4)
    row = judged(BASE_360, four)
    assert row.verdict == "ok" and row.test.p_value == pytest.approx(0.125)
    tolerance_only = {"test_accuracy": gate.Rule("max", 0.01, "tolerance")}
    assert judged(BASE_360, four, tolerance_only).verdict == "REGRESSION"
    assert judged(BASE_360, four, tolerance_only).test is None
    # many swaps, same accuracy: no evidence of a change either way
    assert judged(BASE_2000, flip(BASE_2000, n_break=30, n_fix=30)).verdict == "ok"


def test_evidence_needs_an_effect_larger_than_min_effect():
    base = np.arange(10000) % 20 != 0
    row = judged(base, flip(base, n_break=30))  # p ~ 2e-9, but only -0.003
    assert row.test.p_value < 1e-8 and row.verdict == "ok"
    row = judged(base, flip(base, n_fix=80))    # +0.008, p tiny
    assert row.verdict == "improved"


def test_evidence_falls_back_to_the_tolerance_and_says_why():
    rows = gate.compare_results({"ds/a": {"test_accuracy": 0.95}}, {"ds/a": {"test_accuracy": 0.93}},
                                RULES, {}, {"ds/a": BASE_2000})
    assert [(r.verdict, r.note, r.test) for r in rows] == [
        ("REGRESSION", "tolerance: the baseline has no per-image outcomes", None)]
    row = judged(BASE_360, BASE_2000)
    assert row.test is None and row.note == "tolerance: 2000 test images, the baseline had 360"


def test_gate_rules_judge_settings():
    spec = {"metrics": {"test_accuracy": {"direction": "max", "tolerance": 0.01, "judge": "evidence",
                                          "min_effect": 0.002, "alpha": 0.01},
                        "macro_f1": {"direction": "max", "tolerance": 0.01}}}
    rules = gate.gate_rules(spec)
    assert rules["test_accuracy"] == gate.Rule("max", 0.01, "evidence", 0.002, 0.01)
    assert rules["macro_f1"].judge == "tolerance"
    spec["metrics"]["macro_f1"]["judge"] = "evidence"
    with pytest.raises(MnistlabError, match="metrics.macro_f1.judge: evidence needs per-image"):
        gate.gate_rules(spec)
    spec["metrics"]["macro_f1"]["judge"] = "vibes"
    with pytest.raises(MnistlabError, match="metrics.macro_f1.judge: unknown value 'vibes'"):
        gate.gate_rules(spec)
    spec["metrics"]["macro_f1"]["judge"] = "tolerance"
    spec["metrics"]["test_accuracy"]["alpha"] = 1.5
    with pytest.raises(MnistlabError, match=r"alpha must be in \(0, 1\)"):
        gate.gate_rules(spec)
    committed = gate.gate_rules(gate.load_settings(ROOT / gate.CONFIG))
    assert committed["test_accuracy"].judge == "evidence"
    assert {committed[m].judge for m in ("macro_f1", "test_loss")} == {"tolerance"}


def test_accept_stores_outcomes_and_an_old_baseline_still_works(tmp_path):
    work, profile = gate_workdir(tmp_path, {"ds/a": 0.90, "ds/b": 0.95})
    baseline = tmp_path / "baseline.json"
    base = gate.accept(tmp_path, work, profile, baseline, GATE)
    assert base["correct"]["ds/a/seed-1234"] == "1" * 90 + "0" * 10
    passed, report = gate.check(work, profile, baseline, GATE)
    assert passed and "| +0/−0 |" in report

    old = {k: v for k, v in json.loads(baseline.read_text()).items() if k != "correct"}
    baseline.write_text(json.dumps(old))  # as committed before the evidence judge
    passed, report = gate.check(work, profile, baseline, GATE)
    assert passed and "tolerance: the baseline has no per-image outcomes" in report
    write_run(work / "ds" / "metrics", "ds", "a", 0.60)
    passed, report = gate.check(work, profile, baseline, GATE)
    assert not passed and "ds/a/seed-1234 test_accuracy: REGRESSION" in report


# --------------------------------------------------------------------------- seeds


SEEDS3 = [1, 2, 3]
ACCS = {"a": [0.90, 0.91, 0.92],   # mean 0.91: rank 1
        "b": [0.95, 0.80, 0.82],   # the best single run (seed 1), the worst mean
        "c": [0.90, 0.90, 0.91]}   # mean 0.9033


def _three_seeds(root):
    for arch, accs in ACCS.items():
        for seed, acc in zip(SEEDS3, accs, strict=True):
            write_run(root, "ds", arch, acc, loss=1 - acc, seed=seed)


def test_several_seeds_rank_by_the_mean_with_std_t_interval_and_welch(tmp_path):
    _three_seeds(tmp_path)
    runs = compare.collect(tmp_path, ["ds"], list(ACCS), SEEDS3)
    assert list(runs.columns) == compare.RUN_COLUMNS and len(runs) == 9
    correct = {"ds": compare.read_correct(tmp_path, "ds", list(ACCS), SEEDS3[0])}
    board = compare.leaderboard(runs, "test_accuracy", correct)
    assert list(board.columns) == compare.COLUMNS
    row = board.set_index("arch")
    assert board["arch"].tolist() == ["a", "c", "b"]  # by the mean, not by the best run (b's 0.95)
    assert row["seeds"].tolist() == [3, 3, 3]
    for arch, accs in ACCS.items():
        assert row.at[arch, "test_accuracy"] == pytest.approx(np.mean(accs))
        assert row.at[arch, "accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
        lo, hi = seed_interval(accs)  # clipped to [0, 1]: b's reaches past 1
        assert (row.at[arch, "accuracy_ci_low"], row.at[arch, "accuracy_ci_high"]) == \
            pytest.approx((max(lo, 0.0), min(hi, 1.0)))
        assert row.at[arch, "test_loss"] == pytest.approx(1 - np.mean(accs))
        assert row.at[arch, "ci"] == "t, 3 seeds"
    assert row["best_seed"].to_dict() == {"a": 3, "b": 1, "c": 3}  # c: 0.91 at seed 3
    # Welch's test of the per-seed accuracies against rank 1, Holm over the dataset's two tests
    p = holm([welch(ACCS["a"], ACCS["c"]), welch(ACCS["a"], ACCS["b"])])
    assert (row.at["c", "p_vs_best"], row.at["b", "p_vs_best"]) == pytest.approx(tuple(p))
    assert row["test"].to_dict() == {"a": "", "c": "welch", "b": "welch"}
    assert row.at["a", "below_best"] == "no"
    assert row.at["b", "below_best"] == ("yes" if p[1] < compare.ALPHA else "no")

    md = compare.to_markdown(board)
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header[:5] == ["dataset", "rank", "arch", "seeds", "test_accuracy"]
    assert header[-1] == "best_seed" and "ci" in header and "test" in header
    assert "0.9100 ± 0.0100" in md and "t, 3 seeds" in md and "welch" in md


def test_one_seed_leaderboard_hides_the_seed_columns(tmp_path):
    write_run(tmp_path, "ds", "a", 0.9)
    write_run(tmp_path, "ds", "b", 0.8)
    board = compare.leaderboard(compare.collect(tmp_path, ["ds"], ["a", "b"], [SEED]), "test_accuracy",
                                {"ds": compare.read_correct(tmp_path, "ds", ["a", "b"], SEED)})
    assert board["seeds"].tolist() == [1, 1] and board["ci"].tolist() == ["wilson", "wilson"]
    assert board["test"].tolist() == ["", "mcnemar"] and board["accuracy_std"].isna().all()
    header = compare.to_markdown(board).splitlines()[0]
    assert "seeds" not in header and "±" not in compare.to_markdown(board)
    assert "best_seed" not in header and "| ci " not in header


def test_run_compare_over_seeds_writes_runs_pairwise_at_the_first_seed_and_the_champion_run(
        tmp_path, monkeypatch):
    metrics = tmp_path / "metrics"
    _three_seeds(metrics)
    params = compare_params(["ds"], list(ACCS), SEEDS3)
    paths = compare_paths(tmp_path, pairwise=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    out = compare.report(params, paths)
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(runs) == 9 and runs["seed"].tolist() == SEEDS3 * 3
    assert runs["test_accuracy"].tolist() == pytest.approx(sum(ACCS.values(), []))
    assert "ranked by test_accuracy, mean of 3 seeds" in (tmp_path / "out" / "leaderboard.md").read_text()
    pairs = pd.read_csv(tmp_path / "pairwise" / "ds.csv")
    assert set(pairs["seed"]) == {1}  # McNemar needs one run per arch: the first seed's
    ab = pairs[(pairs["arch_a"] == "a") & (pairs["arch_b"] == "b")].iloc[0]
    assert (ab["a_only"], ab["b_only"]) == (0, 5)  # at seed 1, b (0.95) beat a (0.90)
    assert_png(tmp_path / "curves" / "val-curves-ds.png", 200)
    champion = run_dir(tmp_path / "models", "ds", "a", 3) / "model.pt"  # a's best seed
    assert f"champion     ds: a (mean test_accuracy 0.9100 over 3 seeds; seed 3) -> {champion}" in out


def test_champion_run_is_the_best_seed_of_the_rank_1_arch(tmp_path):
    _three_seeds(tmp_path)
    runs = compare.collect(tmp_path, ["ds"], list(ACCS), SEEDS3)
    board = compare.leaderboard(runs, "test_accuracy")
    run = compare.champion_run(board, runs, "ds")
    assert (run.arch, run.seed, run.test_accuracy) == ("a", 3, pytest.approx(0.92))
    by_loss = compare.leaderboard(runs, "test_loss")  # lower is better: the same run here
    assert compare.champion_run(by_loss, runs, "ds").seed == 3


def test_gate_require_best_uses_each_archs_mean_over_seeds():
    new = {"ds/a/seed-1": {"test_accuracy": 0.97}, "ds/a/seed-2": {"test_accuracy": 0.99},
           "ds/b/seed-1": {"test_accuracy": 0.985}, "ds/b/seed-2": {"test_accuracy": 0.98}}
    # a has the best single run (0.99) but the lower mean (0.98 against 0.9825)
    (row,) = gate.check_best(new, {"ds": "a"})
    assert row.verdict == "FAILED" and row.new == pytest.approx(0.98)
    assert "best other: ds/b 0.9825" in row.note
    assert gate.check_best(new, {"ds": "b"})[0].verdict == "ok"


def test_gate_reads_and_judges_every_seeds_run(tmp_path):
    work = tmp_path / "work"
    params = {"datasets": ["ds"], "archs": ["a"], "seeds": [1, 2], "paths": {"metrics": "metrics"}}
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for seed, acc in ((1, 0.90), (2, 0.92)):
        write_run(work / "ds" / "metrics", "ds", "a", acc, seed=seed)
    profile = tmp_path / "profile.yaml"
    profile.write_text("datasets: [ds]\nseeds: [1, 2]\n")
    base = gate.accept(tmp_path, work, profile, tmp_path / "baseline.json", GATE)
    assert set(base["results"]) == set(base["correct"]) == {"ds/a/seed-1", "ds/a/seed-2"}
    write_run(work / "ds" / "metrics", "ds", "a", 0.50, seed=2)  # one seed's run regresses
    passed, report = gate.check(work, profile, tmp_path / "baseline.json", GATE)
    assert not passed and "- ds/a/seed-2 test_accuracy: REGRESSION" in report
    assert "ds/a/seed-1 test_accuracy" not in report.split("**Gate FAILED**")[1]


def test_a_seed_interval_is_clipped_to_an_accuracys_range(tmp_path):
    """lenet5 on digits over five seeds: 0.95, 0.83, 0.96, 0.88 and 0.23 (stuck at chance):
    the t interval of the mean reaches past 1; an accuracy's does not."""
    accs = [0.95, 0.83, 0.96, 0.88, 0.23]
    for seed, acc in enumerate(accs, 1):
        write_run(tmp_path, "ds", "a", acc, seed=seed)
    board = compare.leaderboard(compare.collect(tmp_path, ["ds"], ["a"], [1, 2, 3, 4, 5]),
                                "test_accuracy")
    lo, hi = seed_interval(accs)
    assert hi > 1 and 0 < lo
    assert (board.at[0, "accuracy_ci_low"], board.at[0, "accuracy_ci_high"]) == (pytest.approx(lo), 1.0)


def test_check_says_when_params_yaml_runs_other_seeds_than_the_baseline(tmp_path, capsys):
    """`dvc exp run -S 'seeds=[1,2,3]'` leaves params.yaml edited, and the CI copies are made
    from it: the report says so (and how to undo it) above the MISSING rows."""
    work, profile = gate_workdir(tmp_path, {"ds/a": 0.90, "ds/b": 0.95})
    baseline = tmp_path / "baseline.json"
    gate.accept(tmp_path, work, profile, baseline, GATE)
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump({**params, "seeds": [1, 2, 3]}))
    passed, report = gate.check(work, profile, baseline, GATE)
    assert not passed
    assert (f"seeds 1, 2, 3 (baseline: {SEED})" in report
            and "archs" not in report.split("other datasets x archs x seeds")[1].split(".")[0])
    assert "`make baseline`" in report

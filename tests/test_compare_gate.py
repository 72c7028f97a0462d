"""compare (leaderboard, curves, champion registration) and the CI regression gate."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers.checks import assert_png
from helpers.mlflow import open_run
from helpers.repo import ROOT

from mnistlab import tracking
from mnistlab.ci import copies, gate
from mnistlab.errors import MnistlabError
from mnistlab.models import build_model
from mnistlab.stages import compare
from mnistlab.utils import json_digest, write_json

RULES = {"test_accuracy": gate.Rule("max", 0.01), "macro_f1": gate.Rule("max", 0.01),
         "test_loss": gate.Rule("min", 0.05)}
GATE = {"metrics": {"test_accuracy": {"direction": "max", "tolerance": 0.01},
                    "macro_f1": {"direction": "max", "tolerance": 0.01},
                    "test_loss": {"direction": "min", "tolerance": 0.05}},
        "require_best": {"ds": "b"}}


def write_run(root, ds: str, arch: str, acc: float, loss: float = 0.1, params: int = 1000,
              epochs: int = 3) -> None:
    """train.json, test.json and history.csv as the train and evaluate stages write them."""
    d = root / ds / arch
    write_json(d / "train.json", {"parameters": params, "train_seconds": 2.5, "epochs": epochs,
                                  "train_images_per_second": 1234.5, "best_val_accuracy": acc,
                                  "final_val_accuracy": acc})
    write_json(d / "test.json", {"test_accuracy": acc, "test_loss": loss, "macro_f1": acc - 0.01,
                                 "test_samples": 100})
    rows = [f"{e},{acc * e / epochs:.4f},{1.0 / e:.4f}" for e in range(1, epochs + 1)]
    (d / "history.csv").write_text("epoch,val_accuracy,val_loss\n" + "\n".join(rows) + "\n")


# --------------------------------------------------------------------------- compare


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
    return pd.concat([compare.collect(root, ["ds"], ["a", "b", "c", "d"]),
                      compare.collect(root, ["other"], ["a"])], ignore_index=True)


def test_collect_names_the_missing_file(tmp_path):
    write_run(tmp_path, "ds", "a", 0.9)
    (tmp_path / "ds" / "a" / "test.json").unlink()
    with pytest.raises(MnistlabError, match=r"a/test.json: missing \(run its train/evaluate stage\)"):
        compare.collect(tmp_path, ["ds"], ["a"])


def test_markdown_table_has_every_row(tmp_path):
    write_run(tmp_path, "ds", "a", 0.9123456, params=1234567)
    write_run(tmp_path, "ds", "b", 0.8)
    md = compare.to_markdown(compare.leaderboard(compare.collect(tmp_path, ["ds"], ["a", "b"]),
                                                 "test_accuracy"))
    lines = md.strip().splitlines()
    assert lines[0].startswith("| dataset") and "test_accuracy" in lines[0]
    assert len(lines) == 4 and "0.9123" in lines[2] and "1,234,567" in lines[2]


def test_run_compare_writes_leaderboard_and_curves_without_registry(tmp_path):
    metrics = tmp_path / "metrics"
    for ds in ("d1", "d2"):
        write_run(metrics, ds, "a", 0.9, epochs=4)
        write_run(metrics, ds, "b", 0.8, epochs=40)
    params = {"datasets": ["d1", "d2"], "archs": ["a", "b"],
              "compare": {"rank_by": "macro_f1", "register": False, "registry_prefix": "x",
                          "alias": "champion"}}
    paths = compare.ComparePaths(metrics, tmp_path / "models", tmp_path / "out", tmp_path / "curves")
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

    mlflow.set_tracking_uri(tracking.tracking_uri())
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
    assert "| dataset/arch | metric | baseline | new | delta | tolerance | verdict |" in report
    assert "**Gate FAILED**" in report
    assert "- ds/a test_accuracy: REGRESSION, 0.9500 → 0.5000" in report
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
    params = {"datasets": ["ds"], "archs": archs, "paths": {"metrics": "metrics"}}
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
    assert base["results"]["ds/a"] == {"test_accuracy": 0.90, "macro_f1": pytest.approx(0.89),
                                       "test_loss": 0.1}
    assert base["profile_digest"] == json_digest({"datasets": ["ds"]})

    passed, report = gate.check(work, profile, baseline, GATE)
    assert passed, report

    write_run(work / "ds" / "metrics", "ds", "a", 0.60)  # the planted regression
    passed, report = gate.check(work, profile, baseline, GATE)
    assert not passed
    assert "ds/a test_accuracy: REGRESSION" in report and "ds/a macro_f1: REGRESSION" in report
    assert "ds/b test_accuracy" not in report.split("**Gate FAILED**")[1]


def test_check_fails_when_an_arch_is_missing_or_the_profile_changed(tmp_path):
    work, profile = gate_workdir(tmp_path, {"ds/a": 0.90, "ds/b": 0.95})
    baseline = tmp_path / "baseline.json"
    gate.accept(tmp_path, work, profile, baseline, GATE)
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump({**params, "archs": ["b"]}))
    passed, report = gate.check(work, profile, baseline, GATE)  # ds/a's old files stay on disk
    assert not passed and "ds/a test_accuracy: MISSING (no result)" in report

    (work / "params.yaml").write_text(yaml.safe_dump(params))
    profile.write_text("datasets: [ds]\ntrain: {min_steps: 1}\n")
    passed, report = gate.check(work, profile, baseline, GATE)
    assert not passed and "was made with another profile.yaml" in report


def test_accept_refuses_incomplete_results(tmp_path):
    work, profile = gate_workdir(tmp_path, {"ds/a": 0.9, "ds/b": 0.95})
    (work / "ds" / "metrics" / "ds" / "b" / "test.json").unlink()
    with pytest.raises(MnistlabError, match="no complete results for ds/b"):
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
    assert "ds/b test_accuracy: REGRESSION" in p.stdout and "regression gate failed" in p.stderr
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
                                 "[ \"$(basename $PWD)\" != bad ]\n")
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    for ds in ("good", "bad", "fine"):
        (tmp_path / "w" / ds).mkdir(parents=True)
    params, settings = {"datasets": ["good", "bad", "fine"]}, {"jobs": 2, "threads": 1}
    with pytest.raises(MnistlabError, match=r"failed in \S*/w/bad \(exit 1\); its output is above"):
        gate.run_pipeline(tmp_path / "w", params, settings)
    out = capsys.readouterr().out
    assert out.count("threads=1 uri=sqlite:///mlflow.db") == 3  # every shard ran, pinned
    for ds in ("good", "bad", "fine"):
        assert f"----- [{ds}] dvc repro exited" in out
        # each copy runs its own synced code, not the working tree's editable install
        assert f"code={(tmp_path / 'w' / ds / 'src').resolve()}" in out


def test_repo_profile_and_baseline_agree():
    """The committed baseline belongs to the committed CI profile and covers all it runs."""
    params = gate.profile_params(ROOT, ROOT / "ci" / "profile.yaml")
    base = gate.read_baseline(ROOT / "ci" / "baseline.json")
    assert base["profile_digest"] == json_digest(gate.load_profile(ROOT / "ci" / "profile.yaml")), \
        "ci/profile.yaml changed since ci/baseline.json was made: run `make baseline`"
    expected = {f"{d}/{a}" for d in params["datasets"] for a in params["archs"]}
    assert set(base["results"]) == expected
    for metrics in base["results"].values():
        assert set(metrics) == set(gate.load_settings(ROOT / gate.CONFIG)["metrics"])

"""`make reproduce`: its config, the copies it makes, and the verdicts of its report.

The real run (full MNIST + Fashion-MNIST, ~30 min on 2 cores) is `make reproduce`; its
committed result, reports/reproduction.json, is checked against the config here.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from mnistlab.ci import reproduce
from mnistlab.errors import MnistlabError

ROOT = Path(__file__).resolve().parents[1]


SEED = 1234  # params.yaml's seeds: [1234]: a copy's one training run


def write_run(work: Path, ds: str, arch: str, actual: list[int], predicted: list[int],
              epochs: int = 1) -> None:
    """A finished copy's outputs, as the train and evaluate stages write them
    (``metrics/<ds>/<arch>/seed-<seed>/``)."""
    shard = work / f"{ds}-{arch}"
    metrics = shard / "metrics" / ds / arch / f"seed-{SEED}"
    metrics.mkdir(parents=True)
    (shard / "params.yaml").write_text(yaml.safe_dump(
        {"seeds": [SEED], "paths": {"metrics": "metrics"}, "hparams": {arch: {"epochs": epochs}}}))
    acc = sum(a == p for a, p in zip(actual, predicted, strict=True)) / len(actual)
    (metrics / "test.json").write_text(json.dumps({"test_accuracy": acc, "test_samples": len(actual)}))
    (metrics / "train.json").write_text(json.dumps({
        "epochs": epochs, "train_seconds": 2.0, "train_images_per_second": 100.0, "parameters": 7}))
    (metrics / "history.csv").write_text("epoch,train_loss,train_accuracy\n1,0.5,0.8\n")
    with (metrics / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows(zip(actual, predicted, strict=True))


CFG = {
    "jobs": 2, "threads": 1,
    "runs": [["m", "tut"], ["m", "ours"]],
    "published": {"tut": {"dataset": "m", "accuracy": 0.9, "how": "last half",
                          "test_subset": [10, 20], "tolerance": 0.05}},
    "targets": {"ours": {"m": 0.95}},
}


def test_same_test_images_as_published_and_the_full_set(tmp_path):
    # First half: 1/10 right; second half (the published slice): 9/10 right.
    actual = list(range(10)) * 2
    predicted = [0] * 10 + list(range(9)) + [0]
    write_run(tmp_path, "m", "tut", actual, predicted)
    row = reproduce.measure(CFG, tmp_path, reproduce.Run("m", "tut"))
    assert row["ours_same_subset"] == pytest.approx(0.9) and row["subset_samples"] == 10
    assert row["test_accuracy_full"] == pytest.approx(0.5)
    assert row["delta"] == pytest.approx(0.0) and row["verdict"] == "reproduced"
    assert (row["final_train_loss"], row["final_train_accuracy"]) == (0.5, 0.8)


@pytest.mark.parametrize("right, verdict", [(20, "target met"), (18, "MISSED")])
def test_our_arch_is_judged_on_the_full_test_set(tmp_path, right, verdict):
    actual = [1] * 20
    write_run(tmp_path, "m", "ours", actual, [1] * right + [0] * (20 - right))
    row = reproduce.measure(CFG, tmp_path, reproduce.Run("m", "ours"))
    assert row["verdict"] == verdict and row["kind"] == "target"


def test_a_miss_beyond_tolerance_fails_the_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "reproduce.yaml").write_text(yaml.safe_dump({**CFG, "workdir": "w"}))
    (tmp_path / "params.yaml").write_text("{}\n")
    work = tmp_path / "w"
    write_run(work, "m", "tut", [1] * 20, [1] * 10 + [1] * 8 + [0] * 2)  # 0.8 on the slice: -10 pp
    write_run(work, "m", "ours", [1] * 20, [1] * 20)
    assert reproduce.main(["report", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "MISSED: m/tut" in out.out and "error: a reproduction missed" in out.err
    report = json.loads((tmp_path / "reports" / "reproduction.json").read_text())
    assert [r["verdict"] for r in report["rows"]] == ["MISSED", "target met"]
    md = (tmp_path / "reports" / "reproduction.md").read_text()
    assert "| tut | m | 90.00 % (last half; test images 10–19) | 80.00 % |" in md


def test_a_short_prediction_file_is_an_error_naming_it(tmp_path):
    write_run(tmp_path, "m", "tut", [1] * 12, [1] * 12)  # the published slice needs 20 images
    with pytest.raises(MnistlabError, match=r"predictions.csv: 2 test predictions in \[10, 20\)"):
        reproduce.measure(CFG, tmp_path, reproduce.Run("m", "tut"))


@pytest.mark.parametrize("change, message", [
    ({"runs": [["m"]]}, "runs must list"),
    ({"runs": [["m", "other"]]}, "neither a published number nor a target"),
    ({"published": {"tut": {"dataset": "m"}}}, r"published.tut.accuracy is missing"),
    ({"jobs": 0}, "jobs must be a positive integer"),
])
def test_bad_config_is_one_line(tmp_path, change, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**CFG, **change}))
    with pytest.raises(MnistlabError, match=message) as e:
        reproduce.load_config(path)
    assert "\n" not in str(e.value)


def test_prepare_makes_one_copy_per_run_with_only_its_dataset_and_arch(tmp_path):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "m.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("/build/\n")
    params = {"datasets": ["digits"], "archs": ["tut", "ours"], "paths": {"metrics": "metrics"},
              "sources": {"m": "../shared/m"}, "features": {"tsne_max_points": 9}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    cfg = {**CFG, "overrides": {"features": {"tsne_max_points": 5}}}
    shards = reproduce.prepare(repo, cfg, repo / "build" / "r")
    assert [s.name for s in shards] == ["m-tut", "m-ours"]
    for shard, arch in zip(shards, ["tut", "ours"], strict=True):
        got = yaml.safe_load((shard / "params.yaml").read_text())
        assert got["datasets"] == ["m"] and got["archs"] == [arch]
        assert got["features"] == {"tsne_max_points": 5}
        assert got["sources"]["m"] == str((tmp_path / "shared" / "m").resolve())
        assert (shard / "src" / "m.py").is_file()
        assert "no_scm = true" in (shard / ".dvc" / "config.local").read_text()
    assert yaml.safe_load((repo / "params.yaml").read_text()) == params


def test_repo_config_covers_the_five_tutorials_and_resnet_bn_on_both():
    cfg = reproduce.load_config(ROOT / "ci" / "reproduce.yaml")
    runs = {tuple(r) for r in cfg["runs"]}
    assert runs == {("mnist", a) for a in ("mlp", "cnn_16_32", "cnn_32_64", "cnn_4_8", "resnet_bn")} \
        | {("fashion_mnist", "lenet5"), ("fashion_mnist", "resnet_bn")}
    # with `also`, every registered arch on both datasets: the whole `dvc repro` is timed
    from mnistlab.models import REGISTRY
    assert runs | {tuple(r) for r in cfg["also"]} == {(ds, a) for ds in ("mnist", "fashion_mnist") for a in REGISTRY}
    # Nothing in the overrides may change how a network is trained.
    assert not {"hparams", "train", "seed", "seeds", "split"} & set(cfg.get("overrides") or {})


def test_committed_reproduction_matches_the_config():
    """reports/reproduction.json is the committed result of `make reproduce` on this config."""
    path = ROOT / "reports" / "reproduction.json"
    if not path.is_file():
        pytest.skip(f"{path} not committed yet: run `make reproduce` (~1 h on 2 cores) and commit it")
    cfg = reproduce.load_config(ROOT / "ci" / "reproduce.yaml")
    report = json.loads(path.read_text())
    assert [[r["dataset"], r["arch"]] for r in report["rows"]] == cfg["runs"] + cfg["also"]
    for r in report["rows"]:
        assert r["epochs"] == r["tutorial_epochs"], f"{r['arch']}: epochs were raised on full data"
        assert r["test_samples"] == 10_000
        if r["kind"] == "tutorial":
            pub = cfg["published"][r["arch"]]
            assert r["published"] == pub["accuracy"] and r["test_subset"] == pub["test_subset"]


def test_timed_repro_runs_every_stage_in_order_and_records_its_seconds(tmp_path):
    from mnistlab.ci import copies

    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "download": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
        "train": {"foreach": ["x", "y"], "do": {"cmd": "cat a.txt > ${item}.txt", "deps": ["a.txt"],
                                                "outs": ["${item}.txt"]}}}}))
    assert copies.timed_repro(tmp_path) == 0
    t = json.loads((tmp_path / copies.TIMINGS).read_text())
    assert [r["stage"] for r in t["stages"]] == ["download", "train@x", "train@y"]
    assert (tmp_path / "y.txt").read_text() == "a\n"
    assert all(r["seconds"] > 0 for r in t["stages"])
    assert t["total_seconds"] >= sum(r["seconds"] for r in t["stages"])
    seconds = reproduce.stage_seconds(tmp_path)
    assert seconds["train"] == pytest.approx(sum(r["seconds"] for r in t["stages"][1:]))
    assert seconds["evaluate"] == 0.0


def test_a_failing_stage_stops_the_timed_run_and_writes_no_timings(tmp_path):
    from mnistlab.ci import copies

    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "download": {"cmd": "exit 3", "outs": ["a.txt"]},
        "train": {"cmd": "echo b > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]}}}))
    assert copies.timed_repro(tmp_path) != 0
    assert not (tmp_path / copies.TIMINGS).exists() and not (tmp_path / "b.txt").exists()


def test_other_runs_get_no_verdict_and_the_timings_are_summed(tmp_path):
    cfg = {**CFG, "also": [["n", "tut"]]}
    for ds, arch in (["m", "tut"], ["m", "ours"], ["n", "tut"]):
        write_run(tmp_path, ds, arch, list(range(10)) * 2, list(range(10)) * 2)
        (tmp_path / f"{ds}-{arch}" / "timings.json").write_text(json.dumps({
            "stages": [{"stage": f"train@{ds}-{arch}-{SEED}", "seconds": 3.0},
                       {"stage": "compare", "seconds": 1.0}],
            "total_seconds": 4.5}))
    rows = [reproduce.measure(cfg, tmp_path, r) for r in reproduce.runs_of(cfg)]
    assert [r["kind"] for r in rows] == ["tutorial", "target", "other"]
    assert rows[2]["verdict"] == "—" and "published" not in rows[2]
    text = reproduce.render(rows, "cpu", 2)
    # the other run counts in no verdict (the tutorial misses: all right, published 0.9 +- 0.05)
    assert "**1 of 2 met.**" in text and "MISSED: n/tut" not in text
    assert "| tut | n | 100.00 % | 1 | 2 | 100 |" in text
    assert "| n | tut | 0 | 0 | 3 | 0 | 0 | 1 | 4 | 2 |" in text
    assert "| **all** | | **0** | **0** | **9** | **0** | **0** | **3** | **14** | **6** |" in text


def test_a_run_listed_twice_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**CFG, "also": [["m", "tut"]]}))
    with pytest.raises(MnistlabError, match=r"listed twice"):
        reproduce.load_config(path)


def test_a_note_keyed_by_run_beats_one_keyed_by_arch_and_shows_beside_the_verdict(tmp_path):
    cfg = {**CFG, "notes": {"m-ours": "why it missed", "tut": "a tutorial note"}}
    write_run(tmp_path, "m", "ours", [1, 2], [1, 1])
    row = reproduce.measure(cfg, tmp_path, reproduce.Run("m", "ours"))
    assert row["verdict"] == "MISSED" and row["note"] == "why it missed"
    assert "MISSED — why it missed" in reproduce.render([row], "cpu", 1)

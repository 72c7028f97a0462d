"""evaluate@{dataset}-{arch}-{seed}: metrics against scikit-learn, model loading, every output file, MLflow.

The helpers it shares with test_features.py and test_compare_gate.py live in ``helpers``:
a test split made of real digits and a model record as the train stage writes it
(``helpers.artifacts``), an MLflow run (``helpers.mlflow``; the temp sqlite store is
conftest's ``mlflow_store``), and the PNG check (``helpers.checks``).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers.artifacts import CLASSES, write_model, write_split
from helpers.checks import assert_picture
from helpers.mlflow import open_run
from sklearn.metrics import accuracy_score, f1_score

from mnistlab import tracking
from mnistlab.config import run_dir
from mnistlab.errors import MnistlabError
from mnistlab.inference import last_linear
from mnistlab.models import load_model, save_model
from mnistlab.stages import evaluate as evaluation
from mnistlab.stages.evaluate import EvalPaths
from mnistlab.stats import wilson_interval
from mnistlab.utils import torch_load, torch_save, write_json

PARAMS = {"evaluate": {"device": "cpu", "batch_size": 16, "channels_last": True, "max_misclassified": 12}}
SEED = 1234  # the training seed (params.yaml's seeds: [1234])


# --------------------------------------------------------------------------- summarize


def test_summarize_matches_sklearn_and_counts_every_image():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 10
    out = torch.randn(200, 10, generator=g)
    out[torch.arange(150), y[:150]] += 5.0  # 150 clearly right, 50 random
    ev = evaluation.summarize(out, y, CLASSES)
    pred = out.argmax(1).numpy()
    assert ev.metrics["test_accuracy"] == pytest.approx(accuracy_score(y.numpy(), pred))
    assert ev.metrics["macro_f1"] == pytest.approx(f1_score(y.numpy(), pred, average="macro"))
    assert ev.metrics["test_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, y)))
    assert ev.metrics["test_samples"] == 200
    hits = int((pred == y.numpy()).sum())
    assert (ev.metrics["test_accuracy_ci_low"], ev.metrics["test_accuracy_ci_high"]) == \
        pytest.approx(wilson_interval(hits, 200))
    assert ev.metrics["test_accuracy_ci_low"] < ev.metrics["test_accuracy"] < \
        ev.metrics["test_accuracy_ci_high"]
    assert ev.confusion.shape == (10, 10) and ev.confusion.sum() == 200
    assert np.trace(ev.confusion) == int((pred == y.numpy()).sum())
    assert [r["class"] for r in ev.per_class] == CLASSES
    assert sum(r["support"] for r in ev.per_class) == 200
    assert np.allclose(ev.confidence, out.softmax(1).max(1).values.numpy())


def test_summarize_log_probabilities_give_the_same_loss():
    # cnn_4_8 ends in LogSoftmax: the loss must not change because of it.
    out = torch.randn(30, 10)
    y = torch.arange(30) % 10
    a = evaluation.summarize(out, y, CLASSES).metrics["test_loss"]
    b = evaluation.summarize(out.log_softmax(1), y, CLASSES).metrics["test_loss"]
    assert a == pytest.approx(b, rel=1e-5)


def test_summarize_rejects_scores_of_the_wrong_width():
    with pytest.raises(MnistlabError, match=r"shape \(4, 3\)"):
        evaluation.summarize(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), CLASSES)


def test_misclassified_most_confident_first():
    out = torch.tensor([[0.0, 9.0], [0.0, 1.0], [5.0, 0.0], [0.0, 3.0]])
    ev = evaluation.summarize(out, torch.tensor([0, 0, 0, 1]), ["a", "b"])
    assert evaluation.misclassified(ev, 10).tolist() == [0, 1]
    assert evaluation.misclassified(ev, 1).tolist() == [0]


# --------------------------------------------------------------------------- loading


def test_load_model_rebuilds_the_saved_weights(tmp_path):
    model = write_model(tmp_path, "cnn_4_8", seed=3).eval()
    loaded, record = load_model(tmp_path / "model.pt", torch.device("cpu"))
    assert record["arch"] == "cnn_4_8" and not loaded.training
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_load_model_errors_name_the_file(tmp_path):
    torch_save({"arch": "mlp"}, tmp_path / "partial.pt")
    with pytest.raises(MnistlabError, match="partial.pt: not a model file"):
        load_model(tmp_path / "partial.pt", torch.device("cpu"))
    write_model(tmp_path, "mlp")
    rec = torch.load(tmp_path / "model.pt", weights_only=True)
    rec["args"]["hidden"] = 7  # weights of hidden=500 no longer fit
    save_model(tmp_path / "model.pt", rec)  # resealed: the digest check is not what fails
    with pytest.raises(MnistlabError, match="model.pt: weights do not fit arch 'mlp'"):
        load_model(tmp_path / "model.pt", torch.device("cpu"))


# --------------------------------------------------------------------------- the stage


def test_run_evaluation_writes_valid_outputs_and_logs_them(tmp_path, mlflow_store):
    # dvc.yaml's layout: models/<ds>/<arch>/seed-<seed>/, metrics/..., reports/.../evaluate/
    split, model_dir = tmp_path / "split", run_dir(tmp_path / "models", "digits", "lenet5", SEED)
    metrics_dir = run_dir(tmp_path / "metrics", "digits", "lenet5", SEED)
    reports = run_dir(tmp_path / "reports", "digits", "lenet5", SEED) / "evaluate"
    _, labels = write_split(split, n=50)
    model = write_model(model_dir, "lenet5").eval()
    run_id = open_run(model_dir, "digits", "lenet5", SEED)
    features = run_dir(tmp_path / "features", "digits", "lenet5", SEED)
    paths = EvalPaths(split, model_dir, metrics_dir, reports, features)

    metrics = evaluation.run_evaluation(PARAMS, "digits", "lenet5", SEED, paths)

    test = json.loads((metrics_dir / "test.json").read_text())
    assert test == metrics
    assert {"test_accuracy", "test_loss", "macro_f1"} <= set(test)
    assert all(isinstance(v, (int, float)) for v in test.values())  # flat: DVC shows each key
    assert 0 <= test["test_accuracy"] <= 1 and test["test_loss"] > 0 and test["test_samples"] == 50

    with open(metrics_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50 and set(rows[0]) == {"actual", "predicted"}
    assert [r["actual"] for r in rows] == [CLASSES[i] for i in labels.tolist()]
    hits = sum(r["actual"] == r["predicted"] for r in rows)
    assert hits / 50 == pytest.approx(test["test_accuracy"])
    assert (test["test_accuracy_ci_low"], test["test_accuracy_ci_high"]) == \
        pytest.approx(wilson_interval(hits, 50))

    # the embeddings of the same pass: what the head saw, so the head gives the predictions back
    saved = torch_load(features / "embeddings.pt")
    assert saved["layer"] == last_linear(model)[0]
    assert saved["embeddings"].shape == (50, 84) and torch.equal(saved["labels"], labels.long())
    with torch.inference_mode():
        head = last_linear(model)[1]
        predicted = head(saved["embeddings"]).argmax(1)
    assert [CLASSES[i] for i in predicted.tolist()] == [r["predicted"] for r in rows]

    with open(metrics_dir / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class] == CLASSES
    assert sum(int(r["support"]) for r in per_class) == 50

    # both pictures >= 400 px each way, titled in the PNG (issue #15), naming the seed
    assert_picture(reports / "confusion.png", "digits/lenet5 seed 1234: test accuracy ")
    assert_picture(reports / "misclassified.png", "digits/lenet5 seed 1234: ",
                   " of 50 misclassified (most confident first)")

    # MLflow: the headline metrics as metrics (exactly test.json's), the per-class ones as one table
    c = tracking.client()
    logged = c.get_run(run_id).data.metrics
    assert logged == pytest.approx(test)
    assert {"test_accuracy", "test_loss", "macro_f1", "test_accuracy_ci_low",
            "test_accuracy_ci_high"} <= set(logged)
    assert not [k for k in logged if "/" in k or k.startswith(("test_f1", "test_precision",
                                                                "test_recall"))]
    assert_per_class_table(run_id, per_class)
    names = {a.path for a in c.list_artifacts(run_id, "evaluation")}
    assert {f"evaluation/{n}" for n in ("test.json", "predictions.csv", "per_class.json",
                                        "confusion.png", "misclassified.png")} <= names


def assert_per_class_table(run_id: str, per_class_csv: list[dict[str, str]]) -> None:
    """The run's per-class table: one row per class, per_class.csv's columns and values, listed
    as a table for the UI and readable with ``load_table`` (which finds it by that listing)."""
    c = tracking.client()
    exp_id = c.get_run(run_id).info.experiment_id
    with tracking.fluent_uri(tracking.tracking_uri()):  # load_table searches with mlflow.search_runs
        table = c.load_table(exp_id, evaluation.PER_CLASS_TABLE, run_ids=[run_id])
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    assert table["class"].astype(str).tolist() == CLASSES
    assert table["support"].tolist() == [int(r["support"]) for r in per_class_csv]
    for m in ("precision", "recall", "f1"):
        assert table[m].tolist() == pytest.approx([float(r[m]) for r in per_class_csv], abs=1e-5)
    listed = json.loads(c.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert listed.count({"path": evaluation.PER_CLASS_TABLE, "type": "table"}) == 1


def test_rerun_evaluation_replaces_the_per_class_table(tmp_path, mlflow_store):
    """A re-run evaluate logs into the same run (run.json): its table is replaced, not appended
    to (as ``MlflowClient.log_table`` would), and no per-class metric appears."""
    split, model_dir = tmp_path / "split", tmp_path / "models"
    write_split(split, n=30)
    write_model(model_dir, "mlp")
    run_id = open_run(model_dir, "digits", "mlp")
    paths = EvalPaths(split, model_dir, tmp_path / "metrics", tmp_path / "reports", tmp_path / "features")

    evaluation.run_evaluation(PARAMS, "digits", "mlp", SEED, paths)
    evaluation.run_evaluation({"evaluate": {**PARAMS["evaluate"], "batch_size": 7}}, "digits",
                              "mlp", str(SEED), paths)  # a str, as the stage script passes it

    with open(tmp_path / "metrics" / "per_class.csv") as f:
        assert_per_class_table(run_id, list(csv.DictReader(f)))
    test = json.loads((tmp_path / "metrics" / "test.json").read_text())
    assert tracking.client().get_run(run_id).data.metrics == pytest.approx(test)


def test_run_evaluation_refuses_a_model_of_another_arch(tmp_path, mlflow_store):
    write_split(tmp_path, n=10)
    write_model(tmp_path, "mlp")
    write_json(tmp_path / "run.json", {"run_id": "x"})
    with pytest.raises(MnistlabError, match="holds arch 'mlp', expected 'lenet5'"):
        evaluation.run_evaluation(PARAMS, "digits", "lenet5", SEED,
                                  EvalPaths(tmp_path, tmp_path, tmp_path / "m", tmp_path / "r", tmp_path / "f"))
    assert not (tmp_path / "m").exists() and not (tmp_path / "f").exists()  # nothing half-written


def test_run_evaluation_without_a_train_run_names_run_json(tmp_path):
    write_split(tmp_path, n=10)
    write_model(tmp_path, "mlp")
    with pytest.raises(MnistlabError, match="run.json: missing or invalid MLflow run record"):
        evaluation.run_evaluation(PARAMS, "digits", "mlp", SEED,
                                  EvalPaths(tmp_path, tmp_path, tmp_path / "m", tmp_path / "r", tmp_path / "f"))


def test_plot_misclassified_without_mistakes_still_draws(tmp_path):
    out = torch.eye(3) * 5
    ev = evaluation.summarize(out, torch.arange(3), ["a", "b", "c"])
    n = evaluation.plot_misclassified(tmp_path / "m.png", torch.zeros(3, 28, 28, dtype=torch.uint8),
                                      ev, ["a", "b", "c"], 10, "none")
    assert n == 0
    assert_picture(tmp_path / "m.png", "none")


def tile_labels(monkeypatch) -> list:
    """Filled when plot_misclassified saves: ``(text, box in pixels)`` of each tile's label."""
    tiles = []
    save = evaluation.plots.save

    def spy(fig, path, **kw):
        renderer = fig.canvas.get_renderer()
        tiles.extend((t.get_text(), t.get_window_extent(renderer)) for t in fig.texts
                     if t.get_text().startswith("true "))
        save(fig, path, **kw)

    monkeypatch.setattr(evaluation.plots, "save", spy)
    return tiles


def assert_labels_apart(tiles: list) -> None:
    """No two labels of one row of tiles overlap."""
    boxes = [box for _, box in tiles]
    for row in {round(b.y0) for b in boxes}:
        xs = sorted((b.x0, b.x1) for b in boxes if round(b.y0) == row)
        assert all(a[1] <= b[0] for a, b in zip(xs, xs[1:], strict=False)), xs


@pytest.mark.parametrize("mistakes", [1, 2, 9, 40])
def test_plot_misclassified_is_readable_at_any_count(tmp_path, monkeypatch, caplog, mistakes):
    """Once 150 x 210 px for one mistake, its title cut off: now >= 400 px each way, the title
    whole (no text past the edge) and in the PNG, each tile ``true <class>`` / ``pred <class> (p)``,
    and no tile's label running into its neighbour's."""
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot"]  # Fashion-MNIST's: the longest names we draw
    y = torch.arange(50) % 10
    out = torch.nn.functional.one_hot(y, 10).float() * 4
    out[:mistakes] = out[:mistakes].roll(1, dims=1)  # image i predicted as class y+1, p ≈ 0.86
    ev = evaluation.summarize(out, y, classes)
    tiles = tile_labels(monkeypatch)
    title = f"fashion_mnist_mini/resnet_bn: {mistakes} of 50 misclassified (most confident first)"
    n = evaluation.plot_misclassified(tmp_path / "m.png", torch.zeros(50, 28, 28, dtype=torch.uint8),
                                      ev, classes, 40, title)
    assert n == min(mistakes, 40)
    w, _ = assert_picture(tmp_path / "m.png", title)
    assert w >= 600  # room for the title even with one tile
    assert f"true T-shirt/top\npred Trouser ({ev.confidence[0]:.2f})" in dict(tiles)
    assert len(tiles) == n
    assert_labels_apart(tiles)
    assert not [r for r in caplog.records if "runs past" in r.message]


def test_misclassified_labels_wider_than_a_tile_widen_its_column(tmp_path, monkeypatch):
    """A dataset brought as IDX files may name its classes at length: a column is as wide as its
    widest label line, so neighbouring labels never overlap (at 112 px a tile, these run ~200 px)."""
    classes = [f"a rather long class name number {c}" for c in range(10)]
    y = torch.arange(16) % 10
    out = torch.nn.functional.one_hot(y, 10).float() * 4
    out = out.roll(1, dims=1)  # every image wrong
    ev = evaluation.summarize(out, y, classes)
    tiles = tile_labels(monkeypatch)
    n = evaluation.plot_misclassified(tmp_path / "m.png", torch.zeros(16, 28, 28, dtype=torch.uint8),
                                      ev, classes, 40, "long names")
    assert n == 16 and len(tiles) == 16
    assert len({round(box.y0) for _, box in tiles}) == 2  # eight to a row
    assert_labels_apart(tiles)
    assert_picture(tmp_path / "m.png", "long names")

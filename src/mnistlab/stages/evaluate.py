"""Stage ``evaluate@{dataset}-{arch}-{seed}``: test-set metrics, confusion data and pictures of the mistakes.

The final model is rebuilt from its record (``arch`` + ``args``, weights only) and
scored on the test split, which sits on the device as one tensor. Metrics are
scikit-learn's (accuracy, per-class precision/recall/F1, macro-F1); the loss is
the same cross-entropy training used. Outputs:

    metrics/<ds>/<arch>/seed-<seed>/test.json        headline metrics, flat keys (a DVC metric)
    metrics/<ds>/<arch>/seed-<seed>/per_class.csv    class, precision, recall, f1, support
    metrics/<ds>/<arch>/seed-<seed>/predictions.csv  actual,predicted per test image (DVC's confusion template)
    reports/<ds>/<arch>/seed-<seed>/evaluate/        confusion.png, misclassified.png (DVC image plots)
    features/<ds>/<arch>/seed-<seed>/embeddings.pt   the penultimate-layer embedding of every test
                                                     image, from the same pass (the features stage maps it)

and all of them go to the MLflow run the train stage opened (``run.json``): the headline
metrics as run metrics, the per-class ones as one table (``evaluation/per_class.json``),
not as 3 x K metrics that would crowd the UI's charts ahead of accuracy and loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mnistlab import artifacts, plots, tracking
from mnistlab.artifacts import write_csv
from mnistlab.config import EvaluateSettings, stage_name
from mnistlab.errors import MnistlabError
from mnistlab.inference import last_linear, recording, scores
from mnistlab.models import load_model
from mnistlab.stats import wilson_interval
from mnistlab.utils import pick_device, staged, torch_save, write_json

log = logging.getLogger(__name__)

# The per-class metrics in the MLflow run: one table (class, precision, recall, f1, support).
PER_CLASS_TABLE = "evaluation/per_class.json"


@dataclass(frozen=True)
class EvalPaths:
    """Every file ``evaluate@{dataset}-{arch}-{seed}`` reads or writes; dvc.yaml passes each one in."""

    split: Path        # data/split/<ds>: test.pt, summary.json
    model_dir: Path    # models/<ds>/<arch>/seed-<seed>: model.pt, run.json
    metrics_dir: Path  # metrics/<ds>/<arch>/seed-<seed>: test.json, per_class.csv, predictions.csv
    reports: Path      # reports/<ds>/<arch>/seed-<seed>/evaluate: confusion.png, misclassified.png
    features: Path     # features/<ds>/<arch>/seed-<seed>: embeddings.pt


@dataclass
class Evaluation:
    """Everything measured on one test set.

    Attributes:
        metrics: Flat headline metrics (``test_accuracy``, ``test_loss``, ``macro_f1``, ...).
        per_class: One dict per class: ``class``, ``precision``, ``recall``, ``f1``, ``support``.
        y_true: int64 [N] labels.
        y_pred: int64 [N] predicted classes.
        confidence: float32 [N] softmax probability of the predicted class.
        confusion: int64 [K, K] counts, rows = true class, columns = predicted.
    """

    metrics: dict[str, float]
    per_class: list[dict[str, Any]]
    y_true: np.ndarray
    y_pred: np.ndarray
    confidence: np.ndarray
    confusion: np.ndarray


# --------------------------------------------------------------------------- metrics


def summarize(out: torch.Tensor, y: torch.Tensor, classes: list[str]) -> Evaluation:
    """Pure function of the scores: test metrics with scikit-learn, loss with torch.

    ``test_accuracy_ci_low`` / ``_high`` bound the accuracy with Wilson's 95 % score
    interval (:func:`mnistlab.stats.wilson_interval`): the accuracy is a binomial
    proportion, for which Wilson's interval has close to nominal coverage even on a
    few hundred images near 100 %; unlike a bootstrap it is exact arithmetic, so it
    needs no seed and the same predictions always give the same bounds.

    Args:
        out: float [N, K] scores (logits or log-probabilities: cross-entropy treats
            both alike since log_softmax is idempotent).
        y: int64 [N] true classes.
        classes: The K class names.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    k = len(classes)
    if out.ndim != 2 or out.shape[1] != k or len(out) != len(y):
        raise MnistlabError(f"model gives scores of shape {tuple(out.shape)} for {len(y)} images "
                            f"of {k} classes")
    loss = float(F.cross_entropy(out.float(), y))
    prob = out.float().softmax(1)
    confidence, pred = prob.max(1)
    y_true, y_pred = y.numpy(), pred.numpy()
    labels = list(range(k))
    ci_low, ci_high = wilson_interval(int((y_true == y_pred).sum()), len(y_true))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    metrics = {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        "test_loss": loss,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted",
                                      zero_division=0)),
        "test_samples": len(y_true),
        "test_accuracy_ci_low": ci_low,
        "test_accuracy_ci_high": ci_high,
    }
    per_class = [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                  "support": int(s[i])} for i, c in enumerate(classes)]
    return Evaluation(metrics, per_class, y_true, y_pred, confidence.numpy(),
                      confusion_matrix(y_true, y_pred, labels=labels))


# --------------------------------------------------------------------------- files


def write_predictions(path: Path, ev: Evaluation, classes: list[str]) -> None:
    """``actual,predicted`` per test image, by class name: the input of DVC's confusion template."""
    write_csv(path, [{"actual": classes[t], "predicted": classes[p]}
                      for t, p in zip(ev.y_true.tolist(), ev.y_pred.tolist(), strict=True)],
               ["actual", "predicted"])


def write_per_class(path: Path, ev: Evaluation) -> None:
    """``class,precision,recall,f1,support`` per class, in class order."""
    rows = [{**r, **{k: f"{r[k]:.6g}" for k in ("precision", "recall", "f1")}} for r in ev.per_class]
    write_csv(path, rows, ["class", "precision", "recall", "f1", "support"])


def plot_confusion(path: Path, ev: Evaluation, classes: list[str], title: str) -> None:
    """The confusion matrix as a PNG (scikit-learn's display, counts in each cell)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = plots.figure(figsize=(7, 6), dpi=100)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(ev.confusion, display_labels=classes).plot(
        ax=ax, colorbar=False, cmap="Blues", xticks_rotation=45 if max(map(len, classes)) > 2 else 0)
    ax.set_title(title)
    plots.save(fig, path, title=title)


def misclassified(ev: Evaluation, limit: int) -> np.ndarray:
    """Indices of up to ``limit`` mistakes, the most confident first (the most telling ones)."""
    wrong = np.flatnonzero(ev.y_true != ev.y_pred)
    order = np.argsort(-ev.confidence[wrong], kind="stable")
    return wrong[order[:limit]]


def plot_misclassified(path: Path, images: torch.Tensor, ev: Evaluation, classes: list[str],
                       limit: int, title: str) -> int:
    """A grid of the most confident mistakes, each labelled ``true 7`` / ``pred 1 (0.93)``.

    The test images as stored (0-255, ink dark on white), eight to a row, drawn as one
    image (:func:`mnistlab.plots.image_grid`: 0.4 s for 40 mistakes, 1.8 s as 40
    matplotlib axes). At least :data:`mnistlab.plots.MIN_SIDE` px each way and 600 px
    wide, so that a grid of one or two mistakes still has room for its title (once
    150 x 210 px, title cut off).

    Args:
        images: uint8 [N, H, W] test images, in the order of ``ev``.

    Returns:
        How many images the grid shows (0: a "no mistakes" placeholder is drawn).
    """
    idx = misclassified(ev, limit)
    if len(idx) == 0:
        fig = plots.figure(figsize=(6.0, plots.MIN_SIDE / plots.DPI), dpi=plots.DPI)
        fig.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        plots.wrapped_title(fig, title)
        plots.save(fig, path, tight=False)
        return 0
    labels = [f"true {classes[ev.y_true[i]]}\npred {classes[ev.y_pred[i]]} ({ev.confidence[i]:.2f})"
              for i in idx.tolist()]
    grid = plots.Grid(images[torch.from_numpy(idx)].float().numpy() / 255.0,
                      ncol=min(8, len(idx)), cell_labels=labels, stretch=False, invert=True)
    plots.image_grid(grid, path, title, min_width=600)
    return len(idx)


# --------------------------------------------------------------------------- the stage


def run_evaluation(params: dict[str, Any], dataset: str, arch: str, seed: int,
                   paths: EvalPaths) -> dict[str, float]:
    """Evaluate ``models/<ds>/<arch>/seed-<seed>/model.pt`` on the test split; write and log every output.

    Reads the ``evaluate`` section of params.yaml.

    Returns:
        The headline metrics written to ``test.json``.
    """
    settings = EvaluateSettings.from_params(params)
    device = pick_device(settings.device, "evaluate.device")
    tracking.check_reachable()  # before any compute is spent
    run_id = artifacts.read_run_id(paths.model_dir / artifacts.RUN)

    model_file = paths.model_dir / artifacts.MODEL
    model, record = load_model(model_file, device, arch)
    classes = artifacts.load_classes(paths.split)
    if list(record["classes"]) != list(classes):
        raise MnistlabError(f"{model_file}: trained on classes {record['classes']}, "
                            f"but {paths.split / artifacts.SUMMARY} has {classes} (re-run train)")
    # After the local checks (a wrong model file is the likelier culprit), before the scoring.
    tracking.require_run(run_id, paths.model_dir / artifacts.RUN, stage_name("train", dataset, arch, seed))
    images, labels = artifacts.load_split(paths.split, "test")
    head_name, head = last_linear(model)
    # The embeddings are recorded in this same pass (the input of the classifier head): the
    # features stage maps them instead of running the test set through the network again.
    with recording({head_name: head}, inputs=True) as seen:
        out, y = scores(model, images, labels, record["normalize"], device, settings.batch_size,
                        settings.channels_last)
    embeddings = torch.cat(seen[head_name]).flatten(1)
    ev = summarize(out, y, classes)

    tag = f"{dataset}/{arch} seed {seed}"
    # Written under their final names to a staging folder, logged to MLflow from there, and
    # put in place last: a failed MLflow call leaves the previous outputs as they were.
    with staged() as stage:
        test_json = stage.path(paths.metrics_dir / artifacts.TEST_METRICS)
        predictions_csv = stage.path(paths.metrics_dir / artifacts.PREDICTIONS)
        confusion_png = stage.path(paths.reports / "confusion.png")
        misclassified_png = stage.path(paths.reports / "misclassified.png")
        write_json(test_json, ev.metrics)
        write_per_class(stage.path(paths.metrics_dir / artifacts.PER_CLASS), ev)
        write_predictions(predictions_csv, ev, classes)
        torch_save({"embeddings": embeddings, "labels": y.clone(), "classes": list(classes),
                    "layer": head_name}, stage.path(paths.features / artifacts.EMBEDDINGS))
        plot_confusion(confusion_png, ev, classes,
                       f"{tag}: test accuracy {ev.metrics['test_accuracy']:.4f}")
        shown = plot_misclassified(misclassified_png, images, ev, classes,
                                   settings.max_misclassified,
                                   f"{tag}: {int((ev.y_true != ev.y_pred).sum())} of "
                                   f"{len(ev.y_true)} misclassified (most confident first)")

        tracking.log_metrics(run_id, ev.metrics)
        tracking.log_table(run_id, ev.per_class, PER_CLASS_TABLE)
        # per_class.csv is not logged again: the table above holds the same rows.
        tracking.log_artifacts(run_id, [test_json, predictions_csv, confusion_png,
                                        misclassified_png], "evaluation")
    log.info("%s: test_accuracy %.4f test_loss %.4f macro_f1 %.4f (%d mistakes shown)", tag,
             ev.metrics["test_accuracy"], ev.metrics["test_loss"], ev.metrics["macro_f1"], shown)
    return ev.metrics

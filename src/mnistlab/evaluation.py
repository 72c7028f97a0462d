"""Stage ``evaluate@{dataset}-{arch}``: test-set metrics, confusion data and pictures of the mistakes.

The final model is rebuilt from its record (``arch`` + ``args``, weights only) and
scored on the test split, which sits on the device as one tensor. Metrics are
scikit-learn's (accuracy, per-class precision/recall/F1, macro-F1); the loss is
the same cross-entropy training used. Outputs:

    metrics/<ds>/<arch>/test.json        headline metrics, flat keys (a DVC metric)
    metrics/<ds>/<arch>/per_class.csv    class, precision, recall, f1, support
    metrics/<ds>/<arch>/predictions.csv  actual,predicted per test image (DVC's confusion template)
    reports/<ds>/<arch>/evaluate/        confusion.png, misclassified.png (DVC image plots)

and all of them go to the MLflow run the train stage opened (``run.json``).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnistlab import data, plots, tracking
from mnistlab.config import get, positive
from mnistlab.errors import MnistlabError
from mnistlab.models import build_model
from mnistlab.training import predict, to_device
from mnistlab.utils import atomic_path, pick_device, torch_load, write_json

log = logging.getLogger(__name__)

MODEL_KEYS = ("arch", "args", "state_dict", "normalize", "classes")


@dataclass(frozen=True)
class EvalPaths:
    """Every file ``evaluate@{dataset}-{arch}`` reads or writes; dvc.yaml passes each one in."""

    split: Path        # data/split/<ds>: test.pt, summary.json
    model_dir: Path    # models/<ds>/<arch>: model.pt, run.json
    metrics_dir: Path  # metrics/<ds>/<arch>: test.json, per_class.csv, predictions.csv
    reports: Path      # reports/<ds>/<arch>/evaluate: confusion.png, misclassified.png


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


# --------------------------------------------------------------------------- model + scores


def load_model(path: Path, device: torch.device, arch: str | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a train stage saved (weights only) and put it on ``device`` in eval mode.

    Args:
        path: A ``model.pt`` written by the train stage.
        device: Where to put the model.
        arch: If given, the arch the file must hold (a stage's item), else a one-line error.

    Returns:
        The model and its record (``arch``, ``args``, ``normalize``, ``classes``, ...).
    """
    record = torch_load(path)
    if not isinstance(record, dict) or not set(MODEL_KEYS) <= set(record):
        raise MnistlabError(f"{path}: not a model file (needs keys {', '.join(MODEL_KEYS)})")
    if arch is not None and record["arch"] != arch:
        raise MnistlabError(f"{path}: holds arch {record['arch']!r}, expected {arch!r}")
    model = build_model(record["arch"], **record["args"])
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise MnistlabError(f"{path}: weights do not fit arch {record['arch']!r} ({first})") from None
    return model.to(device).eval(), record


def scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: dict[str, float],
           device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of ``model`` for uint8 ``images`` [N,28,28], normalised as in training.

    Returns:
        ``(scores [N, K] float32 on the CPU, labels [N] int64 on the CPU)``.
    """
    d = to_device(images, labels, normalize["mean"], normalize["std"], device)
    # fp32 even on CUDA: these are the numbers of record, and the CI gate compares
    # them across machines; bf16 would add its own rounding to every logit.
    out = predict(model, d.x, batch_size, bf16=False)
    return out.cpu(), d.y.cpu()


def summarize(out: torch.Tensor, y: torch.Tensor, classes: list[str]) -> Evaluation:
    """Pure function of the scores: test metrics with scikit-learn, loss with torch.

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
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    metrics = {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        "test_loss": loss,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted",
                                      zero_division=0)),
        "test_samples": len(y_true),
    }
    per_class = [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                  "support": int(s[i])} for i, c in enumerate(classes)]
    return Evaluation(metrics, per_class, y_true, y_pred, confidence.numpy(),
                      confusion_matrix(y_true, y_pred, labels=labels))


# --------------------------------------------------------------------------- files


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """``rows`` as CSV with header ``fields``, written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_predictions(path: Path, ev: Evaluation, classes: list[str]) -> None:
    """``actual,predicted`` per test image, by class name: the input of DVC's confusion template."""
    _write_csv(path, [{"actual": classes[t], "predicted": classes[p]}
                      for t, p in zip(ev.y_true.tolist(), ev.y_pred.tolist(), strict=True)],
               ["actual", "predicted"])


def write_per_class(path: Path, ev: Evaluation) -> None:
    """``class,precision,recall,f1,support`` per class, in class order."""
    rows = [{**r, **{k: f"{r[k]:.6g}" for k in ("precision", "recall", "f1")}} for r in ev.per_class]
    _write_csv(path, rows, ["class", "precision", "recall", "f1", "support"])


def plot_confusion(path: Path, ev: Evaluation, classes: list[str], title: str) -> None:
    """The confusion matrix as a PNG (scikit-learn's display, counts in each cell)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = plots.figure(figsize=(7, 6), dpi=100)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(ev.confusion, display_labels=classes).plot(
        ax=ax, colorbar=False, cmap="Blues", xticks_rotation=45 if max(map(len, classes)) > 2 else 0)
    ax.set_title(title)
    plots.save(fig, path)


def misclassified(ev: Evaluation, limit: int) -> np.ndarray:
    """Indices of up to ``limit`` mistakes, the most confident first (the most telling ones)."""
    wrong = np.flatnonzero(ev.y_true != ev.y_pred)
    order = np.argsort(-ev.confidence[wrong], kind="stable")
    return wrong[order[:limit]]


def plot_misclassified(path: Path, images: torch.Tensor, ev: Evaluation, classes: list[str],
                       limit: int, title: str) -> int:
    """A grid of the most confident mistakes, each titled ``true → predicted (p)``.

    Returns:
        How many images the grid shows (0: a "no mistakes" placeholder is drawn).
    """
    idx = misclassified(ev, limit)
    cols = max(1, min(8, len(idx)))
    rows = max(1, -(-len(idx) // cols))
    fig = plots.figure(figsize=(1.5 * cols, 1.7 * rows + 0.4), dpi=100)
    if len(idx) == 0:
        fig.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    for n, i in enumerate(idx.tolist()):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(images[i].numpy(), cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"{classes[ev.y_true[i]]} → {classes[ev.y_pred[i]]}\n"
                     f"p={ev.confidence[i]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    plots.save(fig, path)
    return len(idx)


def mlflow_key(name: str) -> str:
    """A class name made safe for an MLflow metric key (letters, digits, ``_-. /``)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


# --------------------------------------------------------------------------- the stage


def run_evaluation(params: dict[str, Any], dataset: str, arch: str, paths: EvalPaths
                   ) -> dict[str, float]:
    """Evaluate ``models/<ds>/<arch>/model.pt`` on the test split; write and log every output.

    Reads ``evaluate.device``, ``evaluate.batch_size`` and ``evaluate.max_misclassified``.

    Returns:
        The headline metrics written to ``test.json``.
    """
    device = pick_device(get(params, "evaluate.device"))
    batch_size = positive("evaluate.batch_size", get(params, "evaluate.batch_size"), int)
    limit = positive("evaluate.max_misclassified", get(params, "evaluate.max_misclassified"), int)
    run_id = tracking.read_run_id(paths.model_dir / "run.json")

    model, record = load_model(paths.model_dir / "model.pt", device, arch)
    classes = data.load_classes(paths.split)
    if list(record["classes"]) != list(classes):
        raise MnistlabError(f"{paths.model_dir / 'model.pt'}: trained on classes {record['classes']}, "
                            f"but {paths.split / 'summary.json'} has {classes} (re-run train)")
    images, labels = data.load_split(paths.split, "test")
    out, y = scores(model, images, labels, record["normalize"], device, batch_size)
    ev = summarize(out, y, classes)

    tag = f"{dataset}/{arch}"
    write_json(paths.metrics_dir / "test.json", ev.metrics)
    write_per_class(paths.metrics_dir / "per_class.csv", ev)
    write_predictions(paths.metrics_dir / "predictions.csv", ev, classes)
    plot_confusion(paths.reports / "confusion.png", ev, classes,
                   f"{tag}: test accuracy {ev.metrics['test_accuracy']:.4f}")
    shown = plot_misclassified(paths.reports / "misclassified.png", images, ev, classes, limit,
                               f"{tag}: {int((ev.y_true != ev.y_pred).sum())} of "
                               f"{len(ev.y_true)} misclassified (most confident first)")
    log.info("%s: test_accuracy %.4f test_loss %.4f macro_f1 %.4f (%d mistakes shown)", tag,
             ev.metrics["test_accuracy"], ev.metrics["test_loss"], ev.metrics["macro_f1"], shown)

    per_class = {f"test_{m}/{mlflow_key(r['class'])}": r[m] for r in ev.per_class
                 for m in ("precision", "recall", "f1")}
    tracking.log_metrics(run_id, {**ev.metrics, **per_class})
    tracking.log_artifacts(run_id, [paths.metrics_dir / "test.json",
                                    paths.metrics_dir / "per_class.csv",
                                    paths.metrics_dir / "predictions.csv",
                                    paths.reports / "confusion.png",
                                    paths.reports / "misclassified.png"], "evaluation")
    return ev.metrics

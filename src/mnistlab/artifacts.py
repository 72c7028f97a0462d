"""The stage contract: every file one stage writes and another reads, its name, format, save and load.

In a DVC project the files stages hand each other are the interfaces between
them, so each one has exactly one owner, here (the model file is the exception:
it lives beside the registry in :mod:`mnistlab.models`, as timm keeps its
checkpoint loader beside ``create_model``, because reading it means building a
network; keeping it out of this module keeps the split stage free of models.py).

::

    data/split/<ds>/{train,val,test}.pt   split       → train, evaluate, features
    data/split/<ds>/summary.json          split       → train, evaluate, features
    models/<run>/run.json                 train       → evaluate, features, compare
    metrics/<run>/train.json              train       → compare (and the CI gate)
    metrics/<run>/history.csv             train       → compare
    metrics/<run>/test.json               evaluate    → compare (and the CI gate)
    metrics/<run>/predictions.csv         evaluate    → compare, the CI gate, the reproduction report

where ``<run>`` is :func:`mnistlab.config.run_key`: ``<ds>/<arch>/seed-<seed>``, one per item of params.yaml's
``seeds`` (dvc.yaml spells the same path out in its templates).

This module imports nothing of mnistlab beyond errors and utils: every stage may
depend on it without depending on another stage's code.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.errors import MnistlabError
from mnistlab.utils import atomic_path, file_sha256, json_digest, torch_load, torch_save, write_json

SIDE = 28  # every dataset is brought to MNIST's 28x28 uint8 layout
SUBSETS = ("train", "val", "test")

SUMMARY = "summary.json"
MODEL = "model.pt"           # final weights (models.save_model / models.load_model)
BEST = "best.pt"             # best-validation weights, same format
RUN = "run.json"
TRAIN_METRICS = "train.json"
HISTORY = "history.csv"
TEST_METRICS = "test.json"
PER_CLASS = "per_class.csv"
PREDICTIONS = "predictions.csv"
EMBEDDINGS = "embeddings.pt"


# --------------------------------------------------------------------------- split files


def split_file(split_dir: Path, subset: str) -> Path:
    return Path(split_dir) / f"{subset}.pt"


def save_split(split_dir: Path, subsets: dict[str, tuple[torch.Tensor, torch.Tensor]],
               summary: dict[str, Any]) -> None:
    """Write ``{subset: (uint8 images [N,28,28], int64 labels [N])}`` and the summary."""
    for name, (x, y) in subsets.items():
        # clone: an indexed view's storage would otherwise be saved whole
        torch_save({"images": x.clone().contiguous(), "labels": y.clone()}, split_file(split_dir, name))
    write_json(Path(split_dir) / SUMMARY, summary)


def load_split(split_dir: Path, subset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one subset written by :func:`save_split` (weights_only, validated).

    Checked: dtypes and shapes, at least one image, and labels in ``0..K-1`` for the K
    classes of the folder's ``summary.json`` (:func:`load_classes`).
    """
    path = split_file(split_dir, subset)
    obj = torch_load(path)
    if not (isinstance(obj, dict) and {"images", "labels"} <= set(obj)):
        raise MnistlabError(f"{path}: not a split file (needs images, labels)")
    x, y = obj["images"], obj["labels"]
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            and x.dtype == torch.uint8 and x.dim() == 3 and tuple(x.shape[1:]) == (SIDE, SIDE)
            and y.dtype == torch.int64 and y.shape == (len(x),)):
        raise MnistlabError(f"{path}: expected uint8 images [N,{SIDE},{SIDE}] and int64 labels [N]")
    # The split stage never writes an empty subset nor a label without a class name; such
    # a file otherwise surfaced as a traceback far from it (evaluate's "torch.cat(): expected
    # a non-empty list", the loss's "IndexError: Target 42 is out of bounds").
    if not len(x):
        raise MnistlabError(f"{path}: empty (no images; re-run the split stage)")
    k = len(load_classes(split_dir))
    bad = (y < 0) | (y >= k)
    if bad.any():
        raise MnistlabError(f"{path}: label {int(y[bad][0])} out of range 0..{k - 1} "
                            f"({Path(split_dir) / SUMMARY} names {k} classes; re-run the split stage)")
    return x, y


def load_classes(split_dir: Path) -> list[str]:
    """Class names recorded by the split stage in ``summary.json`` (a non-empty list of strings)."""
    path = Path(split_dir) / SUMMARY
    try:
        classes = json.loads(path.read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError):  # TypeError: not an object, e.g. []
        raise MnistlabError(f"{path}: missing or invalid (run the split stage)") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise MnistlabError(f"{path}: classes must be a non-empty list of names (got {classes!r:.80}; "
                            "run the split stage)")
    return classes


def split_digest(split_dir: Path) -> str:
    """sha256 over the split files, so a run names exactly the data it saw."""
    return json_digest({s: file_sha256(split_file(split_dir, s)) for s in SUBSETS})


# --------------------------------------------------------------------------- run.json


def write_run(model_dir: Path, run_id: str, experiment: str, tracking_uri: str) -> None:
    """``run.json``: the MLflow run the train stage opened (``tracking_uri`` already redacted)."""
    write_json(Path(model_dir) / RUN, {"run_id": run_id, "experiment": experiment,
                                       "tracking_uri": tracking_uri})


def read_run_id(path: Path) -> str:
    """The run id a train stage wrote (``run.json``), for later stages to log into."""
    try:
        run_id = json.loads(Path(path).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        run_id = None
    if not isinstance(run_id, str) or not run_id:
        raise MnistlabError(f"{path}: missing or invalid MLflow run record (run the train stage)")
    return run_id


# --------------------------------------------------------------------------- metrics files

# The keys readers take from each metrics file and their JSON types, checked on read:
# a hand-edited or foreign file ("parameters": "n/a") is then one error naming the file
# and the key, not a traceback in whichever stage first uses the value.
# name -> (the stage that writes it, required keys, keys checked only when present)
METRICS_FIELDS: dict[str, tuple[str, dict[str, type], dict[str, type]]] = {
    TRAIN_METRICS: ("its train stage",
                    {"parameters": int, "epochs": int, "train_seconds": float,
                     "train_images_per_second": float, "best_val_accuracy": float}, {}),
    TEST_METRICS: ("its evaluate stage",
                   {"test_accuracy": float, "test_loss": float, "macro_f1": float},
                   {"test_samples": int, "test_accuracy_ci_low": float, "test_accuracy_ci_high": float}),
}


def _json_type_ok(value: Any, kind: type) -> bool:
    """``int``: a JSON integer; ``float``: any JSON number (bools are neither)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def read_json(path: Path, made_by: str | None = None) -> dict[str, Any]:
    """A JSON object file (train.json, test.json, ...): a user error if missing or invalid.

    A file named in :data:`METRICS_FIELDS` must also hold its keys with their types.
    ``made_by`` says which stage to run when it is missing or wrong.
    """
    path = Path(path)
    producer, required, optional = METRICS_FIELDS.get(path.name, ("its train/evaluate stage", {}, {}))
    made_by = made_by or producer
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise MnistlabError(f"{path}: missing (run {made_by})") from None
    except ValueError:  # UnicodeDecodeError included
        raise MnistlabError(f"{path}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise MnistlabError(f"{path}: expected a JSON object (got {type(obj).__name__}; re-run {made_by})")
    for key, kind in {**required, **optional}.items():
        if key not in obj:
            if key in required:
                raise MnistlabError(f"{path}: missing key {key!r} (re-run {made_by})")
        elif not _json_type_ok(obj[key], kind):
            what = "an integer" if kind is int else "a number"
            raise MnistlabError(f"{path}: {key} must be {what} (got {obj[key]!r:.40}; re-run {made_by})")
    return obj


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch rows as CSV (the DVC plot), floats to 6 significant digits, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``predictions.csv`` (evaluate): ``(actual, predicted)`` class names per test image, in test-file order.

    Paired tests (McNemar in compare and the CI gate) need each image's outcome, not
    only the accuracy; ``actual == predicted`` is whether the model got it right.
    """
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"actual", "predicted"} <= set(reader.fieldnames or ()):
                raise MnistlabError(f"{path}: needs columns actual,predicted")
            rows = [(r["actual"], r["predicted"]) for r in reader]
    except FileNotFoundError:
        raise MnistlabError(f"{path}: missing (run its evaluate stage)") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise MnistlabError(f"{path}: not a readable CSV ({e})") from None
    actual = np.array([a for a, _ in rows], dtype=str)
    predicted = np.array([p for _, p in rows], dtype=str)
    return actual, predicted


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """Rows as CSV with a header, atomically (per_class.csv, predictions.csv)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())

"""What one train stage does, end to end: params → device data → fit → outputs + MLflow.

Kept apart from :mod:`mnistlab.training` so the training loop stays a pure
function of tensors and settings (benchmarks and tests call it directly).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnistlab import data, tracking
from mnistlab.config import HParams, TrainSettings, get
from mnistlab.errors import MnistlabError
from mnistlab.models import REGISTRY, count_parameters
from mnistlab.training import fit, load_resumable, to_device
from mnistlab.utils import (atomic_path, file_sha256, json_digest, pick_device, seed_everything,
                            torch_save, write_json)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPaths:
    """Every file a train stage reads or writes; dvc.yaml passes each one in."""

    split: Path        # data/split/<ds>
    model_dir: Path    # models/<ds>/<arch>: model.pt, best.pt, run.json
    metrics_dir: Path  # metrics/<ds>/<arch>: history.csv, train.json
    checkpoint: Path   # checkpoints/<ds>/<arch>/last.pt (persist: true in dvc.yaml)


def data_digest(split_dir: Path) -> str:
    """sha256 over the split files, so a run names exactly the data it saw."""
    return json_digest({s: file_sha256(split_dir / f"{s}.pt") for s in ("train", "val", "test")})


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def model_record(arch: str, args: dict[str, Any], state: dict[str, torch.Tensor], hp: HParams,
                 classes: list[str]) -> dict[str, Any]:
    """A final-model file: weights plus all that is needed to rebuild and feed the model."""
    return {"arch": arch, "args": args, "state_dict": {k: v.cpu() for k, v in state.items()},
            "normalize": {"mean": hp.mean, "std": hp.std}, "classes": classes}


def train(params: dict[str, Any], dataset: str, arch: str, paths: TrainPaths) -> dict[str, float]:
    """Train ``arch`` on ``dataset`` and write every output of ``train@{dataset}-{arch}``."""
    if arch not in REGISTRY:
        raise MnistlabError(f"unknown arch {arch!r} (valid: {', '.join(sorted(REGISTRY))})")
    hp = HParams.from_params(params, arch)
    settings = TrainSettings.from_params(params)
    seed = get(params, "seed")
    device = pick_device(settings.device)
    tracking.check_reachable()  # before any compute is spent
    seed_everything(seed, settings.deterministic)

    classes = data.load_classes(paths.split)
    train_x, train_y = data.load_split(paths.split, "train")
    val_x, val_y = data.load_split(paths.split, "val")
    digest = data_digest(paths.split)
    # Everything that changes the trained weights; checkpoint_every does not.
    fingerprint = json_digest({
        "hparams": hp.flat(), "seed": seed, "data": digest, "device": device.type,
        "train": {k: getattr(settings, k) for k in ("deterministic", "min_steps", "bf16",
                                                    "channels_last", "compile")},
    })
    resume = load_resumable(paths.checkpoint, fingerprint)

    tag = f"{dataset}-{arch}"
    mlflow_params = {**hp.flat(), "seed": seed, "device": device.type, "dataset": dataset,
                     "data_digest": digest[:16], "min_steps": settings.min_steps,
                     "deterministic": settings.deterministic, "bf16": settings.bf16,
                     "compile": settings.compile, "n_train": len(train_y), "n_val": len(val_y)}
    run_id = tracking.start_run(dataset, arch, mlflow_params, tracking.dvc_tags(f"train@{tag}"),
                                resume_run_id=(resume or {}).get("run_id"))
    write_json(paths.model_dir / "run.json", {
        "run_id": run_id, "experiment": tracking.experiment_name(dataset),
        "tracking_uri": tracking.redact(tracking.tracking_uri()),
    })

    train_d = to_device(train_x, train_y, hp.mean, hp.std, device, settings.channels_last)
    val_d = to_device(val_x, val_y, hp.mean, hp.std, device, settings.channels_last)

    def on_epoch(row: dict[str, float]) -> None:
        tracking.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    try:
        result = fit(hp, settings, train_d, val_d, num_classes=len(classes), seed=seed,
                     fingerprint=fingerprint, checkpoint=paths.checkpoint, tag=tag, resume=resume,
                     on_epoch=on_epoch, extra_state={"run_id": run_id})
    except MnistlabError:
        tracking.set_terminated(run_id, "FAILED")
        raise

    args = {"num_classes": len(classes), **hp.args}
    summary = {**result.summary, "parameters": count_parameters(result.model)}
    torch_save(model_record(arch, args, result.model.state_dict(), hp, classes),
               paths.model_dir / "model.pt")
    torch_save(model_record(arch, args, result.best_state, hp, classes), paths.model_dir / "best.pt")
    write_history(paths.metrics_dir / "history.csv", result.history)
    write_json(paths.metrics_dir / "train.json", summary)

    tracking.log_metrics(run_id, {f"final_{k}" if not k.startswith(("best", "final")) else k: v
                                  for k, v in summary.items()}, step=int(summary["epochs"]))
    tracking.log_artifacts(run_id, [paths.model_dir / "model.pt", paths.model_dir / "best.pt",
                                    paths.metrics_dir / "history.csv"], "checkpoints")
    example = ((train_x[:2].unsqueeze(1).float() / 255 - hp.mean) / hp.std).numpy()
    tracking.log_pytorch_model(run_id, result.model, example)
    tracking.set_terminated(run_id, "FINISHED")
    return summary

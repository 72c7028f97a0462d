"""What one train stage does, end to end: params → device data → fit → outputs + MLflow.

Kept apart from :mod:`mnistlab.training` so the training loop stays a pure
function of tensors and settings (benchmarks and tests call it directly).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnistlab import data, distributed, tracking
from mnistlab.config import HParams, TrainSettings, seed_of
from mnistlab.errors import MnistlabError
from mnistlab.models import count_parameters
from mnistlab.training import (
    effective_epochs,
    fit,
    load_resumable,
    native_bf16,
    step_floor,
    to_device,
)
from mnistlab.utils import (
    atomic_path,
    file_sha256,
    json_digest,
    pick_device,
    seed_everything,
    torch_save,
    write_json,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPaths:
    """Every file a train stage reads or writes; dvc.yaml passes each one in."""

    split: Path        # data/split/<ds>
    model_dir: Path    # models/<ds>/<arch>: model.pt, best.pt, run.json
    metrics_dir: Path  # metrics/<ds>/<arch>: history.csv, train.json
    checkpoint: Path   # checkpoints/<ds>/<arch>/last.pt (persist: true in dvc.yaml)


# The modules whose code decides the trained weights. Their digest is part of the
# checkpoint fingerprint: after a code change a half-done (or finished) checkpoint
# is never resumed, since the resumed run could not match a fresh one.
WEIGHT_CODE = ("models.py", "training.py", "config.py", "experiment.py", "utils.py")


def data_digest(split_dir: Path) -> str:
    """sha256 over the split files, so a run names exactly the data it saw."""
    return json_digest({s: file_sha256(split_dir / f"{s}.pt") for s in ("train", "val", "test")})


def code_digest() -> str:
    """sha256 over :data:`WEIGHT_CODE` and the torch version."""
    here = Path(__file__).parent
    return json_digest({"torch": torch.__version__,
                        **{name: file_sha256(here / name) for name in WEIGHT_CODE}})


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch rows as CSV (the DVC plot), floats to 6 significant digits, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def model_record(arch: str, args: dict[str, Any], state: dict[str, torch.Tensor], hp: HParams,
                 classes: list[str]) -> dict[str, Any]:
    """A final-model file: weights plus all that is needed to rebuild and feed the model.

    Keys: ``arch``, ``args`` (builder arguments incl. num_classes), ``state_dict``
    (CPU tensors), ``normalize`` ({mean, std}) and ``classes``. Later stages read
    it with ``weights_only=True``, so it holds only tensors and plain containers.
    """
    return {"arch": arch, "args": args, "state_dict": {k: v.cpu() for k, v in state.items()},
            "normalize": {"mean": hp.mean, "std": hp.std}, "classes": classes}


class EpochLogger:
    """Sends per-epoch rows to MLflow in batches, keeping logging under ``max_share`` of wall time.

    Why not one request per epoch: a request costs ~5 ms on a local sqlite store
    (more on a remote server) while an epoch of the MLP on digits takes ~20 ms,
    so per-epoch logging alone would cost a fifth of training. Rows are buffered
    and flushed once the time since the last flush exceeds the last flush's cost
    divided by ``max_share``: logging stays within about ``max_share`` whatever the
    epoch length, and the UI lags by at most a few seconds; :meth:`flush` sends
    the rest at the end. Rows lost to a kill are in the checkpoint's history and are filled in on
    resume (:func:`open_run`).
    """

    # Half the 2 % budget: the last flush falls outside the rule, and a request's
    # cost varies.
    def __init__(self, run_id: str, max_share: float = 0.01):
        self.run_id, self.max_share = run_id, max_share
        self.buffer: list[dict[str, float]] = []
        # A typical sqlite request until the first flush measures the real cost (the
        # first one also opens the store, so flushing at once would cost the most).
        self.cost = 0.005
        self.last = time.perf_counter()
        self.seconds = 0.0  # total time spent logging, reported in train.json

    def __call__(self, row: dict[str, float]) -> None:
        self.buffer.append(row)
        if time.perf_counter() - self.last >= self.cost / self.max_share:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        t = time.perf_counter()
        tracking.log_history(self.run_id, self.buffer)
        self.buffer = []
        self.last = time.perf_counter()
        self.cost = self.last - t
        self.seconds += self.cost


def open_run(dataset: str, arch: str, params: dict[str, Any], tags: dict[str, str],
             resume: dict[str, Any] | None) -> str:
    """The MLflow run for this stage: the interrupted run when resuming it, else a new one.

    A new run that starts from a checkpoint (a finished one, or one whose run was
    deleted) first gets the checkpoint's per-epoch history, so every run holds
    the full curves. Store errors become one line naming the (redacted) URI.
    """
    raw_uri = tracking.tracking_uri()
    uri = tracking.redact(raw_uri)
    try:
        old = (resume or {}).get("run_id")
        history = (resume or {}).get("history", [])
        if resume is not None and old and resume["epoch"] < resume["epochs"] \
                and tracking.reopen_run(old):
            # Epochs still buffered when the run was killed are in the checkpoint.
            done = tracking.logged_steps(old, "train_loss")
            missing = [row for row in history if int(row["epoch"]) not in done]
            if missing:
                tracking.log_history(old, missing)
            return old
        run_id = tracking.start_run(dataset, arch, params, tags)
        if history:
            tracking.log_history(run_id, history)
        return run_id
    except MnistlabError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "store unusable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(raw_uri, uri)
        raise MnistlabError(f"MLflow tracking store {uri}: {first}") from None


def train(params: dict[str, Any], dataset: str, arch: str, paths: TrainPaths) -> dict[str, float]:
    """Train ``arch`` on ``dataset`` and write every output of ``train@{dataset}-{arch}``.

    Args:
        params: The whole params.yaml mapping (reads ``seed``, ``train``, ``hparams.<arch>``).
        dataset: Dataset name (for the MLflow experiment, tags and messages).
        arch: A registered architecture.
        paths: The files this stage reads and writes (from dvc.yaml).

    Returns:
        The training summary also written to ``train.json``.

    Raises:
        MnistlabError: Bad params, unreachable tracking server, unreadable split,
            or a diverging run (NaN/inf); always one line.
    """
    hp = HParams.from_params(params, arch)
    settings = TrainSettings.from_params(params)
    seed = seed_of(params)
    dist = distributed.from_env()  # torchrun's RANK/WORLD_SIZE, or a single process
    if dist.is_main:
        tracking.check_reachable()  # before any compute is spent
    device = distributed.init(dist, pick_device(settings.device))
    try:
        return _train_ranked(params, dataset, arch, paths, hp, settings, seed, device, dist)
    finally:
        distributed.shutdown(dist)


def _train_ranked(params: dict[str, Any], dataset: str, arch: str, paths: TrainPaths,
                  hp: HParams, settings: TrainSettings, seed: int, device: torch.device,
                  dist: distributed.Dist) -> dict[str, float]:
    """:func:`train` on one rank: every rank trains; rank 0 alone logs and writes outputs."""
    seed_everything(seed, settings.deterministic)

    classes = data.load_classes(paths.split)
    train_x, train_y = data.load_split(paths.split, "train")
    val_x, val_y = data.load_split(paths.split, "val")
    digest = data_digest(paths.split)
    # Everything that changes the trained weights; checkpoint_every and
    # eval_batch_size do not, so changing them resumes (or reuses) a checkpoint.
    fingerprint = json_digest({
        "hparams": hp.flat(), "seed": seed, "data": digest, "device": device.type,
        "code": code_digest(), "world": dist.world,
        "train": {k: getattr(settings, k) for k in ("deterministic", "bf16", "channels_last",
                                                    "compile")},
        "step_floor": step_floor(hp, settings, len(train_y)),
        "native_bf16": native_bf16(device),  # whether bf16 autocast actually applies here
    })
    resume = load_resumable(paths.checkpoint, fingerprint)

    tag = f"{dataset}-{arch}"
    mlflow_params = {**hp.flat(), "seed": seed, "device": device.type, "dataset": dataset,
                     "data_digest": digest,
                     "min_steps": step_floor(hp, settings, len(train_y)),
                     "effective_epochs": effective_epochs(hp, settings, len(train_y)),
                     "deterministic": settings.deterministic,
                     "bf16": settings.bf16 and native_bf16(device),
                     "channels_last": settings.channels_last, "compile": settings.compile,
                     "n_train": len(train_y), "n_val": len(val_y), "world_size": dist.world}
    if not dist.is_main:
        return fit(hp, settings, *(to_device(*xy, hp.mean, hp.std, device, settings.channels_last)
                                   for xy in ((train_x, train_y), (val_x, val_y))),
                   num_classes=len(classes), seed=seed, fingerprint=fingerprint,
                   checkpoint=paths.checkpoint, tag=tag, resume=resume, dist=dist).summary
    run_id = open_run(dataset, arch, mlflow_params, tracking.dvc_tags(f"train@{tag}"), resume)

    try:
        summary = _train_and_write(hp, settings, dataset, arch, paths, device, seed, fingerprint,
                                   resume, run_id, classes, (train_x, train_y), (val_x, val_y),
                                   dist)
        # Only now: until the new model.pt exists, run.json must keep naming the run of
        # the model that is there (a failed rerun leaves the earlier outputs as they were;
        # a resume finds its run id in the checkpoint).
        write_json(paths.model_dir / "run.json", {
            "run_id": run_id, "experiment": tracking.experiment_name(dataset),
            "tracking_uri": tracking.redact(tracking.tracking_uri()),
        })
    except BaseException as e:
        # Close the run so the MLflow UI does not show it running forever; a later
        # resume re-opens it. Never let a tracking failure hide the real error.
        with contextlib.suppress(Exception):
            tracking.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracking.set_terminated(run_id, "FINISHED")
    return summary


def _train_and_write(hp: HParams, settings: TrainSettings, dataset: str, arch: str,
                     paths: TrainPaths, device: torch.device, seed: int, fingerprint: str,
                     resume: dict[str, Any] | None, run_id: str, classes: list[str],
                     train_xy: tuple[torch.Tensor, torch.Tensor],
                     val_xy: tuple[torch.Tensor, torch.Tensor],
                     dist: distributed.Dist) -> dict[str, float]:
    """The part of :func:`train` that runs inside the MLflow run: fit, write, log."""
    train_d = to_device(*train_xy, hp.mean, hp.std, device, settings.channels_last)
    val_d = to_device(*val_xy, hp.mean, hp.std, device, settings.channels_last)

    logger = EpochLogger(run_id)
    result = fit(hp, settings, train_d, val_d, num_classes=len(classes), seed=seed,
                 fingerprint=fingerprint, checkpoint=paths.checkpoint, tag=f"{dataset}-{arch}",
                 resume=resume, on_epoch=logger, extra_state={"run_id": run_id}, dist=dist)
    logger.flush()

    args = {"num_classes": len(classes), **hp.args}
    summary = {**result.summary, "parameters": count_parameters(result.model),
               "tracking_seconds": logger.seconds}
    torch_save(model_record(arch, args, result.model.state_dict(), hp, classes),
               paths.model_dir / "model.pt")
    torch_save(model_record(arch, args, result.best_state, hp, classes), paths.model_dir / "best.pt")
    write_history(paths.metrics_dir / "history.csv", result.history)
    write_json(paths.metrics_dir / "train.json", summary)

    # Summary names that would clash with per-epoch metrics (train_seconds) get a
    # final_ prefix; best_/final_ ones keep theirs.
    tracking.log_metrics(run_id, {k if k.startswith(("best", "final")) else f"final_{k}": v
                                  for k, v in summary.items()}, step=int(summary["epochs"]))
    tracking.log_artifacts(run_id, [paths.model_dir / "model.pt", paths.model_dir / "best.pt",
                                    paths.metrics_dir / "history.csv"], "checkpoints")
    example = ((train_xy[0][:2].unsqueeze(1).float() / 255 - hp.mean) / hp.std).numpy()
    tracking.log_pytorch_model(run_id, result.model, example)
    return summary

"""Stage ``train@{dataset}-{arch}``: params → device data → build → fit → outputs + MLflow.

Kept apart from :mod:`mnistlab.training` so the training loop stays a pure
function of built objects and tensors (benchmarks and tests call it directly).
Writes ``models/<ds>/<arch>/{model,best}.pt`` (:func:`mnistlab.models.save_model`),
``run.json``, ``metrics/<ds>/<arch>/{train.json,history.csv}``
(:mod:`mnistlab.artifacts`) and the resumable checkpoint (:mod:`mnistlab.checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnistlab import artifacts, distributed, serving, tracking
from mnistlab.checkpoint import code_digest, load_resumable
from mnistlab.config import TrainSettings, seed_of
from mnistlab.errors import MnistlabError
from mnistlab.hparams import HParams
from mnistlab.inference import DeviceSplit, native_bf16, to_device
from mnistlab.models import count_parameters, model_record, save_model
from mnistlab.training import Built, build, effective_epochs, fit, step_floor
from mnistlab.utils import json_digest, pick_device, seed_everything, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPaths:
    """Every file a train stage reads or writes; dvc.yaml passes each one in."""

    split: Path        # data/split/<ds>
    model_dir: Path    # models/<ds>/<arch>: model.pt, best.pt, run.json
    metrics_dir: Path  # metrics/<ds>/<arch>: history.csv, train.json
    checkpoint: Path   # checkpoints/<ds>/<arch>/last.pt (persist: true in dvc.yaml)


def fingerprint_of(hp: HParams, settings: TrainSettings, seed: int, digest: str,
                   device: torch.device, world: int, n_train: int) -> str:
    """Everything that changes the trained weights. checkpoint_every and eval_batch_size
    do not, so changing them resumes (or reuses) a checkpoint."""
    return json_digest({
        "hparams": hp.flat(), "seed": seed, "data": digest, "device": device.type,
        "code": code_digest(), "world": world,
        "train": {k: getattr(settings, k) for k in ("deterministic", "bf16", "channels_last",
                                                    "compile")},
        "step_floor": step_floor(hp, settings, n_train),
        "native_bf16": native_bf16(device),  # whether bf16 autocast actually applies here
    })


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
    device = distributed.init(dist, pick_device(settings.device, "train.device"))
    try:
        seed_everything(seed, settings.deterministic)
        classes = artifacts.load_classes(paths.split)
        train_xy = artifacts.load_split(paths.split, "train")
        val_xy = artifacts.load_split(paths.split, "val")
        n_train = len(train_xy[1])
        digest = artifacts.split_digest(paths.split)
        fingerprint = fingerprint_of(hp, settings, seed, digest, device, dist.world, n_train)
        resume = load_resumable(paths.checkpoint, fingerprint)
        train_d, val_d = (to_device(*xy, hp.mean, hp.std, device, settings.channels_last)
                          for xy in (train_xy, val_xy))
        built = build(hp, settings, num_classes=len(classes), n_train=n_train, device=device,
                      seed=seed, dist=dist)
        run = dict(hp=hp, settings=settings, dataset=dataset, seed=seed, fingerprint=fingerprint,
                   checkpoint=paths.checkpoint, resume=resume, dist=dist)
        if not dist.is_main:
            return fit(built, train_d, val_d, **run).summary
        mlflow_params = {**hp.flat(), "seed": seed, "device": device.type, "dataset": dataset,
                         "data_digest": digest, "min_steps": step_floor(hp, settings, n_train),
                         "effective_epochs": effective_epochs(hp, settings, n_train),
                         "deterministic": settings.deterministic,
                         "bf16": settings.bf16 and native_bf16(device),
                         "channels_last": settings.channels_last, "compile": settings.compile,
                         "n_train": n_train, "n_val": len(val_xy[1]), "world_size": dist.world}
        run_id = open_run(dataset, arch, mlflow_params,
                          tracking.dvc_tags(f"train@{dataset}-{arch}"), resume)
        try:
            summary = _fit_and_write(built, train_d, val_d, run, run_id, classes, paths,
                                     train_xy[0][:2])
            # Only now: until the new model.pt exists, run.json must keep naming the run of
            # the model that is there (a failed rerun leaves the earlier outputs as they were;
            # a resume finds its run id in the checkpoint).
            artifacts.write_run(paths.model_dir, run_id, tracking.experiment_name(dataset),
                                tracking.redact(tracking.tracking_uri()))
        except BaseException as e:
            # Close the run so the MLflow UI does not show it running forever; a later
            # resume re-opens it. Never let a tracking failure hide the real error.
            with contextlib.suppress(Exception):
                tracking.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt)
                                        else "FAILED")
            raise
        tracking.set_terminated(run_id, "FINISHED")
        return summary
    finally:
        distributed.shutdown(dist)


def _fit_and_write(built: Built, train_d: DeviceSplit, val_d: DeviceSplit, run: dict[str, Any],
                   run_id: str, classes: list[str], paths: TrainPaths,
                   example_images: torch.Tensor) -> dict[str, float]:
    """The part of :func:`train` that runs inside the MLflow run (rank 0): fit, write, log."""
    hp: HParams = run["hp"]
    logger = EpochLogger(run_id)
    result = fit(built, train_d, val_d, on_epoch=logger, extra_state={"run_id": run_id}, **run)
    logger.flush()

    summary = {**result.summary, "parameters": count_parameters(result.model),
               "tracking_seconds": logger.seconds}
    normalize = {"mean": hp.mean, "std": hp.std}
    save_model(paths.model_dir / artifacts.MODEL,
               model_record(hp.arch, built.args, result.model.state_dict(), normalize, classes))
    save_model(paths.model_dir / artifacts.BEST,
               model_record(hp.arch, built.args, result.best_state, normalize, classes))
    artifacts.write_history(paths.metrics_dir / artifacts.HISTORY, result.history)
    write_json(paths.metrics_dir / artifacts.TRAIN_METRICS, summary)

    # Summary names that would clash with per-epoch metrics (train_seconds) get a
    # final_ prefix; best_/final_ ones keep theirs.
    tracking.log_metrics(run_id, {k if k.startswith(("best", "final")) else f"final_{k}": v
                                  for k, v in summary.items()}, step=int(summary["epochs"]))
    tracking.log_artifacts(run_id, [paths.model_dir / artifacts.MODEL,
                                    paths.model_dir / artifacts.BEST,
                                    paths.metrics_dir / artifacts.HISTORY], "checkpoints")
    # Raw pixels: the logged model's pyfunc flavor (mlflow models serve) normalises itself
    # and answers with class names (mnistlab.serving); batch 2 keeps the batch dimension dynamic.
    example = example_images.unsqueeze(1).float().numpy()
    tracking.log_pytorch_model(run_id, result.model, example, functools.partial(
        serving.log_model, classes=classes, normalize=normalize))
    return summary

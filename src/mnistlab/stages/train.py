"""Stage ``train@{dataset}-{arch}-{seed}``: params → device data → build → fit → outputs + MLflow.

Kept apart from :mod:`mnistlab.training` so the training loop stays a pure
function of built objects and tensors (benchmarks and tests call it directly).
Writes ``models/<ds>/<arch>/seed-<seed>/{model,best}.pt`` (:func:`mnistlab.models.save_model`),
``run.json``, ``metrics/<ds>/<arch>/seed-<seed>/{train.json,history.csv}``
(:mod:`mnistlab.artifacts`) and the resumable checkpoint (:mod:`mnistlab.checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mnistlab import artifacts, distributed, serving, threads, tracking
from mnistlab.checkpoint import (
    code_digest,
    drop_kept,
    kept_copy,
    load_resumable,
    recorded_run_id,
    save_kept,
)
from mnistlab.config import PROGRESS_ENV, TrainSettings, pipeline_outputs, stage_name
from mnistlab.errors import MnistlabError, Stopped, describe, redact_text
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
    model_dir: Path    # models/<ds>/<arch>/seed-<seed>: model.pt, best.pt, run.json
    metrics_dir: Path  # metrics/<ds>/<arch>/seed-<seed>: history.csv, train.json
    checkpoint: Path   # checkpoints/<ds>/<arch>/seed-<seed>/last.pt (persist: true in dvc.yaml)


class RunRecord(Mapping[str, Any]):
    """What every checkpoint keeps of the run besides the training (``fit``'s ``extra_state``),
    read each time one is written: the MLflow run id, the torch thread count the run started
    with, and its seconds of MLflow logging so far (those of earlier processes included).

    Why: after DVC has deleted a finished run's outputs (before a stage that then failed on a
    mistyped param), the rerun rebuilds them from the checkpoint without training; train.json
    must then say what the training had, not this process's thread count and 0 s of logging,
    or it differs from the one it replaces and compare reruns.
    """

    def __init__(self, run_id: str, threads: int, logger: EpochLogger, logged_before: float):
        self.run_id, self.threads, self.logger, self.before = run_id, threads, logger, logged_before

    def _now(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "threads": self.threads,
                "tracking_seconds": self.before + self.logger.seconds}

    def __getitem__(self, key: str) -> Any:
        return self._now()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


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
    def __init__(self, run_id: str, max_share: float = 0.01, last_epoch: int | None = None):
        # last_epoch's row is sent at once: before the last checkpoint is written, so that
        # the logging seconds it records (RunRecord) are the whole run's.
        self.run_id, self.max_share, self.last_epoch = run_id, max_share, last_epoch
        self.buffer: list[dict[str, float]] = []
        # A typical sqlite request until the first flush measures the real cost (the
        # first one also opens the store, so flushing at once would cost the most).
        self.cost = 0.005
        self.last = time.perf_counter()
        self.seconds = 0.0  # total time spent logging, reported in train.json

    def __call__(self, row: dict[str, float]) -> None:
        self.buffer.append(row)
        if (time.perf_counter() - self.last >= self.cost / self.max_share
                or (self.last_epoch is not None and row["epoch"] >= self.last_epoch)):
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        t = time.perf_counter()
        try:
            tracking.log_history(self.run_id, self.buffer)
        except Exception as e:  # noqa: BLE001 - MLflow raises many types
            # Said in one line (credentials removed) with what it means for the training: it
            # stops here, and the epochs it has done are in the checkpoint.
            line = describe(e)
            if line is None:
                raise
            raise MnistlabError(f"{line} (while logging epoch {int(self.buffer[-1]['epoch'])}: "
                                "training stopped; rerun to resume from the last checkpoint)") from e
        self.buffer = []
        self.last = time.perf_counter()
        self.cost = self.last - t
        self.seconds += self.cost


def open_run(dataset: str, arch: str, seed: int, params: dict[str, Any], tags: dict[str, str],
             resume: dict[str, Any] | None, replaced: str | None = None) -> str:
    """The MLflow run for this stage: the checkpoint's own run when there is one, else a new one.

    A checkpoint of these exact params, data and code names the run that made it, and
    that run goes on: resumed mid-training, or completed from a finished checkpoint (a
    rerun after a kill between the last epoch and the end of the run, after DVC deleted
    the outputs, or after a change to tracking.py or serving.py only). So however a run
    is interrupted, its rerun leaves one run per dataset x arch x seed, not a second one. A new
    run is opened only without such a checkpoint or when its run is gone (deleted, or in
    another store); it first gets the checkpoint's per-epoch history, so every run
    holds the full curves. Then runs of this dataset x arch x seed left RUNNING by a killed
    stage (``replaced``: the run of a checkpoint that is not resumed) are marked KILLED
    (:func:`mnistlab.tracking.end_stale_runs`). Store errors become one line naming the
    (redacted) URI.
    """
    raw_uri = tracking.tracking_uri()
    uri = tracking.redact(raw_uri)
    try:
        old = (resume or {}).get("run_id")
        history = (resume or {}).get("history", [])
        if resume is not None and old and tracking.reopen_run(old):
            # Epochs still buffered when the run was killed are in the checkpoint.
            done = tracking.logged_steps(old, "train_loss")
            missing = [row for row in history if int(row["epoch"]) not in done]
            if missing:
                tracking.log_history(old, missing)
            run_id = old
            _tidy(tracking.fail_pending_models, run_id)  # a log_model cut short by a kill
        else:
            run_id = tracking.start_run(dataset, arch, seed, params, tags)
            if history:
                tracking.log_history(run_id, history)
        _tidy(tracking.end_stale_runs, dataset, arch, seed, keep=run_id, replaced=replaced)
        return run_id
    except MnistlabError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "store unusable"
        # errors.describe finds the real cause deep in the chain ("attempt to write a readonly
        # database" under SQLAlchemy's "Query-invoked autoflush" wrapper), credentials removed.
        # An OSError (the store's folder cannot be made) is described by its file alone: say
        # whose file it is.
        line = describe(e) or redact_text(
            (str(e).strip().splitlines() or [type(e).__name__])[0].replace(raw_uri, uri))
        if not line.startswith("MLflow tracking store "):
            line = f"MLflow tracking store {uri}: {line}"
        raise MnistlabError(line) from None


def _tidy(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Run a clean-up of what killed runs left behind; a failure is a warning, never a stop."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. a server without logged-model search
        # redact_text, not tracking.redact: MLflow's messages embed the URI, user:pass@ and all.
        log.warning("MLflow clean-up %s skipped: %s", fn.__name__,
                    redact_text(str(e).strip().splitlines()[0] if str(e).strip() else
                                type(e).__name__))


def train(params: dict[str, Any], dataset: str, arch: str, seed: int, paths: TrainPaths
          ) -> dict[str, float]:
    """Train ``arch`` on ``dataset`` and write every output of ``train@{dataset}-{arch}-{seed}``.

    Args:
        params: The whole params.yaml mapping (reads ``train`` and ``hparams.<arch>``).
        dataset: Dataset name (for the MLflow experiment, tags and messages).
        arch: A registered architecture.
        seed: The training seed (one item of params.yaml's ``seeds``): init, shuffling,
            augmentation, dropout.
        paths: The files this stage reads and writes (from dvc.yaml).

    Returns:
        The training summary also written to ``train.json``.

    Raises:
        MnistlabError: Bad params, unreachable tracking server, unreadable split,
            or a diverging run (NaN/inf); always one line.
        Stopped: A stop signal (SIGTERM, SIGINT, SIGHUP): the MLflow run is marked
            KILLED, and the exception says what to rerun and what it resumes from.
    """
    hp = HParams.from_params(params, arch)
    settings = TrainSettings.from_params(params)
    stage = stage_name("train", dataset, arch, seed)
    dist = distributed.from_env()  # torchrun's RANK/WORLD_SIZE, or a single process
    if dist.is_main:
        tracking.check_reachable()  # before any compute is spent
    started = time.time_ns()
    resume = None
    device = distributed.init(dist, pick_device(settings.device, "train.device"))
    # A slot from now until the end of training: runs starting beside this one count it.
    lease = threads.Lease()
    try:
        seed_everything(seed, settings.deterministic)
        classes = artifacts.load_classes(paths.split)
        train_xy = artifacts.load_split(paths.split, "train")
        val_xy = artifacts.load_split(paths.split, "val")
        n_train = len(train_xy[1])
        digest = artifacts.split_digest(paths.split)
        fingerprint = fingerprint_of(hp, settings, seed, digest, device, dist.world, n_train)
        resume = load_resumable(paths.checkpoint, fingerprint, kept_copy(paths.checkpoint))
        # Counted now, after the data is read, so that runs launched together see each other;
        # fixed for the run (see mnistlab.threads).
        n_threads = lease.apply(settings.threads, "train.threads", f"{dataset}-{arch}-{seed}")
        train_d, val_d = (to_device(*xy, hp.mean, hp.std, device, settings.channels_last)
                          for xy in (train_xy, val_xy))
        built = build(hp, settings, num_classes=len(classes), n_train=n_train, device=device,
                      seed=seed, dist=dist)
        run = dict(hp=hp, settings=settings, dataset=dataset, seed=seed, fingerprint=fingerprint,
                   checkpoint=paths.checkpoint, resume=resume, keep_copy=True, dist=dist,
                   progress_file=sys.stderr if os.environ.get(PROGRESS_ENV) == "always" else None)
        if not dist.is_main:
            return fit(built, train_d, val_d, **run).summary
        mlflow_params = {**hp.flat(), "seed": seed, "device": device.type, "dataset": dataset,
                         "data_digest": digest, "min_steps": step_floor(hp, settings, n_train),
                         "effective_epochs": effective_epochs(hp, settings, n_train),
                         "deterministic": settings.deterministic,
                         "bf16": settings.bf16 and native_bf16(device),
                         "channels_last": settings.channels_last, "compile": settings.compile,
                         "n_train": n_train, "n_val": len(val_xy[1]), "world_size": dist.world,
                         "threads": n_threads}
        # A checkpoint not resumed (other params, data or code) names the run it replaces.
        replaced = recorded_run_id(paths.checkpoint) if resume is None else None
        run_id = None
        try:
            run_id = open_run(dataset, arch, seed, mlflow_params,
                              tracking.dvc_tags(stage, pipeline_outputs(params)),
                              resume, replaced)
            if resume is not None and resume.get("run_id") != run_id:
                # Its run was gone: the checkpoint now names the new one, so that a kill
                # before the next checkpoint (or any rerun of a finished one) goes on in it.
                save_kept(paths.checkpoint, {**resume, "run_id": run_id})
            summary = _fit_and_write(built, train_d, val_d, run, run_id, classes, paths,
                                     train_xy[0][:2], n_threads)
            # Only now: until the new model.pt exists, run.json must keep naming the run of
            # the model that is there (a failed rerun leaves the earlier outputs as they were;
            # a resume finds its run id in the checkpoint).
            artifacts.write_run(paths.model_dir, run_id, tracking.experiment_name(dataset),
                                tracking.redact(tracking.tracking_uri()))
            tracking.set_terminated(run_id, "FINISHED")
            drop_kept(paths.checkpoint)
        except BaseException as e:
            # Close the run so the MLflow UI does not show it running forever; a later
            # resume re-opens it. Never let a tracking failure hide the real error.
            if run_id is not None:
                with contextlib.suppress(Exception):
                    tracking.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt)
                                            else "FAILED")
            raise
        return summary
    except Stopped as e:
        e.where = _stopped_where(stage, paths.checkpoint, started,
                                 resume is not None)
        raise
    finally:
        lease.release()
        distributed.shutdown(dist)


def _stopped_where(stage: str, checkpoint: Path, started_ns: int, resumed: bool) -> str:
    """What a stop signal's one line adds: the stage, and what its rerun starts from."""
    try:
        saved = resumed or checkpoint.stat().st_mtime_ns >= started_ns
    except OSError:
        saved = False
    if saved:
        return f"during {stage}; rerun `dvc repro` or `dvc exp run` to resume from {checkpoint}"
    return f"during {stage}, before its first checkpoint; rerun `dvc repro` to start it again"


def _fit_and_write(built: Built, train_d: DeviceSplit, val_d: DeviceSplit, run: dict[str, Any],
                   run_id: str, classes: list[str], paths: TrainPaths,
                   example_images: torch.Tensor, threads: int) -> dict[str, float]:
    """The part of :func:`train` that runs inside the MLflow run (rank 0): fit, write, log."""
    hp: HParams = run["hp"]
    logger = EpochLogger(run_id, last_epoch=built.epochs)
    resume = run["resume"] or {}
    record = RunRecord(run_id, int(resume.get("threads", threads)), logger,
                       float(resume.get("tracking_seconds", 0.0)))
    result = fit(built, train_d, val_d, on_epoch=logger, extra_state=record, **run)
    logger.flush()

    summary = {**result.summary, "parameters": count_parameters(result.model),
               "tracking_seconds": record["tracking_seconds"], "threads": record["threads"]}
    normalize = {"mean": hp.mean, "std": hp.std}
    save_model(paths.model_dir / artifacts.MODEL,
               model_record(hp.arch, built.args, result.model.state_dict(), normalize, classes))
    save_model(paths.model_dir / artifacts.BEST,
               model_record(hp.arch, built.args, result.best_state, normalize, classes))
    artifacts.write_history(paths.metrics_dir / artifacts.HISTORY, result.history)
    write_json(paths.metrics_dir / artifacts.TRAIN_METRICS, summary)

    # Summary names that would clash with per-epoch metrics (train_seconds) get a
    # final_ prefix; best_/final_ ones keep theirs.
    # (threads is a param of the run, logged as one: not a metric.)
    tracking.log_metrics(run_id, {k if k.startswith(("best", "final")) else f"final_{k}": v
                                  for k, v in summary.items() if k != "threads"},
                         step=int(summary["epochs"]))
    tracking.log_artifacts(run_id, [paths.model_dir / artifacts.MODEL,
                                    paths.model_dir / artifacts.BEST,
                                    paths.metrics_dir / artifacts.HISTORY], "checkpoints")
    # Raw pixels: the logged model's pyfunc flavor (mlflow models serve) normalises itself
    # and answers with class names (mnistlab.serving); batch 2 keeps the batch dimension dynamic.
    example = example_images.unsqueeze(1).float().numpy()
    tracking.log_pytorch_model(run_id, result.model, example, functools.partial(
        serving.log_model, classes=classes, normalize=normalize))
    return summary

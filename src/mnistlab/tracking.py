"""MLflow tracking: one run per (dataset, arch), shared by the train, evaluate and features stages.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db``
at the repo root, so ``mlflow ui`` there shows every run). Credentials stay in
the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``, or a
``user:pass@`` in the URI): nothing here writes them to params, tags, logs or
stage outputs — :func:`redact` strips them wherever a URI is shown.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mnistlab.errors import MnistlabError

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT_PREFIX = "mnistlab"
T = TypeVar("T")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def redact(uri: str) -> str:
    """``http://user:secret@host`` → ``http://host``: safe to print, tag or store."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urllib.parse.urlunsplit(parts)


def experiment_name(dataset: str) -> str:
    return f"{EXPERIMENT_PREFIX}/{dataset}"


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast (one line naming the URI) if a remote tracking server does not answer.

    Called before any training starts, so an unreachable server wastes no compute.
    MLflow's own client would retry for minutes first.
    """
    uri = uri or tracking_uri()
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return  # reachable; auth is MLflow's business (credentials from the environment)
        raise MnistlabError(f"MLflow tracking server {redact(uri)} answered HTTP {e.code} on /health") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MnistlabError(
            f"MLflow tracking server {redact(uri)} unreachable ({reason}); "
            "start it or unset MLFLOW_TRACKING_URI to use sqlite:///mlflow.db"
        ) from None


def retry_locked(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry an MLflow call while a sqlite store reports "database is locked".

    Two pipelines writing one sqlite file at once collide; SQLite's own busy
    timeout is short under MLflow's engine settings, so back off and try again.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        delay = 0.05
        for attempt in range(40):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - MLflow wraps sqlite errors in several types
                if "database is locked" not in str(e) or attempt == 39:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    return wrapper


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri())


@retry_locked
def _experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # noqa: BLE001 - a concurrent stage may have created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def dvc_tags(stage: str) -> dict[str, str]:
    """Tags describing where the run came from (git commit, DVC stage/experiment)."""
    from mnistlab.utils import git_info

    tags = {**git_info(), "dvc_stage": stage}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


@retry_locked
def start_run(dataset: str, arch: str, params: dict[str, Any], tags: dict[str, str],
              resume_run_id: str | None = None) -> str:
    """Create (or re-open, when resuming) the run ``{dataset}-{arch}``; return its id."""
    c = client()
    if resume_run_id:
        try:
            run = c.get_run(resume_run_id)
            if run.info.lifecycle_stage == "active":
                c.update_run(resume_run_id, status="RUNNING")
                return resume_run_id
        except Exception:  # noqa: BLE001 - deleted or in another store: start afresh
            log.warning("MLflow run %s not found in %s; starting a new run", resume_run_id,
                        redact(tracking_uri()))
    exp_id = _experiment_id(c, experiment_name(dataset))
    run = c.create_run(exp_id, run_name=f"{dataset}-{arch}",
                       tags={"dataset": dataset, "arch": arch, **tags})
    from mlflow.entities import Param

    c.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    return run.info.run_id


@retry_locked
def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """One batched request for a whole dict of metrics (one per epoch, never per step)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    c = client()
    c.log_batch(run_id, metrics=[Metric(k, float(v), ts, step or 0) for k, v in metrics.items()])


@retry_locked
def log_artifacts(run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    c = client()
    for p in paths:
        if Path(p).is_dir():
            c.log_artifacts(run_id, str(p), artifact_path)
        else:
            c.log_artifact(run_id, str(p), artifact_path)


@retry_locked
def set_terminated(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


@retry_locked
def log_pytorch_model(run_id: str, model, example) -> None:
    """Log ``model`` with mlflow.pytorch, with a signature inferred from ``example`` (numpy)."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri())
    model = model.cpu().eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name="model", signature=signature, input_example=example)


def read_run_id(path: Path) -> str:
    """The run id a train stage wrote (``run.json``), for later stages to log into."""
    import json

    try:
        return json.loads(Path(path).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        raise MnistlabError(f"{path}: missing or invalid MLflow run record (run the train stage)") from None

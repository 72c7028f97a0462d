"""MLflow tracking: one run per (dataset, arch, seed), shared by the train, evaluate and features stages.

The runs of one dataset x arch (one per training seed) carry the same :data:`GROUP_TAG`, so
the MLflow UI's "Group by" on that tag shows them as one group with their aggregates.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db``
at the repo root, so ``mlflow ui`` there shows every run). Credentials stay in
the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``, or a
``user:pass@`` in the URI): nothing here writes them to params, tags, logs or
stage outputs — :func:`redact` strips them wherever a URI is shown.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mnistlab.config import exp_origin
from mnistlab.errors import MnistlabError

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT_PREFIX = "mnistlab"
SEED_TAG = "seed"    # the run's training seed (also a param; a tag so that searches can filter on it)
GROUP_TAG = "group"  # <dataset>/<arch>[@<dvc exp>]: the MLflow UI's "Group by" gathers the seeds
T = TypeVar("T")


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, or ``sqlite:///mlflow.db`` (relative to the working directory).

    Except inside a queued or ``--temp`` DVC experiment: its stages run in a throwaway
    copy of the repo at ``<repo>/.dvc/tmp/exps/...``, where a relative mlflow.db would
    be deleted with the copy, runs and all. There the default is ``<repo>/mlflow.db``.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    origin = exp_origin()
    return DEFAULT_URI if origin is None else f"sqlite:///{origin / 'mlflow.db'}"


def sqlite_file(uri: str) -> str | None:
    """The database file a ``sqlite:///`` store URI names (relative or absolute, without its
    query string; empty for an in-memory store); None for any other store."""
    if urllib.parse.urlsplit(uri).scheme != "sqlite":
        return None
    return uri[len("sqlite:///"):].split("?")[0]


def redact(uri: str) -> str:
    """``http://user:secret@host`` → ``http://host``: safe to print, tag or store."""
    try:
        parts = urllib.parse.urlsplit(uri)
        if not (parts.username or parts.password):
            # Unchanged: urlunsplit would turn sqlite:////abs/path into sqlite://abs/path.
            return uri
        netloc = parts.netloc.rpartition("@")[2]  # host[:port], whatever the port text
    except ValueError:
        return "<unparseable tracking URI>"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def experiment_name(dataset: str) -> str:
    """One MLflow experiment per dataset: ``mnistlab/<dataset>``."""
    return f"{EXPERIMENT_PREFIX}/{dataset}"


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast (one line naming the URI) if a remote tracking server does not answer, or a
    sqlite store's file cannot be one (its folder missing, or a folder itself).

    Called before any training starts, so an unreachable server wastes no compute.
    MLflow's own client would retry for minutes first.
    """
    uri = uri or tracking_uri()
    try:
        scheme = urllib.parse.urlsplit(uri).scheme
    except ValueError as e:  # "Invalid IPv6 URL": a typo, not a server that is down
        raise MnistlabError(f"MLFLOW_TRACKING_URI: {redact(uri)} is not a valid URI ({e})") from None
    db = sqlite_file(uri)
    if db and db != ":memory:":
        # MLflow would create the missing folders (a typo becomes a new, empty store that
        # every finished run is missing from), or retry a folder for 90 s before it fails.
        path = Path(db).expanduser()
        if path.is_dir():
            raise MnistlabError(f"MLflow tracking store {redact(uri)}: {path} is a folder, not "
                                "a database file (name a file in it, e.g. .../mlflow.db)")
        if not path.absolute().parent.is_dir():
            raise MnistlabError(f"MLflow tracking store {redact(uri)}: no folder {path.parent} "
                                "(create it, or fix MLFLOW_TRACKING_URI)")
    if scheme not in ("http", "https"):
        return
    # Probe without the user:pass@ part: urllib cannot send it, and /health needs no auth.
    try:
        with urllib.request.urlopen(redact(uri).rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return  # reachable; auth is MLflow's business (credentials from the environment)
        raise MnistlabError(f"MLflow tracking server {redact(uri)} answered HTTP {e.code} on /health") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
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
    """An ``MlflowClient`` for :func:`tracking_uri` (one per URI per process)."""
    return _client(tracking_uri())


@functools.lru_cache(maxsize=4)
def _client(uri: str):
    # Cached: building a client opens the store (for sqlite, an engine and a schema
    # check), which would otherwise be paid again on every per-epoch log call.
    from mlflow.tracking import MlflowClient

    _no_url_printing(uri)
    _fail_fast()
    _no_logged_tracebacks()
    if sqlite_file(uri) is not None:
        # Imported before the lock, not by MlflowClient inside it: the imports are ~90 % of the
        # time the lock was held (0.7 s of 0.75 on a 2-core EPYC), and stages that start
        # together (make run's workers; six train stages at once on a GPU host) queued for it.
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    with _schema_lock(uri):
        return MlflowClient(uri)  # opens the store: a fresh sqlite file gets its schema here


@contextlib.contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """For a sqlite store: hold an exclusive lock on its folder while the store is opened.

    Why: MLflow creates and migrates a new sqlite store's schema the first time a
    process opens it, with no lock between processes; two stages starting together
    on one new mlflow.db (parallel experiments) both migrate, and one fails with
    "Online migration expected to match one row". :func:`retry_locked` cannot help:
    that is not a lock timeout. Server-backed stores migrate once, on the server.
    The lock is a flock on the database's folder, so no lock file is left behind.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; MLflow's own (unlocked) behaviour
        fcntl = None
    fd = None
    db = sqlite_file(uri)
    if db is not None and fcntl is not None:
        try:
            fd = os.open(os.path.dirname(os.path.abspath(db)) if db else ".", os.O_RDONLY)
        except OSError:  # no such folder: MLflow will say so, in its own words
            fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _no_url_printing(uri: str) -> None:
    """Stop MLflow printing "View run ... at <URI>" when ``uri`` carries credentials.

    Why: MLflow writes that line to stdout whenever a run ends on an HTTP server,
    with the URI as given, ``user:pass@`` included; a stage's stdout lands in CI
    logs. (The variable is read on every print, so setting it once is enough.)
    """
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


# MLflow's HTTP client, as a stage uses it when the user has not tuned it: 3 retries, after
# 0, 2 and 4 s (+ up to 1 s of jitter each), and 30 s of silence before a request fails.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def _fail_fast() -> None:
    """Give MLflow's HTTP client the :data:`FAIL_FAST` settings the user has not set.

    Why: its defaults (7 retries, backoff factor 2, 120 s timeout) are made to ride out
    minutes of rate limiting; a stage talking to a dead or failing server spent 259-342 s
    retrying before its error. A server that is down when a stage starts is caught by
    :func:`check_reachable` at once; one that dies or fails later now costs ~8 s. MLflow
    reads these variables on every request, so setting them once is enough.
    """
    for name, value in FAIL_FAST.items():
        os.environ.setdefault(name, value)


def _no_logged_tracebacks() -> None:
    """Keep MLflow's database store (sqlite) from logging, traceback and SQL included, each
    database error it then raises (~90 lines before the one that says what happened).

    The error itself still reaches :func:`mnistlab.errors.run_stage`, which says it in one
    line naming mlflow.db and the cause ("attempt to write a readonly database"); with
    ``MNISTLAB_DEBUG=1`` both are kept.
    """
    store_log = logging.getLogger("mlflow.store.db.utils")
    if os.environ.get("MNISTLAB_DEBUG", "") in ("", "0") and _drop_tracebacks not in store_log.filters:
        store_log.addFilter(_drop_tracebacks)


def _drop_tracebacks(record: logging.LogRecord) -> bool:
    return record.exc_info is None  # "SQLAlchemy database error. The following exception ..."


@retry_locked
def _experiment_id(c, name: str) -> str:
    """Id of experiment ``name``, created if missing (race-safe between parallel stages)."""
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


def group_of(dataset: str, arch: str, tags: dict[str, str]) -> str:
    """:data:`GROUP_TAG`'s value: ``<dataset>/<arch>``, plus ``@<DVC experiment>`` in one.

    Why the experiment: the seeds of ``dvc exp run -S 'seeds=[1,2,3]'`` belong together,
    not with the same arch's runs of another experiment (other params) in the same store.
    """
    exp = tags.get("dvc_exp_name")
    return f"{dataset}/{arch}" + (f"@{exp}" if exp else "")


def dvc_tags(stage: str, outputs: Sequence[str] = ()) -> dict[str, str]:
    """Tags describing where the run came from (git commit, DVC stage/experiment).

    ``outputs``: the pipeline's own outputs (:func:`mnistlab.config.pipeline_outputs`), which
    do not make ``git_dirty`` true.
    """
    from mnistlab.utils import git_info

    tags = {**git_info(outputs=outputs), "dvc_stage": stage}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def missing(e: BaseException) -> bool:
    """Whether MLflow answered "no such thing" (its RESOURCE_DOES_NOT_EXIST), rather than failed:
    a server down or failing is not a missing run, and :func:`mnistlab.errors.run_stage` says which."""
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def require_run(run_id: str, run_file: Path, stage: str) -> None:
    """Stop before any compute if ``run_id`` (named by ``run_file``) is not an active run of the
    store: deleted in the UI, or the store is another one (``mlflow.db`` deleted or moved,
    another ``MLFLOW_TRACKING_URI``). One line naming the file, the run, the store and the fix
    (``stage``: the train stage that makes a new run), where MLflow's own answer to the first
    write would be "Run with id=... not found" after the stage's work was done.
    """
    from mlflow.exceptions import MlflowException

    store = redact(tracking_uri())
    try:
        run = retry_locked(client().get_run)(run_id)
    except MlflowException as e:
        if not missing(e):
            raise  # the store itself failed: errors.run_stage says how, in one line
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        state = "was deleted from" if run is not None else "is not in"
        raise MnistlabError(f"{run_file}: MLflow run {run_id} {state} tracking store {store} "
                            f"(mlflow.db deleted or another MLFLOW_TRACKING_URI?); rerun "
                            f"`dvc repro -f -s {stage}` to train into a new run")


def reopen_run(run_id: str) -> bool:
    """Mark an existing, not deleted run as RUNNING again; False if it is gone.

    Gone means the store answered "no such run" (another store, or mlflow.db recreated).
    Any other failure (a 401, a server error) is the store's, raised for the caller to
    report: "not found; starting a new run" would send the user after the wrong problem.
    """
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        run = retry_locked(c.get_run)(run_id)
    except MlflowException as e:
        if not missing(e):
            raise
        log.warning("MLflow run %s not found in %s; starting a new run", run_id,
                    redact(tracking_uri()))
        return False
    if run.info.lifecycle_stage != "active":
        log.warning("MLflow run %s was deleted; starting a new run", run_id)
        return False
    retry_locked(c.update_run)(run_id, status="RUNNING")
    retry_locked(c.set_tag)(run_id, OWNER_TAG, owner())  # now held by this process
    return True


# --------------------------------------------------------------------------- RUNNING runs

# Which process holds a run RUNNING ("host:pid:start", start: when that process began,
# where the OS tells), so that a later train stage can tell a run whose process was
# killed (kill -9, a power cut: nothing could close it) from one still training.
OWNER_TAG = "mnistlab.owner"
# Why a run was ended by another process than its own (shown in the MLflow UI).
ENDED_TAG = "mnistlab.ended"


def _process_start(pid: int) -> str:
    """When process ``pid`` started (Linux: clock ticks after boot, from /proc); "" if
    unknown; "Z" for a zombie (dead, not yet waited for by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()  # after "(comm)", which may hold spaces
    if len(fields) <= 19:
        return ""
    return "Z" if fields[0] == "Z" else fields[19]  # field 3: state; field 22: starttime


def owner() -> str:
    """This process, as :data:`OWNER_TAG` records it."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def owner_gone(tag: str) -> bool:
    """True only when sure that the process :func:`owner` described no longer runs: it ran
    on this host, and no process has its pid, or the one that has it started at another time."""
    parts = tag.rsplit(":", 2)
    if len(parts) != 3 or os.name == "nt":  # Windows: os.kill(pid, 0) would end the process
        return False
    host, pid_text, start = parts
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists (another user's) or cannot tell
        pass
    now = _process_start(int(pid_text))
    return bool(start and now) and now != start


def end_stale_runs(dataset: str, arch: str, seed: int, keep: str, replaced: str | None = None
                   ) -> list[str]:
    """Mark KILLED, tagged with why (:data:`ENDED_TAG`), every run of ``dataset`` x ``arch`` x
    ``seed`` left RUNNING by a train stage that no longer runs; return their ids.

    Stale: its :data:`OWNER_TAG` names a process of this host that is gone; or it is
    ``replaced`` (the run of the checkpoint this stage does not resume) and was not
    started on this host (or before runs had owners). A run still training, here or
    (as far as anyone can tell) elsewhere, is left alone: parallel experiments share a store.

    Args:
        dataset: The dataset (its experiment is searched).
        arch: The architecture.
        seed: The training seed. Why it matters: the other seeds' stages of this dataset x
            arch may be training beside this one (``make run``, a DVC queue), and a run of
            another host cannot be told from a dead one; only this seed's can be replaced.
            A run without the tag (from before seeds) counts as every seed's.
        keep: This stage's own run, never touched.
        replaced: The run id of a checkpoint that this stage does not resume, if any.
    """
    c = client()
    exp = retry_locked(c.get_experiment_by_name)(experiment_name(dataset))
    if exp is None:
        return []
    # Tags compared here, not in the filter: dataset names need no quoting rules then.
    runs = retry_locked(c.search_runs)([exp.experiment_id], "attributes.status = 'RUNNING'",
                                       max_results=1000)
    ended = []
    for r in runs:
        tags, run_id = r.data.tags, r.info.run_id
        if (run_id == keep or tags.get("dataset") != dataset or tags.get("arch") != arch
                or tags.get(SEED_TAG, str(seed)) != str(seed)):
            continue
        held_by = tags.get(OWNER_TAG)
        here = held_by is not None and held_by.rsplit(":", 2)[0] == socket.gethostname()
        if held_by is not None and here and owner_gone(held_by):
            pid = held_by.rsplit(":", 2)[1]
            why = (f"left RUNNING by train process {pid} on this host, which was killed "
                   f"before it could end the run; marked KILLED by run {keep}")
        elif run_id == replaced and not here:
            why = (f"left RUNNING by an interrupted train stage whose checkpoint was not "
                   f"resumed (other params, data or code); replaced by run {keep}")
        else:
            continue
        retry_locked(c.set_tag)(run_id, ENDED_TAG, why)
        retry_locked(c.set_terminated)(run_id, "KILLED")
        log.warning("MLflow run %s: %s", run_id, why)
        ended.append(run_id)
    return ended


def fail_pending_models(run_id: str) -> list[str]:
    """Mark FAILED the run's logged models still PENDING (a log_model cut short by a kill);
    return their ids. Their files may be partial: nothing should load them as READY."""
    from mlflow.entities import LoggedModelStatus

    c = client()
    exp_id = retry_locked(c.get_run)(run_id).info.experiment_id
    models = retry_locked(c.search_logged_models)([exp_id], f"source_run_id = '{run_id}'")
    pending = [m.model_id for m in models if m.status == LoggedModelStatus.PENDING]
    for model_id in pending:
        retry_locked(c.finalize_logged_model)(model_id, LoggedModelStatus.FAILED)
    return pending


def start_run(dataset: str, arch: str, seed: int, params: dict[str, Any], tags: dict[str, str]
              ) -> str:
    """Create the run ``{dataset}-{arch}-{seed}`` in the dataset's experiment; return its id.

    Args:
        dataset: Dataset name (selects the experiment ``mnistlab/<dataset>``).
        arch: Architecture name.
        seed: The training seed.
        params: Logged as run params in one batch (values as strings).
        tags: Run tags; ``dataset``, ``arch``, :data:`SEED_TAG`, :data:`GROUP_TAG` and
            :data:`OWNER_TAG` are added.
    """
    from mlflow.entities import Param

    # Each call retried on its own: retrying the whole function after a lock in
    # log_batch would create a second, empty run.
    c = client()
    exp_id = _experiment_id(c, experiment_name(dataset))
    run = retry_locked(c.create_run)(exp_id, run_name=f"{dataset}-{arch}-{seed}",
                                     tags={"dataset": dataset, "arch": arch, SEED_TAG: str(seed),
                                           GROUP_TAG: group_of(dataset, arch, tags), **tags,
                                           OWNER_TAG: owner()})
    retry_locked(c.log_batch)(run.info.run_id, params=[Param(k, str(v)[:6000])
                                                       for k, v in sorted(params.items())])
    return run.info.run_id


@retry_locked
def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """One batched request for a whole dict of metrics at one step."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def log_history(run_id: str, rows: list[dict[str, float]]) -> None:
    """Several epochs' rows (``epoch`` + metrics) in as few requests as MLflow allows.

    MLflow takes at most 1,000 metrics per ``log_batch``; rows are never split
    across requests, so an epoch is either logged whole or not at all.
    """
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    per_row = max(1, len(rows[0]) - 1) if rows else 1
    chunk = max(1, 1000 // per_row)
    c = client()
    for start in range(0, len(rows), chunk):
        metrics = [Metric(k, float(v), ts, int(row["epoch"]))
                   for row in rows[start:start + chunk] for k, v in row.items() if k != "epoch"]
        retry_locked(c.log_batch)(run_id, metrics=metrics)


@retry_locked
def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which ``key`` was logged in ``run_id`` (to fill gaps after a resume)."""
    return {m.step for m in client().get_metric_history(run_id, key)}


@retry_locked
def log_artifacts(run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Copy files (or folders) into the run's artifacts under ``artifact_path``."""
    c = client()
    for p in paths:
        if Path(p).is_dir():
            c.log_artifacts(run_id, str(p), artifact_path)
        else:
            c.log_artifact(run_id, str(p), artifact_path)


@retry_locked
def log_table(run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """``rows`` as the run's table ``artifact_file`` (``dir/name.json``), replacing an earlier one.

    The file and tag are those of ``MlflowClient.log_table`` (pandas' ``split`` JSON, and the
    ``mlflow.loggedArtifacts`` entry that lists it in the UI's table views; ``mlflow.load_table``
    reads it across runs). Not log_table itself: it *appends* to a table of the same name,
    so an evaluate stage re-run into its training run (run.json) would double every row.
    """
    import json
    import posixpath
    import tempfile

    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    c = client()
    folder, name = posixpath.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        pd.DataFrame(rows).to_json(local, orient="split", index=False)
        c.log_artifact(run_id, str(local), folder or None)  # same path: overwritten
    listed = json.loads(c.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in listed:
        c.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*listed, entry]))


@retry_locked
def set_terminated(run_id: str, status: str = "FINISHED") -> None:
    """End the run with ``status`` (FINISHED, FAILED or KILLED)."""
    client().set_terminated(run_id, status)


def model_requirements() -> list[str]:
    """Exact pins of what loading the logged model needs (torch, mlflow, numpy).

    Why explicit: without ``pip_requirements`` MLflow infers them by importing
    the model in a subprocess, which took 6-10 s per model here (0.3 s with).
    """
    import mlflow
    import numpy
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={numpy.__version__}"]


@retry_locked
def log_pytorch_model(run_id: str, model, example, log_model: Callable[..., Any] | None = None
                      ) -> None:
    """Log ``model`` as the run's ``model`` (mlflow.pytorch's pt2 format, batch dimension dynamic).

    Args:
        run_id: The run to log into.
        model: The trained network; a CPU copy in eval mode is logged, ``model`` is untouched.
        example: A small numpy batch [B,1,28,28] float32, B >= 2 (``torch.export`` fixes a
            batch of 1 as a constant); the input example and the source of the signature.
        log_model: What logs the copy inside the run, ``log_model(model, example,
            pip_requirements)``, instead of a plain ``mlflow.pytorch.log_model`` (whose
            example is normalised as in training). The train stage passes
            :func:`mnistlab.serving.log_model`: raw-pixel example, and a pyfunc flavor that
            answers ``mlflow models serve`` with class names and probabilities.
    """
    import copy

    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = copy.deepcopy(model).cpu().eval()
    with fluent_uri(tracking_uri()), mlflow.start_run(run_id=run_id), _no_requirement_scan():
        if log_model is not None:
            log_model(model, example, model_requirements())
            return
        with torch.inference_mode():
            out = model(torch.from_numpy(example)).numpy()
        mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example, out),
                                 input_example=example, pip_requirements=model_requirements())


@contextlib.contextmanager
def _no_requirement_scan() -> Iterator[None]:
    """Skip MLflow's checks, while logging a model, that this environment meets its requirements.

    Why: :func:`model_requirements` pins the running interpreter's own versions, so the
    checks can only pass, and to make them MLflow maps every installed distribution to its
    modules (``importlib_metadata.packages_distributions``, reading each one's file list):
    3.9 s of a train stage under cProfile on a 2-core CPU. ``Model.log`` checks twice: when it writes
    the environment files (``mlflow.utils.environment``), and when it reloads the model to
    validate the input example (``mlflow.pyfunc.load_model``). Where MLflow has no such
    check, nothing is skipped.
    """
    import mlflow.pyfunc
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    saved = [(m, getattr(m, name)) for m in (environment, mlflow.pyfunc) if hasattr(m, name)]
    for module, _ in saved:
        setattr(module, name, lambda requirements: None)
    try:
        yield
    finally:
        for module, check in saved:
            setattr(module, name, check)


def load_pyfunc(uri: str):
    """A logged or registered model (``models:/<name>@<alias>``, ``runs:/<id>/model``) as an
    MLflow pyfunc, from the store of :func:`tracking_uri` (registry included).

    Raises:
        MnistlabError: The server does not answer, or the URI does not resolve or load
            (one line naming the URI and the redacted store).
    """
    import mlflow.pyfunc

    store = tracking_uri()
    check_reachable(store)
    db = sqlite_file(store)
    if db and not Path(db).is_file():
        # MLflow would create an empty store there to look the model up in (from any folder
        # the command runs in): nothing can be found in it, and it stays behind.
        raise MnistlabError(f"{uri}: no MLflow store at {Path(db).absolute()} (the default is "
                            f"mlflow.db where the command runs: run it from the project's folder, "
                            f"or set MLFLOW_TRACKING_URI)")
    try:
        with fluent_uri(store):
            return mlflow.pyfunc.load_model(uri, suppress_warnings=True)
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "not loadable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(store, redact(store))
        raise MnistlabError(f"{uri}: cannot load it from MLflow store {redact(store)} ({first}); "
                            f"expected models:/<name>@<alias>, models:/<name>/<version> or "
                            f"runs:/<run id>/model") from None


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block, then restore exactly what was there.

    Why: ``mlflow.pytorch.log_model`` only works through the process-global tracking
    URI, and ``mlflow.set_tracking_uri`` also rewrites ``$MLFLOW_TRACKING_URI``.
    Leaving either changed would silently send later runs in the same process
    (a test suite, a notebook) to this store, whatever their environment says.
    """
    import mlflow

    # Private, but the only place MLflow keeps the global; restoring it via the public
    # setter would also unset or overwrite the environment variable.
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    saved_global = mlflow_tracking_utils._tracking_uri
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    _no_url_printing(uri)
    _fail_fast()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env

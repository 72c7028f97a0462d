"""Faults a real run meets: ``kill -9`` mid-training, after the last epoch and
mid-download, SIGTERM mid-training, a failed ``dvc repro`` that deleted the stage's
outputs, two experiments writing one MLflow sqlite store at once.

All of them drive real processes (``dvc repro``, the stage scripts). Most kill them
with SIGKILL, the one signal nothing can catch or clean up after: whatever state a
rerun finds is exactly what a power cut would leave.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from helpers.checks import assert_one_line_error
from helpers.data import dataset_files, gz, md5, tree_digest
from helpers.mlflow import free_port, train_workspace
from helpers.repo import (
    ROOT,
    committed_params,
    edit_params,
    make_repo,
    no_step_floor,
    run,
    stage_env,
)

from mnistlab import tracking
from mnistlab.checkpoint import kept_copy
from mnistlab.data.digits import write_digits
from mnistlab.data.sources import DIGIT_CLASSES
from mnistlab.data.split import split as split_dataset
from mnistlab.utils import torch_load


def timing(key: str) -> bool:
    """Wall-clock fields (epoch_seconds, train_seconds, tracking_seconds, images per second):
    the only ones a resumed run may not reproduce."""
    return key.endswith(("_seconds", "_per_second"))

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


def start_killable(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in its own session (= process group), so one killpg reaches its children."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the whole group and wait until none of it is left (bounded)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {proc.pid} survived SIGKILL")


# --------------------------------------------------------------------------- kill -9 while training


ARCH, EPOCHS = "cnn_4_8", 5  # dropout: the resume must restore the RNG state, too
SEED = 1234  # the one training seed
TRAIN = f"train@digits-{ARCH}-{SEED}"


def _history(path: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if not timing(k)} for row in csv.DictReader(path.open())]


def _summary(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not timing(k)}


@pytest.mark.slow
def test_kill9_mid_training_then_repro_resumes_bit_identical(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    whole = make_repo(tmp_path / "whole")

    def small(p: dict) -> None:
        p["datasets"], p["archs"], p["seeds"] = ["digits"], [ARCH], [SEED]
        no_step_floor(p)
        p["hparams"][ARCH]["epochs"] = EPOCHS

    edit_params(whole, small)
    run(["dvc", "repro", "split@digits"], whole)
    cut = tmp_path / "cut"  # the same repo, data and dvc.lock, for the interrupted run
    shutil.copytree(whole, cut, symlinks=True)

    # The reference: an uninterrupted run.
    run(["dvc", "repro", TRAIN], whole)

    # The same stage, killed with SIGKILL (dvc and the stage script) mid-epoch, right
    # after a checkpoint exists.
    ckpt = cut / "checkpoints" / "digits" / ARCH / f"seed-{SEED}" / "last.pt"
    proc = start_killable(["dvc", "repro", TRAIN], cut, tmp_path / "killed.log", stage_env(cut))
    try:
        deadline = time.monotonic() + 300
        while not ckpt.is_file():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        kill9(proc)
    assert proc.returncode == -signal.SIGKILL
    # What the kill left (a later epoch may have landed): the copy kept beside the DVC output
    # is written first, so it may be one checkpoint ahead, and then the rerun resumes from it.
    done = max(checkpoint_epoch(ckpt), checkpoint_epoch(kept_copy(ckpt)))
    assert 1 <= done < EPOCHS, f"killed too late to test a resume (epoch {done} of {EPOCHS})"
    assert not (cut / "models" / "digits" / ARCH / f"seed-{SEED}" / "model.pt").exists()

    rerun = run(["dvc", "repro", TRAIN], cut)
    log = rerun.stdout + rerun.stderr
    assert f"Running stage '{TRAIN}'" in log
    assert f"resuming from checkpoints/digits/{ARCH}/seed-{SEED}/last.pt after epoch {done}/{EPOCHS}" in log, log

    # Bit-identical to the uninterrupted run: metrics (timing aside) and every weight.
    key = f"digits/{ARCH}/seed-{SEED}"  # the run's folder (mnistlab.config.run_key)
    for repo in (whole, cut):
        assert (repo / "metrics" / key / "train.json").is_file()
    m_whole, m_cut = whole / "metrics" / key, cut / "metrics" / key
    assert _summary(m_cut / "train.json") == _summary(m_whole / "train.json")
    assert _history(m_cut / "history.csv") == _history(m_whole / "history.csv")
    assert len(_history(m_cut / "history.csv")) == EPOCHS
    for name in ("model.pt", "best.pt"):
        a = torch_load(whole / "models" / key / name)
        b = torch_load(cut / "models" / key / name)
        assert a.keys() == b.keys() and a["state_dict"].keys() == b["state_dict"].keys()
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{name}: {k} differs"
        assert {k: v for k, v in a.items() if k != "state_dict"} == \
               {k: v for k, v in b.items() if k != "state_dict"}

    # One MLflow run, resumed in place: finished, every epoch logged exactly once.
    client = MlflowClient(f"sqlite:///{cut / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mnistlab/digits").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == json.loads((cut / "models" / key / "run.json").read_text())["run_id"]
    assert runs[0].info.run_name == f"digits-{ARCH}-{SEED}" and runs[0].data.tags["seed"] == str(SEED)
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_accuracy"))
    assert steps == list(range(1, EPOCHS + 1))


# --------------------------------------------------------------------------- SIGTERM, kill -9 after the last epoch

# The train stage of helpers.mlflow.train_workspace (mlp on digits, training seed 1234, run as
# dvc.yaml runs it)
CKPT = Path("checkpoints/digits/mlp/seed-1234/last.pt")
MODEL_DIR = Path("models/digits/mlp/seed-1234")


def pinned_env(work: Path) -> dict[str, str]:
    """The stage environment with one torch thread: CPU weights are bit-identical only at
    one thread count, and two runs compared must not depend on what else is running."""
    return {**stage_env(work), "OMP_NUM_THREADS": "1", "MNISTLAB_THREADS": "1"}


def start_stage(cmd: list[str], work: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start a stage script in its own process group, stdout and stderr to two files."""
    out, err = work.parent / f"{name}.out", work.parent / f"{name}.err"
    proc = subprocess.Popen(cmd, cwd=work, env=pinned_env(work), stdout=out.open("w"),
                            stderr=err.open("w"), start_new_session=True)
    return proc, out, err


def wait_for(cond, proc: subprocess.Popen, err: Path, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n{err.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{err.read_text()}"
        time.sleep(0.02)


def checkpoint_epoch(path: Path) -> int:
    """The epoch of the checkpoint at ``path``; 0 if there is none yet."""
    return torch_load(path)["epoch"] if path.is_file() else 0


def rerun_stage(cmd: list[str], work: Path) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=work, env=pinned_env(work), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return p


def runs_in(work: Path, dataset: str = "digits") -> tuple:
    """(client, every run of the dataset's experiment) in ``work``'s own store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name(tracking.experiment_name(dataset))
    return client, client.search_runs([exp.experiment_id])


def assert_one_finished_run(work: Path, run_id: str) -> list:
    """``run_id`` is the one FINISHED run of digits x mlp, none is RUNNING, run.json names it;
    returns every run of the experiment."""
    _, runs = runs_in(work)
    status = {r.info.run_id: r.info.status for r in runs}
    assert [i for i, s in status.items() if s == "FINISHED"] == [run_id], status
    assert "RUNNING" not in status.values(), status
    assert json.loads((work / MODEL_DIR / "run.json").read_text())["run_id"] == run_id
    return runs


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch_load(path)["state_dict"]


def test_a_stop_signal_is_one_error_line_and_exit_128_plus_its_number(capsys):
    """Any stage: SIGTERM raises (so clean-ups run) and ends as ``error: stopped by SIGTERM``,
    exit 143 as a shell reports it; the process's own handlers are put back afterwards."""
    from mnistlab.errors import run_stage

    before = signal.getsignal(signal.SIGTERM)
    cleaned = []

    def main() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # never reached: the handler raises at once
        finally:
            cleaned.append(True)

    with pytest.raises(SystemExit) as e:
        run_stage(main)
    assert e.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert capsys.readouterr().err.splitlines()[-1] == "error: stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_mid_training_is_one_line_a_killed_run_and_a_bit_identical_resume(tmp_path: Path):
    """SIGTERM (a CI timeout, docker stop, a scheduler): one error line naming what to rerun,
    exit 143, the MLflow run KILLED (not RUNNING forever); the rerun resumes in that run
    and ends with the weights of a run that was never stopped."""
    epochs = 40  # ~0.1-0.2 s each: the signal lands well inside training
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    cmd = train_workspace(cut, epochs)
    train_workspace(whole, epochs)

    proc, out, err = start_stage(cmd, cut, "stopped")
    try:
        wait_for(lambda: (cut / CKPT).is_file(), proc, err, "checkpoint")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill9(proc)
    stopped = subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())
    assert_one_line_error(stopped, "stopped by SIGTERM during train@digits-mlp-1234",
                          f"rerun `dvc repro` or `dvc exp run` to resume from {CKPT}",
                          code=128 + signal.SIGTERM)
    # The copy a rerun `dvc exp run` resumes from (test_tracking) is written first: a stop
    # between the two files leaves it one checkpoint ahead, and the rerun resumes from it.
    kept = kept_copy(cut / CKPT)
    done = checkpoint_epoch(kept)
    assert checkpoint_epoch(cut / CKPT) in (done, done - 1)
    assert 1 <= done < epochs, f"stopped too late to test a resume (epoch {done} of {epochs})"
    run_id = torch_load(cut / CKPT)["run_id"]
    client, runs = runs_in(cut)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "KILLED")]
    assert not (cut / MODEL_DIR / "run.json").exists()

    rerun = rerun_stage(cmd, cut)
    assert f"resuming from {CKPT} after epoch {done}/{epochs}" in rerun.stderr, rerun.stderr
    assert not kept.exists()  # finished: the checkpoint DVC records is the one to resume
    assert_one_finished_run(cut, run_id)
    assert len(runs_in(cut)[1]) == 1
    steps = {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    assert steps == set(range(1, epochs + 1))

    rerun_stage(cmd, whole)  # the reference: never stopped
    for name in ("model.pt", "best.pt"):
        a, b = weights(whole / MODEL_DIR / name), weights(cut / MODEL_DIR / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
    assert _history(cut / "metrics/digits/mlp/seed-1234/history.csv") == \
        _history(whole / "metrics/digits/mlp/seed-1234/history.csv")


@pytest.mark.slow
def test_kill9_after_the_last_epoch_then_rerun_leaves_one_finished_run(tmp_path: Path):
    """kill -9 once the last epoch's checkpoint is written (while the models are saved and
    logged: the ~4 s before the run ends). The rerun reuses the finished checkpoint *and its
    run*: one FINISHED run, none RUNNING, no logged model left PENDING. A run that another
    killed process left RUNNING (its process gone) is marked KILLED, with the reason."""
    from mlflow.entities import LoggedModelStatus

    epochs = 3
    work = tmp_path / "work"
    cmd = train_workspace(work, epochs)
    proc, _, err = start_stage(cmd, work, "killed")
    try:
        wait_for(lambda: checkpoint_epoch(work / CKPT) == epochs, proc, err, "last checkpoint")
    finally:
        kill9(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (work / MODEL_DIR / "run.json").exists(), "killed too late: the run had ended"
    run_id = torch_load(work / CKPT)["run_id"]
    client, runs = runs_in(work)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "RUNNING")]

    # Another leftover: a process that opened a run of digits x mlp x seed 1234 and died without
    # ending it.
    subprocess.run([sys.executable, "-c", "import os; from mnistlab import tracking; "
                    "tracking.start_run('digits', 'mlp', 1234, {}, {}); os._exit(9)"],
                   cwd=work, env=pinned_env(work), capture_output=True, timeout=300)
    orphan = [r.info.run_id for r in runs_in(work)[1] if r.info.run_id != run_id]
    assert len(orphan) == 1

    rerun = rerun_stage(cmd, work)
    assert "is a finished run with these exact params, data and code; reusing it" in rerun.stderr
    runs = assert_one_finished_run(work, run_id)
    assert len(runs) == 2
    ended = client.get_run(orphan[0])
    assert ended.info.status == "KILLED"
    assert "killed" in ended.data.tags[tracking.ENDED_TAG]
    assert run_id in ended.data.tags[tracking.ENDED_TAG]
    models = client.search_logged_models([ended.info.experiment_id],
                                         f"source_run_id = '{run_id}'")
    assert LoggedModelStatus.READY in {m.status for m in models}
    assert LoggedModelStatus.PENDING not in {m.status for m in models}
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val_accuracy"))
    assert steps == list(range(1, epochs + 1))


# --------------------------------------------------------------------------- outputs deleted by dvc repro


@pytest.mark.slow
def test_outputs_a_failed_repro_deleted_come_back_from_the_checkpoint(tmp_path: Path):
    """``dvc repro`` deletes a stage's outputs (all but ``persist``) before its command runs;
    a command that then fails leaves them gone. The git-tracked metrics are persist, so they
    stay as they were; the rerun rebuilds the model folder from the finished checkpoint
    (persist: kept): nothing retrained, the same MLflow run, byte-identical files, train.json
    included (its thread count and logging seconds are the training's, from the checkpoint)."""
    repo = make_repo(tmp_path / "repo")
    stage = "train@digits-mlp-1234"

    def small(p: dict) -> None:
        p["datasets"], p["archs"], p["seeds"] = ["digits"], ["mlp"], [1234]
        no_step_floor(p)
        p["hparams"]["mlp"]["epochs"] = 3

    edit_params(repo, small)
    env = pinned_env(repo)
    run(["dvc", "repro", stage], repo, env=env)
    metrics = repo / "metrics" / "digits" / "mlp" / "seed-1234"
    before = {name: (repo / MODEL_DIR / name).read_bytes() for name in ("model.pt", "best.pt",
                                                                         "run.json")}
    ckpt_bytes = (repo / CKPT).read_bytes()
    summary, history = _summary(metrics / "train.json"), _history(metrics / "history.csv")
    seconds = json.loads((metrics / "train.json").read_text())["train_seconds"]
    tracked = {name: (metrics / name).read_bytes() for name in ("train.json", "history.csv")}
    run_id = json.loads(before["run.json"])["run_id"]

    # A change DVC re-runs the stage for (eval_batch_size is not in the checkpoint's
    # fingerprint), with the tracking server down: the command fails.
    edit_params(repo, lambda p: p["train"].__setitem__("eval_batch_size", 100))
    down = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    failed = run(["dvc", "repro", stage], repo, check=False, env=down)
    assert failed.returncode != 0 and "unreachable" in failed.stdout + failed.stderr
    # What DVC removed before running it: the model folder; the metrics files are persist.
    assert not (repo / MODEL_DIR).exists()
    assert {name: (metrics / name).read_bytes() for name in tracked} == tracked
    assert (repo / CKPT).read_bytes() == ckpt_bytes  # persist: kept

    again = run(["dvc", "repro", stage], repo, env=env)
    log = again.stdout + again.stderr
    assert "reusing it" in log and "resuming" not in log, log
    for name, blob in before.items():
        assert (repo / MODEL_DIR / name).read_bytes() == blob, name
    assert _summary(metrics / "train.json") == summary
    # train_seconds sums the checkpoint's epochs: the same to the bit, so nothing was retrained
    assert json.loads((metrics / "train.json").read_text())["train_seconds"] == seconds
    assert _history(metrics / "history.csv") == history
    assert {name: (metrics / name).read_bytes() for name in tracked} == tracked
    assert (repo / CKPT).read_bytes() == ckpt_bytes
    _, runs = runs_in(repo)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]


# --------------------------------------------------------------------------- kill -9 while downloading


class SlowMirror:
    """Serves ``/<mirror>/<name>`` on 127.0.0.1; ``slow`` trickles 4 KiB every 50 ms and
    sets ``halfway`` once half of some file has gone out."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.slow = False
        self.halfway = threading.Event()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not mirror.slow:
                    self.wfile.write(body)
                    return
                for start in range(0, len(body), 4096):
                    self.wfile.write(body[start:start + 4096])
                    self.wfile.flush()
                    if start >= len(body) // 2:
                        mirror.halfway.set()
                    time.sleep(0.05)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # the killed client hung up
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def url(self, mirror: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{mirror}/"


@pytest.fixture
def slow_mirror() -> Iterator[SlowMirror]:
    m = SlowMirror()
    m.thread.start()
    try:
        yield m
    finally:
        m.server.shutdown()
        m.server.server_close()
        m.thread.join(timeout=10)


@pytest.mark.slow
def test_kill9_mid_download_never_leaves_a_partial_file(slow_mirror: SlowMirror, tmp_path: Path):
    def publish(mirror: str, seed: int) -> dict[str, bytes]:
        files = dataset_files(n_train=600, n_test=100, seed=seed)  # ~470 KB: ~6 s when slow
        for name, blob in files.items():
            slow_mirror.files[f"/{mirror}/{name}.gz"] = gz(blob)
        return files

    def write_params(mirror: str, files: dict[str, bytes] | None = None) -> None:
        spec: dict = {"mirrors": [slow_mirror.url(mirror)]}
        if files:
            spec["md5"] = {f"{n}.gz": md5(gz(b)) for n, b in files.items()}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(
            {"sources": {"web": spec}, "download": {"timeout": 10, "retries": 2, "backoff": 0}}))

    cmd = [sys.executable, str(ROOT / "stages" / "download.py"), "--dataset", "web",
           "--out", "data/raw/web"]  # as dvc.yaml's download stage runs it
    raw = tmp_path / "data" / "raw"

    # v1 downloaded and verified earlier.
    publish("v1", seed=0)
    write_params("v1")
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    earlier = tree_digest(raw / "web")

    # The mirror moves to v2 (new files, MD5s pinned); the download is killed mid-file.
    v2 = publish("v2", seed=1)
    write_params("v2", v2)
    slow_mirror.slow = True
    proc = start_killable(cmd, tmp_path, tmp_path / "killed.log", dict(os.environ))
    try:
        assert slow_mirror.halfway.wait(timeout=300), (tmp_path / "killed.log").read_text()
        assert proc.poll() is None
    finally:
        kill9(proc)
    # The earlier download is untouched; the cut-short file exists only in the hidden
    # staging folder, which no stage reads.
    assert tree_digest(raw / "web") == earlier
    leftovers = [p.name for p in raw.iterdir() if p.name != "web"]
    assert leftovers and all(n.startswith(".web.") and n.endswith(".partial") for n in leftovers)

    # The rerun (the mirror fast again) completes, verifies every file and clears the staging.
    slow_mirror.slow = False
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "web: train 600, test 100 samples verified in data/raw/web" in p.stdout
    assert sorted(p.name for p in raw.iterdir()) == ["web"]
    manifest = json.loads((raw / "web" / "manifest.json").read_text())["files"]
    assert {n: e["verified"] for n, e in manifest.items()} == {n: "md5" for n in v2}
    for name, blob in v2.items():
        assert (raw / "web" / name).read_bytes() == blob, name


# --------------------------------------------------------------------------- two runs, one sqlite store


@pytest.mark.slow
def test_two_experiments_at_once_on_one_sqlite_store(tmp_path: Path):
    """Two train stages (two archs, two working copies) start together on one fresh
    ``sqlite:///.../mlflow.db``: both create the schema and the experiment, and log every
    epoch, at the same time. Both runs must arrive whole, without "database is locked"."""
    from mlflow.tracking import MlflowClient

    split = tmp_path / "split"
    write_digits(tmp_path / "raw")
    split_dataset(tmp_path / "raw", split, list(DIGIT_CLASSES), 0.1, 0.2, 1234, "digits")
    params = committed_params()
    no_step_floor(params)
    epochs = {"mlp": 12, "cnn_4_8": 4}
    for arch, n in epochs.items():
        params["hparams"][arch]["epochs"] = n

    store = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    procs = {}
    for arch in epochs:
        work = tmp_path / arch
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [sys.executable, str(ROOT / "stages" / "train.py"), "--dataset", "digits", "--arch", arch,
               "--seed", "1234", "--split", str(split), "--model-dir", "models", "--metrics-dir", "metrics",
               "--checkpoint", "checkpoints/last.pt"]
        env = {**stage_env(work), "MLFLOW_TRACKING_URI": store}
        procs[arch] = start_killable(cmd, work, tmp_path / f"{arch}.log", env)
    try:
        for proc in procs.values():
            proc.wait(timeout=600)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                kill9(proc)
    for arch, proc in procs.items():
        log = (tmp_path / f"{arch}.log").read_text()
        assert proc.returncode == 0, log
        assert "database is locked" not in log and "Traceback" not in log, log

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("mnistlab/digits")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {f"digits-{arch}-1234" for arch in epochs}
    for arch, n in epochs.items():
        r = runs[f"digits-{arch}-1234"]
        assert r.info.status == "FINISHED"
        assert r.info.run_id == json.loads((tmp_path / arch / "models" / "run.json").read_text())["run_id"]
        assert r.data.params["arch"] == arch and r.data.params["epochs"] == str(n)
        assert r.data.params["lr"] == str(params["hparams"][arch]["lr"])
        for name in EPOCH_METRICS:
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, name)) == \
                   list(range(1, n + 1)), (arch, name)
        assert r.data.metrics["final_epochs"] == n
        assert {a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")} == {
            "checkpoints/model.pt", "checkpoints/best.pt", "checkpoints/history.csv"}
        assert r.outputs.model_outputs, f"{arch}: no logged model"


def test_queued_experiments_track_into_the_repo_not_their_temp_copy(tmp_path: Path, monkeypatch):
    """``dvc exp run --queue`` / ``--temp`` run the stages in ``<repo>/.dvc/tmp/exps/<tmp>/``,
    deleted afterwards: the default store must be the repo's mlflow.db, or every queued
    experiment's run is lost with its copy."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    for work in (repo / ".dvc/tmp/exps/tmpa1b2c3", repo / ".dvc/tmp/exps/standalone/tmpd4e5f6"):
        work.mkdir(parents=True)
        monkeypatch.chdir(work)
        assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"
    monkeypatch.chdir(repo)
    assert tracking.tracking_uri() == "sqlite:///mlflow.db"  # the repo itself: as before
    monkeypatch.chdir(repo / ".dvc/tmp/exps/tmpa1b2c3")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"  # an explicit store always wins

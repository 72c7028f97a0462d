"""Faults a real run meets: ``kill -9`` mid-training and mid-download, two experiments
writing one MLflow sqlite store at once.

All of them drive real processes (``dvc repro``, the stage scripts) and kill them
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
from helpers.data import dataset_files, gz, md5, tree_digest
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
TRAIN = f"train@digits-{ARCH}"


def _history(path: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if not timing(k)} for row in csv.DictReader(path.open())]


def _summary(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not timing(k)}


@pytest.mark.slow
def test_kill9_mid_training_then_repro_resumes_bit_identical(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    whole = make_repo(tmp_path / "whole")

    def small(p: dict) -> None:
        p["datasets"], p["archs"] = ["digits"], [ARCH]
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
    ckpt = cut / "checkpoints" / "digits" / ARCH / "last.pt"
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
    done = torch_load(ckpt)["epoch"]  # what the kill left (a later epoch may have landed)
    assert 1 <= done < EPOCHS, f"killed too late to test a resume (epoch {done} of {EPOCHS})"
    assert not (cut / "models" / "digits" / ARCH / "model.pt").exists()

    rerun = run(["dvc", "repro", TRAIN], cut)
    log = rerun.stdout + rerun.stderr
    assert f"Running stage '{TRAIN}'" in log
    assert f"resuming from checkpoints/digits/{ARCH}/last.pt after epoch {done}/{EPOCHS}" in log, log

    # Bit-identical to the uninterrupted run: metrics (timing aside) and every weight.
    for repo in (whole, cut):
        assert (repo / "metrics" / "digits" / ARCH / "train.json").is_file()
    m_whole, m_cut = whole / "metrics" / "digits" / ARCH, cut / "metrics" / "digits" / ARCH
    assert _summary(m_cut / "train.json") == _summary(m_whole / "train.json")
    assert _history(m_cut / "history.csv") == _history(m_whole / "history.csv")
    assert len(_history(m_cut / "history.csv")) == EPOCHS
    for name in ("model.pt", "best.pt"):
        a = torch_load(whole / "models" / "digits" / ARCH / name)
        b = torch_load(cut / "models" / "digits" / ARCH / name)
        assert a.keys() == b.keys() and a["state_dict"].keys() == b["state_dict"].keys()
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{name}: {k} differs"
        assert {k: v for k, v in a.items() if k != "state_dict"} == \
               {k: v for k, v in b.items() if k != "state_dict"}

    # One MLflow run, resumed in place: finished, every epoch logged exactly once.
    client = MlflowClient(f"sqlite:///{cut / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mnistlab/digits").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == json.loads((cut / "models/digits" / ARCH / "run.json").read_text())["run_id"]
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_accuracy"))
    assert steps == list(range(1, EPOCHS + 1))


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
               "--split", str(split), "--model-dir", "models", "--metrics-dir", "metrics",
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
    assert set(runs) == {f"digits-{arch}" for arch in epochs}
    for arch, n in epochs.items():
        r = runs[f"digits-{arch}"]
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

"""A real ``mlflow server`` on 127.0.0.1 (sqlite backend, a local artifacts folder), started
by the tests: the train stage logs to it through ``MLFLOW_TRACKING_URI``, and everything
is read back through the server's REST API, as another machine would.

One server is shared by this module and test_security (started on first use, stopped
at the end of the session, whatever happens); the server-down test kills one of its own.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, VENV_BIN, stage_env
from test_data import assert_one_line_error

from mnistlab import data

pytestmark = pytest.mark.slow

EPOCHS = 2
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` bound to 127.0.0.1 on a free port, in its own process group."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = root / "server.db"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    def start(self, timeout: float = 180) -> None:
        """Start it and wait (bounded) until ``/health`` answers; record how long that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.artifacts)]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"mlflow server not healthy after {timeout} s:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.start_seconds = time.monotonic() - t0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its workers (SIGKILL if SIGTERM is not enough in 20 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for s, wait in ((sig, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.proc.pid, s)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    # ------------------------------------------------------------------ REST

    def get(self, endpoint: str, /, **query: Any) -> dict:
        url = f"{self.url}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())

    def post(self, endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.url}{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def raw(self, endpoint: str, /, **query: Any) -> bytes:
        url = f"{self.url}{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read()


_SHARED: dict[str, MlflowServer] = {}


def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MlflowServer:
    """The session's one server (started on first use; stopped when the session ends)."""
    if "server" not in _SHARED:
        server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
        request.config.add_cleanup(server.stop)  # before start: a failed start is cleaned up too
        request.config.add_cleanup(lambda: _SHARED.clear())
        server.start()
        _SHARED["server"] = server
        print(f"\nmlflow server healthy after {server.start_seconds:.1f} s", file=sys.stderr)
    return _SHARED["server"]


@pytest.fixture
def server(request, tmp_path_factory) -> MlflowServer:
    return shared_server(request, tmp_path_factory)


def train_workspace(work: Path, epochs: int = EPOCHS) -> list[str]:
    """A folder with the digits split and a small params.yaml; returns the train command
    (the arguments dvc.yaml passes, paths relative to the folder)."""
    work.mkdir(parents=True, exist_ok=True)
    data.write_digits(work / "data" / "raw" / "digits")
    data.split(work / "data" / "raw" / "digits", work / "data" / "split" / "digits",
               list(data.DIGIT_CLASSES), 0.1, 0.2, 1234, "digits")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["min_steps"] = 0
    params["hparams"]["mlp"]["epochs"] = epochs
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return [sys.executable, str(ROOT / "stages" / "train.py"), "--dataset", "digits", "--arch", "mlp",
            "--split", "data/split/digits", "--model-dir", "models/digits/mlp",
            "--metrics-dir", "metrics/digits/mlp", "--checkpoint", "checkpoints/digits/mlp/last.pt"]


def run_train(work: Path, cmd: list[str], uri: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**stage_env(work), "MLFLOW_TRACKING_URI": uri, **env}
    return subprocess.run(cmd, cwd=work, env=full_env, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- the tests


def test_train_stage_logs_to_the_server_and_reads_back_over_rest(server: MlflowServer, tmp_path: Path,
                                                                record_property):
    record_property("mlflow_server_start_seconds", round(server.start_seconds, 2))
    assert server.start_seconds < 180
    work = tmp_path / "work"
    p = run_train(work, train_workspace(work), server.url)
    assert p.returncode == 0, p.stderr
    run_json = json.loads((work / "models/digits/mlp/run.json").read_text())
    assert run_json["tracking_uri"] == server.url

    api = "/api/2.0/mlflow"
    exp = server.get(f"{api}/experiments/get-by-name", experiment_name="mnistlab/digits")["experiment"]
    found = server.post(f"{api}/runs/search", {
        "experiment_ids": [exp["experiment_id"]],
        "filter": f"attributes.run_id = '{run_json['run_id']}'"})["runs"]
    assert len(found) == 1
    run = found[0]
    assert run["info"]["run_name"] == "digits-mlp" and run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["arch"] == "mlp" and params["lr"] == "0.001" and params["epochs"] == str(EPOCHS)
    assert params["seed"] == "1234" and params["device"] == "cpu"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["dataset"] == "digits" and tags["dvc_stage"] == "train@digits-mlp"

    # Every epoch's metrics, equal to the stage's history.csv.
    history = list(csv.DictReader((work / "metrics/digits/mlp/history.csv").open()))
    for name in EPOCH_METRICS:
        points = sorted(server.get(f"{api}/metrics/get-history", run_id=run_json["run_id"],
                                   metric_key=name)["metrics"], key=lambda m: m["step"])
        assert [m["step"] for m in points] == list(range(1, EPOCHS + 1)), name
        for m, row in zip(points, history, strict=True):
            assert m["value"] == pytest.approx(float(row[name]), rel=1e-5), name

    # The artifacts: listed, and model.pt downloaded byte-identical to the stage's output.
    listed = server.get(f"{api}/artifacts/list", run_id=run_json["run_id"], path="checkpoints")
    assert {f["path"] for f in listed["files"]} == {
        "checkpoints/model.pt", "checkpoints/best.pt", "checkpoints/history.csv"}
    blob = server.raw("/get-artifact", path="checkpoints/model.pt", run_uuid=run_json["run_id"])
    assert blob == (work / "models/digits/mlp/model.pt").read_bytes()
    assert any(server.artifacts.rglob("model.pt")), "artifacts not in --artifacts-destination"

    # The mlflow.pytorch model: a logged model of this run, ready, with its MLmodel.
    (output,) = run["outputs"]["model_outputs"]
    model = server.get(f"{api}/logged-models/{output['model_id']}")["model"]["info"]
    assert model["source_run_id"] == run_json["run_id"] and model["status"] == "LOGGED_MODEL_READY"
    loc = urllib.parse.urlsplit(model["artifact_uri"])  # mlflow-artifacts:/<exp>/models/<id>/artifacts
    files = server.get("/api/2.0/mlflow-artifacts/artifacts", path=loc.path.lstrip("/"))["files"]
    assert {"MLmodel", "requirements.txt"} <= {f["path"] for f in files}
    mlmodel = yaml.safe_load(server.raw(f"/api/2.0/mlflow-artifacts/artifacts{loc.path}/MLmodel"))
    assert "pytorch" in mlmodel["flavors"] and mlmodel["signature"]["inputs"]


def test_server_down_is_one_line_before_training_and_wastes_nothing(tmp_path: Path):
    """A real server, killed (SIGKILL, as a crash would): the stage must say so in one
    line, quickly, before any compute, and leave no checkpoint or model behind."""
    dead = MlflowServer(tmp_path / "server")
    try:
        dead.start()
    finally:
        dead.stop(signal.SIGKILL)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{dead.url}/health", timeout=5)

    work = tmp_path / "work"
    cmd = train_workspace(work)
    t0 = time.monotonic()
    p = run_train(work, cmd, dead.url)
    assert time.monotonic() - t0 < 60  # MLflow's own client would retry for minutes
    assert_one_line_error(p, f"MLflow tracking server {dead.url} unreachable")
    for out in ("checkpoints", "models", "metrics"):
        assert not (work / out).exists(), f"{out}/ written although nothing could be tracked"

"""A real ``mlflow server`` on 127.0.0.1 (sqlite backend, a local artifacts folder), started
by the tests: the train stage logs to it through ``MLFLOW_TRACKING_URI``, and everything
is read back through the server's REST API, as another machine would.

One server is shared by this module and test_security (started on first use, stopped
at the end of the session, whatever happens); the server-down test kills one of its own.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers.checks import assert_one_line_error
from helpers.mlflow import EPOCHS, MlflowServer, run_train, shared_server, train_workspace
from helpers.repo import stage_env

pytestmark = pytest.mark.slow

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


@pytest.fixture
def server(request, tmp_path_factory) -> MlflowServer:
    return shared_server(request, tmp_path_factory)


# --------------------------------------------------------------------------- the tests


def test_train_stage_logs_to_the_server_and_reads_back_over_rest(server: MlflowServer, tmp_path: Path,
                                                                record_property):
    record_property("mlflow_server_start_seconds", round(server.start_seconds, 2))
    assert server.start_seconds < 180
    work = tmp_path / "work"
    p = run_train(work, train_workspace(work), server.url)
    assert p.returncode == 0, p.stderr
    run_json = json.loads((work / "models/digits/mlp/seed-1234/run.json").read_text())
    assert run_json["tracking_uri"] == server.url

    api = "/api/2.0/mlflow"
    exp = server.get(f"{api}/experiments/get-by-name", experiment_name="mnistlab/digits")["experiment"]
    found = server.post(f"{api}/runs/search", {
        "experiment_ids": [exp["experiment_id"]],
        "filter": f"attributes.run_id = '{run_json['run_id']}'"})["runs"]
    assert len(found) == 1
    run = found[0]
    assert run["info"]["run_name"] == "digits-mlp-1234" and run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["arch"] == "mlp" and params["lr"] == "0.001" and params["epochs"] == str(EPOCHS)
    assert params["seed"] == "1234" and params["device"] == "cpu"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["dataset"] == "digits" and tags["dvc_stage"] == "train@digits-mlp-1234"
    assert tags["seed"] == "1234" and tags["group"] == "digits/mlp"

    # Every epoch's metrics, equal to the stage's history.csv.
    history = list(csv.DictReader((work / "metrics/digits/mlp/seed-1234/history.csv").open()))
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
    assert blob == (work / "models/digits/mlp/seed-1234/model.pt").read_bytes()
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


def test_server_killed_mid_training_is_one_redacted_line_soon_and_the_checkpoint_stays(tmp_path: Path):
    """The server dies (SIGKILL) while a train stage logs to it: the stage ends with one line
    naming the store, credentials removed, within seconds (MLflow's own retries took 4-6 min),
    and the epochs already done stay in the checkpoint for a resume (issue #10, class 1)."""
    secret = "TopS3cret"
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        work = tmp_path / "work"
        cmd = train_workspace(work, epochs=3000)  # minutes of mlp epochs: it is still training
        uri = server.url.replace("http://", f"http://bob:{secret}@")
        env = {**stage_env(work), "MLFLOW_TRACKING_URI": uri}
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        checkpoint = work / "checkpoints" / "digits" / "mlp" / "seed-1234" / "last.pt"
        deadline = time.monotonic() + 300
        while not checkpoint.exists():  # an epoch done and logged: training is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.1)
        server.stop(signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=300)
        p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    finally:
        server.stop(signal.SIGKILL)
    assert time.monotonic() - killed < 120, "the stage took minutes to notice the dead server"
    assert_one_line_error(p, f"MLflow tracking store {server.url}")
    assert secret not in out + err
    assert checkpoint.is_file()

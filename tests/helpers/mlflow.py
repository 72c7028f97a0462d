"""MLflow for tests: a run as the train stage opens it, and a real ``mlflow server`` on 127.0.0.1.

The server is shared by the tests that need one (test_mlflow_server, test_security): started
on first use, stopped at the end of the session, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers.repo import ROOT, VENV_BIN, committed_params, no_step_floor, stage_env
from mnistlab import tracking
from mnistlab.config import run_key
from mnistlab.data.digits import write_digits
from mnistlab.data.sources import DIGIT_CLASSES
from mnistlab.data.split import split
from mnistlab.utils import write_json

EPOCHS = 2
SEED = 1234  # the training seed of params.yaml's ``seeds: [1234]``


def open_run(model_dir: Path, dataset: str, arch: str, seed: int = SEED) -> str:
    """An MLflow run in the current store, recorded in ``run.json`` as the train stage does."""
    run_id = tracking.start_run(dataset, arch, seed, {"arch": arch}, {"dvc_stage": "test"})
    write_json(model_dir / "run.json", {"run_id": run_id})
    return run_id


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
        # A tracking server is all the tests need. MLflow 3's job execution (GenAI judges,
        # trace rollups) would start a job runner and three Huey consumers, four more Python
        # processes importing MLflow, at every start.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.artifacts)]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_up(self.proc, f"{self.url}/health", self.log, timeout, poll=0.1)
        self.start_seconds = time.monotonic() - t0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its workers (SIGKILL if SIGTERM is not enough in 20 s).

        Returns once nothing accepts connections on the port: the leader's exit is not
        enough, because a worker killed with it can hold the listening socket a moment
        longer, and a request then is reset instead of refused (a flaky "server down").
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        for s, wait in ((sig, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.proc.pid, s)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return
            time.sleep(0.05)

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


def train_workspace(work: Path, epochs: int = EPOCHS, seed: int = SEED) -> list[str]:
    """A folder with the digits split and a small params.yaml; returns the train command of
    ``train@digits-mlp-<seed>`` (the arguments dvc.yaml passes, paths relative to the folder)."""
    work.mkdir(parents=True, exist_ok=True)
    write_digits(work / "data" / "raw" / "digits")
    split(work / "data" / "raw" / "digits", work / "data" / "split" / "digits",
          list(DIGIT_CLASSES), 0.1, 0.2, 1234, "digits")
    params = committed_params()
    no_step_floor(params)
    params["hparams"]["mlp"]["epochs"] = epochs
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    run = run_key("digits", "mlp", seed)
    return [sys.executable, str(ROOT / "stages" / "train.py"), "--dataset", "digits", "--arch", "mlp",
            "--seed", str(seed), "--split", "data/split/digits", "--model-dir", f"models/{run}",
            "--metrics-dir", f"metrics/{run}", "--checkpoint", f"checkpoints/{run}/last.pt"]


def run_train(work: Path, cmd: list[str], uri: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**stage_env(work), "MLFLOW_TRACKING_URI": uri, **env}
    return subprocess.run(cmd, cwd=work, env=full_env, capture_output=True, text=True, timeout=600)


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float,
                  poll: float = 0.5) -> None:
    """Wait (bounded) until ``url`` answers 200; fail with the server's log if it exits or times out."""
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() - t0 < timeout, f"no answer on {url} after {timeout} s:\n{log.read_text()}"
        time.sleep(poll)

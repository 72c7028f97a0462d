"""``mlflow models serve`` on the registered champion: raw pixels in, class names and probabilities out.

The real command (``--env-manager local``: this venv) on 127.0.0.1 and a free port, in its
own process group, killed whatever happens; its start is waited for within a bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers.champion import CLASSES, canonical_digits, log_champion, train_model, write_split
from helpers.mlflow import free_port, wait_until_up
from helpers.repo import VENV_BIN, stage_env

from mnistlab import artifacts, predict

START_TIMEOUT = 180  # seconds for the server to answer /ping (imports, model download, load)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_served_champion_answers_raw_pixels_with_class_names(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    images, labels = canonical_digits()
    split = write_split(tmp_path / "split" / "digits", images, labels)
    model = train_model(split, tmp_path / "models" / "model.pt", epochs=5, augment=None)
    log_champion(model)  # as the train stage logs it, registered as mnistlab-digits@champion

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # the venv's bin first on PATH: the command starts `uvicorn` by name
    env = {**stage_env(tmp_path), "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/mnistlab-digits@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_up(proc, f"{url}/ping", log, START_TIMEOUT)

        test = artifacts.load_split(split, "test")[0][:8]
        want = predict.load_predictor(str(model)).probabilities(test)
        for pixels in (test.unsqueeze(1).tolist(),                      # uint8 values as JSON ints
                       (test.unsqueeze(1).float() * 1.0).tolist()):     # [0, 255] floats
            answer = post(f"{url}/invocations", {"inputs": pixels})["predictions"]
            assert len(answer) == len(test)
            for row, p in zip(answer, want, strict=True):
                probs = np.array([row[c] for c in CLASSES])
                assert row["class"] == CLASSES[int(p.argmax())]
                assert row["probability"] == pytest.approx(probs.max())
                assert probs.sum() == pytest.approx(1.0, abs=1e-5)
                np.testing.assert_allclose(probs, p, atol=1e-5)

        # a wrong shape is the client's error, answered as such
        with pytest.raises(urllib.error.HTTPError) as e:
            post(f"{url}/invocations", {"inputs": test.tolist()})  # [N,28,28]: the channel is missing
        assert e.value.code == 400
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue


def test_served_model_refuses_pixels_that_are_no_grey_levels(tmp_path, monkeypatch):
    """Was HTTP 200: the signature checks dtype and shape only, so a pixel of 1e30 got class
    "4" with probability 1.0 and a NaN one class "0" with probability NaN. Now refused as a
    wrong shape is (MLflow's INVALID_PARAMETER_VALUE: HTTP 400), the message naming the values."""
    import functools

    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    from mnistlab import serving, tracking
    from mnistlab.models import build_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run("digits", "mlp", 1, {}, {"dvc_stage": "test"})
    example = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28)).astype(np.float32)
    tracking.log_pytorch_model(run_id, build_model("mlp").eval(), example, functools.partial(
        serving.log_model, classes=CLASSES, normalize={"mean": 0.1307, "std": 0.3081}))
    with tracking.fluent_uri(tracking.tracking_uri()):
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")

    pixels = np.zeros((3, 1, 28, 28), dtype=np.float32)
    pixels[0, 0, 5, 5] = 255.0  # both ends of the range are grey levels
    assert len(model.predict(pixels)) == 3
    prefix = "pixels must be finite grey levels in 0..255; got "
    for value, got in ((999.0, "values from 0 to 999"), (-5.0, "values from -5 to 255"),
                       (1e30, "values from 0 to 1e+30"), (np.nan, "NaN"), (np.inf, "inf"),
                       (-np.inf, "-inf")):
        bad = pixels.copy()
        bad[2, 0, 14, 14] = value
        with pytest.raises(MlflowException) as e:
            model.predict(bad)
        assert e.value.get_http_status_code() == 400
        assert e.value.message == f"{prefix}{got} (first in image 2 of 3)"

    # and as `mlflow models serve` answers a JSON request (NaN is valid JSON to Python's parser)
    bad = pixels.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(MlflowException) as e:
        scoring_server.invocations(json.dumps({"inputs": bad.tolist()}), "application/json",
                                   model, model.metadata.get_input_schema())
    assert e.value.get_http_status_code() == 400
    assert f"{prefix}NaN (first in image 1 of 3)" in e.value.message

"""Security: no load that could run code, verified downloads, credentials that stay secret.

- every ``torch.load`` in the code is ``weights_only=True`` (read from the source's AST),
  and every loader refuses a crafted pickle payload without running it (the stage-level
  version, through the train and evaluate scripts, is in test_bad_inputs);
- downloads are checked against a SHA-256 where one is given (``sources.<ds>.sha256``),
  as well as the MD5;
- tracking-server credentials, given in the URI or the environment, reach no output,
  log, tag, param, artifact or database row (against a real ``mlflow server``);
- the README's claim that ``mlflow ui`` binds 127.0.0.1 holds for the installed MLflow.
"""

from __future__ import annotations

import ast
import hashlib
import json
import urllib.parse
from pathlib import Path

import pytest
import torch
from helpers.data import dataset_files, gz, md5, write_folder
from helpers.http import FAST, Mirrors
from helpers.mlflow import MlflowServer, run_train, shared_server, train_workspace
from helpers.payload import plant_payload
from helpers.repo import ROOT

from mnistlab.artifacts import load_split
from mnistlab.checkpoint import load_resumable
from mnistlab.data.download import fetch
from mnistlab.data.idx import LABELS
from mnistlab.data.sources import resolve_source
from mnistlab.errors import MnistlabError, UnsafeFileError
from mnistlab.models import load_model
from mnistlab.utils import torch_load

# --------------------------------------------------------------------------- loading tensor files


def _torch_load_calls(path: Path) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            calls.append(node)
    return calls


def test_every_torch_load_is_weights_only():
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py"))
    assert len(files) > 10
    calls = 0
    for path in files:
        text = path.read_text()
        # An alias would hide a call from the check below.
        assert "from torch import load" not in text and "load = torch.load" not in text, path
        assert "pickle.load" not in text and "torch.jit.load" not in text, path
        for call in _torch_load_calls(path):
            calls += 1
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            assert ok, f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True"
    assert calls >= 1  # utils.torch_load; the check above must have had something to check


@pytest.mark.parametrize("loader", ["torch_load", "load_resumable", "load_model", "load_split"])
def test_every_loader_refuses_a_pickle_payload_without_running_it(tmp_path: Path, loader: str):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / ("train.pt" if loader == "load_split" else "last.pt")
    plant_payload(path, marker)  # asserts the payload is live
    call = {
        "torch_load": lambda: torch_load(path),
        # A corrupt checkpoint means "train from scratch"; one carrying code stops the stage.
        "load_resumable": lambda: load_resumable(path, "fingerprint"),
        "load_model": lambda: load_model(path, torch.device("cpu")),
        "load_split": lambda: load_split(tmp_path, "train"),
    }[loader]
    with pytest.raises(UnsafeFileError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: refused to load") and "posix.system" in msg
    assert "weights_only=False" not in msg  # torch's advice to switch the protection off: never echoed
    assert not marker.exists()
    assert path.is_file()  # left where it was, for the user to inspect


def test_a_corrupt_file_is_refused_but_is_not_called_unsafe(tmp_path: Path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00not a zip and not a pickle")
    with pytest.raises(MnistlabError) as e:
        torch_load(path)
    assert not isinstance(e.value, UnsafeFileError)
    assert "refused to load (not a plain tensor file" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- verified downloads


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def test_sha256_pins_parse_and_are_validated():
    ok = "A" * 64
    src = resolve_source({"sources": {"x": {"mirrors": ["/m"], "sha256": {"train-images-idx3-ubyte.gz": ok}}}}, "x")
    assert src.sha256 == {"train-images-idx3-ubyte.gz": ok.lower()} and src.md5 == {}
    for spec, match in [
        ({"train-images-idx3-ubyte.gz": "abc"}, r"sources\.x\.sha256\.train-images-idx3-ubyte\.gz: not a SHA-256 \(got 'abc'\)"),
        ({"train-images-idx3-ubyte.gz": "0" * 32}, r"not a SHA-256"),  # an MD5 in the wrong place
        ({"train-images.gz": ok}, r"sources\.x\.sha256: unknown file 'train-images.gz'"),
        ("deadbeef", r"sources\.x\.sha256 must map file names to SHA-256s"),
    ]:
        with pytest.raises(MnistlabError, match=match):
            resolve_source({"sources": {"x": {"mirrors": ["/m"], "sha256": spec}}}, "x")


def test_folder_source_checked_against_sha256(tmp_path: Path):
    files = dataset_files()
    src = write_folder(tmp_path / "src", files)
    pins = {f"{n}.gz": sha256(gz(b)) for n, b in files.items()}
    out = tmp_path / "raw"

    got = fetch(resolve_source({"sources": {"x": {"mirrors": [str(src)], "sha256": pins}}}, "x"),
                out, FAST)
    assert got == {"train": 60, "test": 20}
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {e["verified"] for e in manifest.values()} == {"sha256"}

    both = {"mirrors": [str(src)], "sha256": pins, "md5": {f"{n}.gz": md5(gz(b)) for n, b in files.items()}}
    fetch(resolve_source({"sources": {"x": both}}, "x"), out, FAST)
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {e["verified"] for e in manifest.values()} == {"md5+sha256"}

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    wrong = {**pins, "t10k-labels-idx1-ubyte.gz": "f" * 64}
    with pytest.raises(MnistlabError) as e:
        fetch(resolve_source({"sources": {"x": {"mirrors": [str(src)], "sha256": wrong}}}, "x"),
              out, FAST)
    msg = str(e.value)
    assert f"{src}/t10k-labels-idx1-ubyte.gz: SHA-256 mismatch (expected {'f' * 64}, got " \
           f"{pins['t10k-labels-idx1-ubyte.gz']})" in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced


def test_url_source_sha256_rejects_a_tampered_mirror_and_reuses_verified_files(
        mirrors: Mirrors, tmp_path: Path):
    """Mirror A serves a file whose MD5 is right but whose SHA-256 is not (the pin for
    MD5 is taken from that file: only SHA-256 can tell); B serves the real one."""
    real = dataset_files()
    tampered = dict(real)
    tampered[LABELS["train"]] = real[LABELS["train"]][:-1] + b"\x07"  # a label flipped
    mirrors.publish("a", tampered)
    mirrors.publish("b", real)
    name = f"{LABELS['train']}.gz"
    md5s = {f"{n}.gz": md5(gz(b)) for n, b in real.items()}
    md5s[name] = md5(gz(tampered[LABELS["train"]]))  # agrees with the tampered file
    sha = {name: sha256(gz(real[LABELS["train"]]))}
    source = resolve_source({"sources": {"w": {"mirrors": [mirrors.url("a"), mirrors.url("b")],
                                               "sha256": sha}}}, "w")
    out = tmp_path / "raw"
    assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    assert (out / LABELS["train"]).read_bytes() == real[LABELS["train"]]
    entry = json.loads((out / "manifest.json").read_text())["files"][LABELS["train"]]
    assert entry["from"] == mirrors.url("b") + name and entry["verified"] == "sha256"
    assert mirrors.count(f"/a/{name}") >= 1 and mirrors.count(f"/b/{name}") >= 1

    # With both pins, mirror A's file fails on SHA-256 alone.
    both = resolve_source({"sources": {"w": {"mirrors": [mirrors.url("a")], "md5": {name: md5s[name]},
                                             "sha256": sha}}}, "w")
    with pytest.raises(MnistlabError, match=rf"{mirrors.url('a')}{name}: SHA-256 mismatch"):
        fetch(both, tmp_path / "other", FAST)

    # A rerun finds the verified copy and asks the network for nothing.
    mirrors.requests.clear()
    assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    assert mirrors.count(f"/b/{name}") == 0 and mirrors.count(f"/a/{name}") == 0


# --------------------------------------------------------------------------- credentials


@pytest.mark.slow  # a real mlflow server and the train stage in a subprocess
def test_tracking_credentials_never_leave_the_environment(request, tmp_path_factory, tmp_path: Path):
    server: MlflowServer = shared_server(request, tmp_path_factory)
    host = urllib.parse.urlsplit(server.url).netloc
    secrets = ("s3cret-in-uri", "s3cret-in-env", "alice")
    work = tmp_path / "work"
    p = run_train(work, train_workspace(work, epochs=1), f"http://alice:s3cret-in-uri@{host}",
                  MLFLOW_TRACKING_USERNAME="bob", MLFLOW_TRACKING_PASSWORD="s3cret-in-env")
    assert p.returncode == 0, p.stderr
    run_id = json.loads((work / "models/digits/mlp/seed-1234/run.json").read_text())["run_id"]

    run = server.get("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"  # the control: it did log through that URI
    (output,) = run["outputs"]["model_outputs"]
    model = server.get(f"/api/2.0/mlflow/logged-models/{output['model_id']}")["model"]
    places: dict[str, bytes] = {
        "stage stdout": p.stdout.encode(), "stage stderr": p.stderr.encode(),
        "run tags, params, metrics": json.dumps(run["data"]).encode(),
        "logged model": json.dumps(model).encode(),
        "server database": server.db.read_bytes(),
    }
    for root in (work, server.artifacts):
        for f in root.rglob("*"):
            if f.is_file():
                places[str(f)] = f.read_bytes()
    assert any("checkpoints/model.pt" in k for k in places)  # the artifacts are among them
    for where, blob in places.items():
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret!r} found in {where}"


# --------------------------------------------------------------------------- the local UI


def test_readme_says_mlflow_ui_binds_localhost_and_it_does():
    import click
    from mlflow.cli import cli

    readme = (ROOT / "README.md").read_text()
    assert "`mlflow ui` binds 127.0.0.1" in readme and "MLFLOW_HOST" in readme
    ui = cli.get_command(click.Context(cli), "ui")  # an alias of `mlflow server` in MLflow 3
    host = next(p for p in ui.params if p.name == "host")
    assert host.default == "127.0.0.1" and host.envvar == "MLFLOW_HOST"

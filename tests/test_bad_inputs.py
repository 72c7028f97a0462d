"""Bad files and bad settings, through the user's path: the real stage scripts, run with
the arguments dvc.yaml gives them, in a temp copy of the repo.

Every case must end the same way: exit 2, exactly one ``error:`` line (the last line
of stderr) naming the culprit (a file, a params key, a URL), no traceback, and every
output an earlier successful run produced byte-for-byte as it was.

The earlier outputs are made once per module (download + split of digits, a one-epoch
mlp with its evaluate, features and compare outputs, and a download of ``byo``, a small
synthetic dataset in a folder), with the same functions the stage scripts call; each case
works in its own copy. The MLflow cases give the tracking URI a password: it must show
nowhere, neither in what the stage prints nor in any output. The in-process
checks of the messages live in test_data/test_split/test_training; this is the
subprocess version, with the outputs-intact check they cannot make.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers.checks import assert_one_line_error
from helpers.data import corrupt, dataset_files, gz, tree_digest
from helpers.http import FailingServer
from helpers.payload import plant_payload, plant_raw_payload
from helpers.repo import edit_params, make_repo, no_step_floor, run, stage_env
from helpers.tamper import flip_float_bit

from mnistlab import config
from mnistlab.data.download import fetch
from mnistlab.data.idx import IMAGES, LABELS, read_pair, write_idx
from mnistlab.data.sources import DIGIT_CLASSES, resolve_source
from mnistlab.data.split import split
from mnistlab.stages.compare import ComparePaths, run_compare
from mnistlab.stages.evaluate import EvalPaths, run_evaluation
from mnistlab.stages.features import FeaturePaths, run_features
from mnistlab.stages.train import TrainPaths, train
from mnistlab.utils import torch_load, torch_save

pytestmark = pytest.mark.slow

# every stage output in the repo
OUTPUTS = ("data", "models", "checkpoints", "metrics", "reports", "features", "exports")
SECRET = "TopS3cret"  # the password in the tracking URI of the MLflow cases
SEED = 1234  # the one training seed of the workspace's digits-mlp run
RUN = "digits/mlp/seed-1234"  # its folder under models/, metrics/, ... (mnistlab.config.run_key)


# --------------------------------------------------------------------------- helpers


def stage_cmd(repo: Path, stage: str, **item: str) -> list[str]:
    """The command dvc.yaml runs for ``stage`` with this item (``item=`` for foreach,
    ``dataset=``/``arch=``/``seed=`` for matrix stages), its ``${...}`` filled from params.yaml."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    cmd = spec.get("do", spec)["cmd"]
    params = yaml.safe_load((repo / "params.yaml").read_text())

    def value(m: re.Match) -> str:
        key = m.group(1)
        if key == "item" or key.startswith("item."):
            return item[key.partition(".")[2] or "item"]
        return str(config.get(params, key))

    return shlex.split(re.sub(r"\$\{([^}]+)\}", value, cmd))


def outputs_digest(repo: Path) -> dict[str, str]:
    """MD5 of every file under the repo's output folders (hidden temp files included)."""
    return {f"{d}/{k}": v for d in OUTPUTS if (repo / d).exists()
            for k, v in tree_digest(repo / d).items()}


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the earlier outputs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A temp repo holding a successful download/split/train/evaluate/features of digits-mlp
    (training seed 1234), compare over it, and a download of byo."""
    repo = make_repo(tmp_path_factory.mktemp("bad-inputs") / "repo")

    def small(p: dict) -> None:
        p["datasets"], p["archs"], p["seeds"] = ["digits"], ["mlp"], [SEED]
        no_step_floor(p)
        p["hparams"]["mlp"]["epochs"] = 1
        p["download"] = {"timeout": 5, "retries": 1, "backoff": 0}
        p["sources"]["byo"] = "byo-src"  # a folder of the four MNIST files, relative to the repo

    edit_params(repo, small)
    for name, blob in dataset_files().items():
        (repo / "byo-src").mkdir(exist_ok=True)
        (repo / "byo-src" / f"{name}.gz").write_bytes(gz(blob))

    params = config.load_params(repo / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
        mp.delenv("DVC_EXP_NAME", raising=False)
        settings = config.DownloadSettings.from_params(params)
        for ds in ("digits", "byo"):
            fetch(resolve_source(params, ds), Path("data/raw") / ds, settings)
        split(Path("data/raw/digits"), Path("data/split/digits"), list(DIGIT_CLASSES),
              0.1, 0.2, params["seed"], "digits")
        split_dir, model_dir = Path("data/split/digits"), Path(f"models/{RUN}")
        train(params, "digits", "mlp", SEED,
              TrainPaths(split_dir, model_dir, Path(f"metrics/{RUN}"), Path(f"checkpoints/{RUN}/last.pt")))
        run_evaluation(params, "digits", "mlp", SEED,
                       EvalPaths(split_dir, model_dir, Path(f"metrics/{RUN}"), Path(f"reports/{RUN}/evaluate"),
                                 Path(f"features/{RUN}")))
        run_features(params, "digits", "mlp", SEED,
                     FeaturePaths(split_dir, model_dir, Path(f"features/{RUN}"), Path(f"reports/{RUN}/features")))
        run_compare(params, ComparePaths(Path("metrics"), Path("models"), Path("reports"),
                                         Path("reports/curves"), Path("data/split"), Path("exports"),
                                         Path("reports/pairwise")))
    for f in ("data/raw/byo/manifest.json", "data/split/digits/train.pt",
              "models/digits/mlp/seed-1234/model.pt", "models/digits/mlp/seed-1234/run.json",
              "checkpoints/digits/mlp/seed-1234/last.pt",
              "metrics/digits/mlp/seed-1234/train.json", "metrics/digits/mlp/seed-1234/test.json",
              "reports/digits/mlp/seed-1234/evaluate/misclassified.png",
              "features/digits/mlp/seed-1234/embeddings.pt",
              "reports/digits/mlp/seed-1234/features/embedding-map.png", "reports/leaderboard.md",
              "reports/runs.csv",
              "reports/champions.json", "exports/digits/champion.onnx"):
        assert (repo / f).is_file(), f
    return repo


# --------------------------------------------------------------------------- the cases
# Each case: the stage and its item, what to break (returns extra environment, if any),
# and the fragments the one error line must hold (``{repo}`` is the case's repo).


def _byo_file(name: str, blob: bytes) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        (repo / "byo-src" / name).write_bytes(blob)
    return mutate


def _corrupted(case: str) -> Callable[[Path], None]:
    """Replace byo's files by good ones broken by helpers.data's ``corrupt(case)``."""
    def mutate(repo: Path) -> None:
        files, _ = corrupt(dataset_files(), case)
        for name, blob in files.items():
            (repo / "byo-src" / f"{name}.gz").write_bytes(gz(blob))
    return mutate


def _corrupt_gzip(repo: Path) -> None:
    path = repo / "byo-src" / "train-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[:-8] + bytes(4) + blob[-4:])  # wrong CRC32 in the gzip trailer
    with pytest.raises(gzip.BadGzipFile):  # the control: it really is corrupt
        gzip.decompress(path.read_bytes())


def _source(spec) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        edit_params(repo, lambda p: p["sources"].__setitem__("byo", spec(repo) if callable(spec) else spec))
    return mutate


def _hparam(**override) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        edit_params(repo, lambda p: p["hparams"]["mlp"].update(override))
    return mutate


def _split(**override) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        edit_params(repo, lambda p: p["split"].update(override))
    return mutate


def _no_nines(repo: Path) -> None:
    """Digits without any 9: the split has an empty class (a raw folder someone edited)."""
    raw = repo / "data" / "raw" / "digits"
    images, labels = read_pair(raw, "train", 10)
    keep = labels != 9
    write_idx(raw / IMAGES["train"], images[keep])
    write_idx(raw / LABELS["train"], labels[keep])


def _dead_url(repo: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/mnist/"
    _source({"mirrors": [url]})(repo)


def _unreachable_server(repo: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"http://bob:{SECRET}@127.0.0.1:{closed_port()}"}


_SERVERS: dict[str, FailingServer] = {}  # the failing_server fixture's, while the module runs


def _failing_server(repo: Path) -> dict[str, str]:
    """A server that is up (``/health`` answers) but fails every MLflow call with HTTP 500."""
    return {"MLFLOW_TRACKING_URI": _SERVERS["500"].url(f"bob:{SECRET}")}


def _read_only_db(repo: Path) -> None:
    """mlflow.db read-only: chmod 0444; for root, whom file modes do not stop, the immutable
    attribute (chattr +i, undone after the run). Skipped where the file stays writable."""
    db = repo / "mlflow.db"
    db.chmod(0o444)  # first: an immutable file's mode cannot change
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(db)], capture_output=True, check=False)
    try:
        with open(db, "r+b"):
            pass
    except OSError:
        return  # the control: it really cannot be written
    _writable_again(repo)
    pytest.skip("cannot make mlflow.db read-only here (root, and no chattr +i on this file system)")


def _writable_again(repo: Path) -> None:
    db = repo / "mlflow.db"
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(db)], capture_output=True, check=False)
    db.chmod(0o644)


_read_only_db.undo = _writable_again  # type: ignore[attr-defined]


def _file_in_place_of(rel: str) -> Callable[[Path], None]:
    """The folder ``rel`` replaced by a file: writing under it fails with ENOTDIR, an OSError
    that root cannot override (unlike EACCES or EROFS from file modes)."""
    def mutate(repo: Path) -> None:
        shutil.rmtree(repo / rel)
        (repo / rel).write_text("not a folder\n")
    return mutate


def _full_disk_at(rel: str) -> Callable[[Path], None]:
    """The folder ``rel`` on a nearly full file system: a tmpfs holding a copy of its files and
    256 KiB more, so the first large write fails with ENOSPC, the real OS error. Needs
    ``mount`` (root where the container allows it); skipped elsewhere. ``undo`` puts what the
    stage left on the tmpfs in place of the real folder before unmounting, so the
    byte-identical check sees the stage's doing, not the copy it was given."""
    def paths(repo: Path) -> tuple[Path, Path, Path]:
        return repo / rel, repo.parent / "full-disk-original", repo.parent / "full-disk-left"

    def mutate(repo: Path) -> None:
        folder, original, _ = paths(repo)
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("a full disk needs mount (root)")
        shutil.copytree(folder, original)
        used = sum(f.stat().st_size for f in original.rglob("*") if f.is_file())
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used // 1024 + 256}k", "tmpfs",
                            str(folder)], capture_output=True, text=True)
        if p.returncode:
            shutil.rmtree(original)
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        shutil.copytree(original, folder, dirs_exist_ok=True)

    def undo(repo: Path) -> None:
        folder, original, left = paths(repo)
        shutil.copytree(folder, left)
        subprocess.run(["umount", str(folder)], check=True)
        shutil.rmtree(folder)
        left.rename(folder)
        shutil.rmtree(original)

    mutate.undo = undo  # type: ignore[attr-defined]
    return mutate


def _mlflow_db_deleted(repo: Path) -> None:
    (repo / "mlflow.db").unlink()


def _run_deleted(repo: Path) -> None:
    """The digits-mlp run deleted in the MLflow UI (run.json still names it)."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads((repo / "models" / RUN / "run.json").read_text())["run_id"]
    MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").delete_run(run_id)


def _payload_at(rel: str) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        plant_payload(repo / rel, repo.parent / "PAYLOAD_RAN")
    return mutate


def _raw_payload_at(rel: str) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        plant_raw_payload(repo / rel, repo.parent / "PAYLOAD_RAN")
    return mutate


def _flipped_at(rel: str) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        flip_float_bit(repo / rel)
    return mutate


def _emptied(rel: str) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        (repo / rel).write_bytes(b"")
    return mutate


def _paths(**override) -> Callable[[Path], None]:
    def mutate(repo: Path) -> None:
        edit_params(repo, lambda p: p["paths"].update(override))
    return mutate


def _duplicate_key(repo: Path) -> None:
    """A second ``seed:`` line (PyYAML alone would keep the last; DVC refuses the file)."""
    with open(repo / "params.yaml", "a") as f:
        f.write("seed: 99\n")


def _store(uri: Callable[[Path], str]) -> Callable[[Path], dict[str, str]]:
    return lambda repo: {"MLFLOW_TRACKING_URI": uri(repo)}


def _top_level_typo(repo: Path) -> None:
    edit_params(repo, lambda p: p.__setitem__("hparam", p.pop("hparams")))


def _latin1_byte(repo: Path) -> None:
    """A comment saved by a Latin-1 editor: not UTF-8 (stages are then run directly: DVC would
    refuse to read the file before any stage runs)."""
    with open(repo / "params.yaml", "ab") as f:
        f.write(b"# caf\xe9\n")


def _split_file(subset: str, label: int | None) -> Callable[[Path], None]:
    """The digits split's ``<subset>.pt`` rewritten: its first label set to ``label`` (a file
    made by another tool), or, with None, no images at all."""
    def mutate(repo: Path) -> None:
        path = repo / "data" / "split" / "digits" / f"{subset}.pt"
        obj = torch_load(path)
        x, y = obj["images"], obj["labels"].clone()
        if label is None:
            x, y = x[:0], y[:0]
        else:
            y[0] = label
        torch_save({"images": x.clone(), "labels": y}, path)
    return mutate


def _train_json_na(repo: Path) -> None:
    path = repo / "metrics" / RUN / "train.json"
    path.write_text(path.read_text().replace('"parameters": ', '"parameters": "n/a", "was": ', 1))


BYO = ("download", {"item": "byo"})
TRAIN = ("train", {"dataset": "digits", "arch": "mlp", "seed": "1234"})
EVALUATE = ("evaluate", {"dataset": "digits", "arch": "mlp", "seed": "1234"})
FEATURES = ("features", {"dataset": "digits", "arch": "mlp", "seed": "1234"})
COMPARE = ("compare", {})
UNREACHABLE = ["MLflow tracking server http://127.0.0.1:", "unreachable"]
FAILING = ["MLflow tracking store http://127.0.0.1:", "too many 500 error responses"]
SPLIT = ("split", {"item": "digits"})
IMG = "byo-src/train-images-idx3-ubyte.gz"
LAB = "byo-src/train-labels-idx1-ubyte.gz"
ZERO_MD5, ZERO_SHA = "0" * 32, "0" * 64

CASES = {
    # ---- files
    "corrupt gzip": (*BYO, _corrupt_gzip, [f"{IMG}: corrupt gzip (CRC check failed"]),
    "truncated IDX": (*BYO, _corrupted("truncated idx"),
                      [f"{IMG}: truncated IDX file (46956 bytes, the header's 60 images need 47056)"]),
    "wrong magic": (*BYO, _corrupted("bad magic"), [f"{IMG}: not an IDX file (bad magic 0x12340803)"]),
    "wrong image size": (*BYO, _corrupted("32x32"), [f"{IMG}: images are 32x32, expected 28x28"]),
    "image/label count mismatch": (*BYO, _corrupted("count mismatch"),
                                   [f"{IMG}: 60 images but {LAB} has 59 labels"]),
    "labels out of range": (*BYO, _corrupted("label out of range"),
                            [f"{LAB}: label 10 out of range 0..9"]),
    "not gzip at all": (*BYO, _byo_file("train-labels-idx1-ubyte.gz", b"<html>404</html>"),
                        [f"{LAB}: named .gz but is not a gzip file"]),
    # ---- sources
    "missing source path": (*BYO, _source("no/such/folder"),
                            ["dataset 'byo'", "no/such/folder: folder not found"]),
    "dead URL": (*BYO, _dead_url, ["dataset 'byo'", "http://127.0.0.1:", "/mnist/train-images-idx3-ubyte.gz",
                                   "Connection refused", "Offline?"]),
    "MD5 mismatch": (*BYO, _source({"mirrors": ["byo-src"], "md5": {"train-images-idx3-ubyte.gz": ZERO_MD5}}),
                     [f"{IMG}: MD5 mismatch (expected {ZERO_MD5}, got "]),
    "SHA-256 mismatch": (*BYO, _source({"mirrors": ["byo-src"],
                                        "sha256": {"train-labels-idx1-ubyte.gz": ZERO_SHA}}),
                         [f"{LAB}: SHA-256 mismatch (expected {ZERO_SHA}, got "]),
    "mirror URL with a password": (*BYO, _source(f"https://bob:{SECRET}@example.invalid/mnist/"),
                                   ["params.yaml: sources.byo.mirrors: https://example.invalid/mnist/: a user "
                                    "name or password in a mirror URL is not supported"]),
    "mirror URL with a query": (*BYO, _source(f"https://example.invalid/mnist/?token={SECRET}"),
                                ["sources.byo.mirrors: https://example.invalid/mnist/: a query or fragment"]),
    "malformed mirror URL": (*BYO, _source({"mirrors": ["byo-src", "http://[::1/mnist/"]}),
                             ["params.yaml: sources.byo.mirrors: 'http://[::1/mnist/' is not a valid URL "
                              "(Invalid IPv6 URL)"]),
    "class named like a served column": (*BYO, _source({"mirrors": ["byo-src"],
                                                       "classes": ["class", *DIGIT_CLASSES[1:]]}),
                                         ["params.yaml: sources.byo.classes: 'class' cannot name a class"]),
    "unknown dataset": ("download", {"item": "nope"}, lambda repo: None,
                        ["unknown dataset 'nope'", "known: byo, digits"]),
    # ---- settings
    "unknown arch": ("train", {"dataset": "digits", "arch": "alexnet", "seed": "1234"}, lambda repo: None,
                     ["unknown arch 'alexnet'", "mlp", "resnet_bn"]),
    "unknown optimizer": (*TRAIN, _hparam(optimizer="rmsprop"),
                          ["hparams.mlp.optimizer", "'rmsprop'", "sgd, adam, adamw"]),
    "top-level key typo": (*TRAIN, _top_level_typo,
                           ["params.yaml: unknown top-level key(s) hparam (valid: ", "hparams"]),
    "non-UTF-8 params.yaml": ("evaluate", {"dataset": "digits", "arch": "mlp", "seed": "1234"}, _latin1_byte,
                              ["params.yaml: not UTF-8 text (byte 0xe9 at offset "]),
    "paths.raw empty": (*BYO, _paths(raw=""), ["params.yaml: paths.raw must be a folder name (got '')"]),
    "paths.models outside the repo": (*TRAIN, _paths(models="../elsewhere"),
                                      ["params.yaml: paths.models: '../elsewhere' must be a relative folder "
                                       "inside the repository"]),
    "paths unknown key": (*EVALUATE, _paths(bogus="x"), ["params.yaml: paths: unknown key(s) bogus"]),
    "duplicate key in params.yaml": (*SPLIT, _duplicate_key, ["params.yaml: not valid YAML",
                                                              "found duplicate key 'seed'"]),
    "lr zero": (*TRAIN, _hparam(lr=0), ["params.yaml: hparams.mlp.lr must be a positive number (got 0)"]),
    "epochs zero": (*TRAIN, _hparam(epochs=0), ["hparams.mlp.epochs must be a positive integer (got 0)"]),
    "batch size negative": (*TRAIN, _hparam(batch_size=-8),
                            ["hparams.mlp.batch_size must be a positive integer (got -8)"]),
    "val fraction 1.5": (*SPLIT, _split(val_fraction=1.5), ["split.val_fraction", "(got 1.5)"]),
    "val fraction 0.0": (*SPLIT, _split(val_fraction=0.0), ["split.val_fraction", "(got 0.0)"]),
    "empty class after split": (*SPLIT, _no_nines, ["dataset 'digits': no training samples of class(es) ['9']"]),
    # ---- files one stage hands another
    "train.json not a number": ("compare", {}, _train_json_na,
                                ["metrics/digits/mlp/seed-1234/train.json: parameters must be an integer (got 'n/a'"]),
    # was "IndexError: Target 42 is out of bounds." and "torch.cat(): expected a non-empty list"
    "label 42 in test.pt": (*EVALUATE, _split_file("test", 42),
                            ["data/split/digits/test.pt: label 42 out of range 0..9 (data/split/digits/"
                             "summary.json names 10 classes; re-run the split stage)"]),
    "negative label in train.pt": (*TRAIN, _split_file("train", -1),
                                   ["data/split/digits/train.pt: label -1 out of range 0..9"]),
    "empty test.pt": (*EVALUATE, _split_file("test", None),
                      ["data/split/digits/test.pt: empty (no images; re-run the split stage)"]),
    # ---- runs
    "NaN loss": (*TRAIN, _hparam(lr=1e6, batch_size=32, epochs=2),
                 ["dataset 'digits', arch 'mlp': loss diverged", "epoch 1", "hparams.mlp.lr=1000000.0"]),
    "tracking server unreachable": (*TRAIN, _unreachable_server, UNREACHABLE),
    # ---- the MLflow store, every stage that uses it (issue #10: the password was printed,
    # after minutes of retries, beside outputs already rewritten)
    "evaluate: server unreachable": (*EVALUATE, _unreachable_server, UNREACHABLE),
    "features: server unreachable": (*FEATURES, _unreachable_server, UNREACHABLE),
    "compare: server unreachable": (*COMPARE, _unreachable_server, UNREACHABLE),
    "evaluate: server answers 500": (*EVALUATE, _failing_server, FAILING),
    "features: server answers 500": (*FEATURES, _failing_server, FAILING),
    "compare: server answers 500": (*COMPARE, _failing_server, FAILING),
    "evaluate: read-only mlflow.db": (*EVALUATE, _read_only_db,
                                      ["MLflow tracking store sqlite:///", "/mlflow.db: attempt to write "
                                       "a readonly database"]),
    "train: read-only mlflow.db": (*TRAIN, _read_only_db,
                                   ["MLflow tracking store sqlite:///", "/mlflow.db: attempt to write "
                                    "a readonly database"]),
    "train: sqlite store in a missing folder": (*TRAIN, _store(lambda repo: f"sqlite:///{repo}/no-such/mlflow.db"),
                                                ["MLflow tracking store sqlite:///", "/no-such/mlflow.db: no folder "]),
    "evaluate: sqlite store is a folder": (*EVALUATE, _store(lambda repo: f"sqlite:///{repo}/models"),
                                           ["MLflow tracking store sqlite:///", "/models is a folder, not a "
                                            "database file"]),
    "features: malformed tracking URI": (*FEATURES, _store(lambda repo: f"http://bob:{SECRET}@[::1"),
                                         ["MLFLOW_TRACKING_URI: ", "is not a valid URI (Invalid IPv6 URL)"]),
    "evaluate: mlflow.db deleted": (*EVALUATE, _mlflow_db_deleted,
                                    ["models/digits/mlp/seed-1234/run.json: MLflow run ", "is not in tracking store "
                                     "sqlite:///", "rerun `dvc repro -f -s train@digits-mlp-1234`"]),
    "features: run deleted in MLflow": (*FEATURES, _run_deleted,
                                        ["models/digits/mlp/seed-1234/run.json: MLflow run ", "was deleted from "
                                         "tracking store", "rerun `dvc repro -f -s train@digits-mlp-1234`"]),
    # ---- the file system
    "train: disk full under models/": (*TRAIN, _full_disk_at("models/digits/mlp/seed-1234"),
                                       ["models/digits/mlp/seed-1234", "No space left on device"]),
    "evaluate: output folder is a file": (*EVALUATE, _file_in_place_of("reports/digits/mlp/seed-1234"),
                                          ["reports/digits/mlp/seed-1234/evaluate: Not a directory"]),
    "pickle payload in last.pt": (*TRAIN, _payload_at("checkpoints/digits/mlp/seed-1234/last.pt"),
                                  ["checkpoints/digits/mlp/seed-1234/last.pt: refused to load", "posix.system",
                                   "weights_only=True"]),
    "pickle payload in model.pt": ("evaluate", {"dataset": "digits", "arch": "mlp", "seed": "1234"},
                                   _payload_at("models/digits/mlp/seed-1234/model.pt"),
                                   ["models/digits/mlp/seed-1234/model.pt: refused to load", "posix.system"]),
    # ---- integrity (tests/test_integrity has the in-process versions)
    "raw pickle payload in last.pt": (*TRAIN, _raw_payload_at("checkpoints/digits/mlp/seed-1234/last.pt"),
                                      ["checkpoints/digits/mlp/seed-1234/last.pt: refused to load: not a file torch "
                                       "can load safely", "posix.system", "possibly malicious"]),
    "raw pickle payload in model.pt": ("evaluate", {"dataset": "digits", "arch": "mlp", "seed": "1234"},
                                       _raw_payload_at("models/digits/mlp/seed-1234/model.pt"),
                                       ["models/digits/mlp/seed-1234/model.pt: refused to load", "posix.system"]),
    "flipped bit in model.pt": ("evaluate", {"dataset": "digits", "arch": "mlp", "seed": "1234"},
                                _flipped_at("models/digits/mlp/seed-1234/model.pt"),
                                ["models/digits/mlp/seed-1234/model.pt: integrity check failed (SHA-256 of the payload "
                                 "differs)", "rerun its train stage (dvc repro -f -s train@digits-mlp-1234)"]),
    "flipped bit in last.pt": (*TRAIN, _flipped_at("checkpoints/digits/mlp/seed-1234/last.pt"),
                               ["checkpoints/digits/mlp/seed-1234/last.pt: integrity check failed",
                                "delete it to train from scratch"]),
    "empty last.pt": (*TRAIN, _emptied("checkpoints/digits/mlp/seed-1234/last.pt"),
                      ["checkpoints/digits/mlp/seed-1234/last.pt: refused to load (not a plain tensor file: empty",
                       "delete it to train from scratch"]),
}


@dataclass
class Outcome:
    process: subprocess.CompletedProcess
    before: dict[str, str]  # outputs_digest just before the failing run
    after: dict[str, str]
    payload_ran: bool
    leaked: list[str]  # output files that hold the password


def attempt(workspace: Path, case_dir: Path, kind: str) -> Outcome:
    """Copy the workspace, break it as ``kind`` says, run the stage, record what happened."""
    stage, item, mutate, _ = CASES[kind]
    repo = case_dir / "repo"
    shutil.copytree(workspace, repo, symlinks=True)
    cmd = stage_cmd(repo, stage, **item)  # from the unbroken params.yaml (a case may make it unreadable)
    env = {**stage_env(repo), **(mutate(repo) or {})}
    before = outputs_digest(repo)
    try:
        p = run(cmd, repo, check=False, env=env, timeout=300)
    finally:
        getattr(mutate, "undo", lambda repo: None)(repo)
    leaked = [str(f.relative_to(repo)) for d in OUTPUTS if (repo / d).exists()
              for f in (repo / d).rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
    return Outcome(p, before, outputs_digest(repo), (case_dir / "PAYLOAD_RAN").exists(), leaked)


@pytest.fixture(scope="module")
def failing_server() -> Iterator[FailingServer]:
    """The server of the "answers 500" cases, up while this module's cases run."""
    _SERVERS["500"] = server = FailingServer()
    yield server
    _SERVERS.clear()
    server.close()


@pytest.fixture(scope="module")
def outcomes(workspace: Path, failing_server: FailingServer, tmp_path_factory, request
             ) -> Iterator[dict[str, Future]]:
    """The selected cases, run two at a time (each is one short, mostly single-threaded
    process: two CPU cores halve the wall time); each test waits for its own."""
    kinds = [item.callspec.params["kind"] for item in request.session.items
             if getattr(item, "originalname", "") == "test_bad_input_is_one_line_and_loses_nothing"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {kind: pool.submit(attempt, workspace, tmp_path_factory.mktemp("case"), kind)
               for kind in dict.fromkeys(kinds)}


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_is_one_line_and_loses_nothing(outcomes: dict[str, Future], kind: str):
    out = outcomes[kind].result()
    assert_one_line_error(out.process, *CASES[kind][3])
    assert out.before, "no earlier outputs to protect"
    assert out.after == out.before, f"{kind}: an earlier output changed"
    assert not out.payload_ran, "the pickle payload ran"
    assert SECRET not in out.process.stdout + out.process.stderr, "the password was printed"
    assert not out.leaked, f"the password is in {out.leaked}"


def test_the_cases_cover_the_issue():
    """At least 15 kinds, and each stage script that reads user input is exercised."""
    assert len(CASES) >= 15
    assert {c[0] for c in CASES.values()} >= {"download", "split", "train", "evaluate", "features",
                                               "compare"}


def test_the_unbroken_path_succeeds(workspace: Path, tmp_path: Path):
    """The control for the download cases: the same command on the unbroken copy works,
    so their failures come from the broken input, not from the harness."""
    repo = tmp_path / "repo"
    shutil.copytree(workspace, repo, symlinks=True)
    p = run(stage_cmd(repo, "download", item="byo"), repo, timeout=300)
    assert "byo: train 60, test 20 samples in data/raw/byo, NOT verified" in p.stdout  # no digest

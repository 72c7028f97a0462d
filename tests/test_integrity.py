"""Integrity of model files and checkpoints: every one is sealed with a SHA-256 of its payload.

- one flipped bit inside a weight of ``model.pt``, ``best.pt`` or ``last.pt`` loads silently
  with torch.load (the control), and is refused by mnistlab's loaders with one line naming
  the file and the way out; the file is left as it was;
- a raw ``pickle.dumps`` payload at ``last.pt`` or ``model.pt`` is refused as unsafe, never
  run, never overwritten; an empty or truncated checkpoint is refused too (not retrained over);
- files of the previous format (no digest): a checkpoint is not resumed (a warning), a model
  file is refused;
- a clean round trip loads, and the same inputs still give byte-identical files.

The stage-level versions (the real train and evaluate scripts: exit 2, one line, outputs
intact) are cases of test_bad_inputs.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.payload import plant_raw_payload
from helpers.repo import committed_params
from helpers.tamper import flip_float_bit
from helpers.training import train_fit

from mnistlab.checkpoint import load_resumable, save_checkpoint
from mnistlab.config import TrainSettings
from mnistlab.data.digits import digits_as_mnist
from mnistlab.errors import MnistlabError, UnsafeFileError
from mnistlab.hparams import HParams
from mnistlab.inference import to_device
from mnistlab.models import load_model, model_record, save_model
from mnistlab.utils import DIGEST_KEY, payload_sha256, seal, torch_load, torch_save

CPU = torch.device("cpu")
ARCH = "mlp"
RUN = "digits/mlp/seed-1234"  # the run's folder under models/ and checkpoints/ (mnistlab.config.run_key)


def _train(out: Path, seed: int = 1) -> dict[str, Path]:
    """One epoch of mlp on 128 digits, saved as the train stage saves it:
    ``models/digits/mlp/seed-1234/{model,best}.pt`` and ``checkpoints/digits/mlp/seed-1234/last.pt``
    under ``out``."""
    params = committed_params()  # not the working tree's `dvc exp run -S` edits
    params["hparams"][ARCH]["epochs"] = 1
    hp = HParams.from_params(params, ARCH)
    x, y = digits_as_mnist()
    train, val = (to_device(x[a:b], y[a:b], hp.mean, hp.std, CPU) for a, b in ((0, 128), (128, 224)))
    files = {"model.pt": out / "models" / RUN / "model.pt", "best.pt": out / "models" / RUN / "best.pt",
             "last.pt": out / "checkpoints" / RUN / "last.pt"}
    torch.manual_seed(seed)
    result = train_fit(hp, TrainSettings(device="cpu", min_steps=0), train, val, seed=seed,
                       fingerprint="fp", checkpoint=files["last.pt"], extra_state={"run_id": "r1"})
    norm, classes = {"mean": hp.mean, "std": hp.std}, [str(i) for i in range(10)]
    args = torch_load(files["last.pt"])["args"]  # what the run built: the checkpoint records it
    save_model(files["model.pt"], model_record(ARCH, args, result.model.state_dict(), norm, classes))
    save_model(files["best.pt"], model_record(ARCH, args, result.best_state, norm, classes))
    return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    return _train(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def files(trained: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the trained files (same layout), for a test to damage."""
    root = trained["model.pt"].parents[4]  # <root>/models/digits/mlp/seed-1234/model.pt
    out = {}
    for name, src in trained.items():
        dst = tmp_path / src.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        out[name] = dst
    return out


def load(name: str, path: Path):
    """The loader the pipeline reads ``name`` with."""
    return load_resumable(path, "fp") if name == "last.pt" else load_model(path, CPU)


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a loaded payload, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: t for key, v in items for k, t in tensors(v, f"{prefix}/{key}").items()}


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- a flipped bit


@pytest.mark.parametrize("name", ["model.pt", "best.pt", "last.pt"])
def test_a_flipped_bit_in_a_weight_is_refused_naming_the_file(files: dict[str, Path], name: str):
    path = files[name]
    assert load(name, path) is not None  # the control: the clean file loads
    clean = torch.load(path, weights_only=True)
    record = flip_float_bit(path)
    damaged = path.read_bytes()

    # torch.load does not notice: the zip record's CRC-32 exists but is never checked.
    with zipfile.ZipFile(path) as z:
        assert z.testzip() == record
    before, after = tensors(clean), tensors(torch.load(path, weights_only=True))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1 and after[changed[0]].is_floating_point(), changed
    assert (after[changed[0]] != before[changed[0]]).sum() == 1

    with pytest.raises(MnistlabError) as e:
        load(name, path)
    msg = one_line(e)
    assert not isinstance(e.value, UnsafeFileError)
    assert msg.startswith(f"{path}: integrity check failed (SHA-256 of the payload differs): "
                          "the file was altered or damaged; "), msg
    if name == "last.pt":
        assert msg.endswith("not resumed; left in place for inspection: delete it to train from scratch")
    else:
        assert msg.endswith("rerun its train stage (dvc repro -f -s train@digits-mlp-1234)")
    assert path.read_bytes() == damaged  # left for inspection


def test_an_edited_value_or_key_fails_the_check_too(files: dict[str, Path]):
    """Not only bits in tensors: any change to what is loaded (here the arch's args, the
    epoch, a key) fails, short of recomputing the digest."""
    rec = torch_load(files["model.pt"])
    rec["normalize"]["std"] = 0.5
    torch_save(rec, files["model.pt"])
    with pytest.raises(MnistlabError, match="model.pt: integrity check failed"):
        load_model(files["model.pt"], CPU)
    ckpt = torch_load(files["last.pt"])
    ckpt["history"] = ckpt.pop("history")  # same values, other key order
    torch_save(ckpt, files["last.pt"])
    with pytest.raises(MnistlabError, match="last.pt: integrity check failed"):
        load_resumable(files["last.pt"], "fp")


# --------------------------------------------------------------------------- pickle payloads, broken files


@pytest.mark.parametrize("name", ["model.pt", "last.pt"])
def test_a_raw_pickle_payload_is_refused_never_run_and_left_in_place(files: dict[str, Path], tmp_path: Path,
                                                                      name: str):
    path, marker = files[name], tmp_path / "PAYLOAD_RAN"
    plant_raw_payload(path, marker)  # asserts the payload is live
    planted = path.read_bytes()
    with pytest.raises(UnsafeFileError) as e:
        load(name, path)
    msg = one_line(e)
    assert msg.startswith(f"{path}: refused to load: not a file torch can load safely, a raw pickle")
    assert "asks to import posix.system" in msg and "possibly malicious" in msg
    assert "weights_only=False" not in msg
    assert not marker.exists()
    assert path.read_bytes() == planted


@pytest.mark.parametrize("blob, detail", [
    (b"", "empty, 0 bytes"),
    ("half", "a damaged zip archive"),
    (b"not a checkpoint", "neither the zip archive torch.save writes nor a pickle"),
])
def test_an_empty_or_truncated_checkpoint_is_refused_not_trained_over(files: dict[str, Path], blob, detail):
    path = files["last.pt"]
    if blob == "half":
        blob = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(blob)
    with pytest.raises(MnistlabError) as e:
        load_resumable(path, "fp")
    msg = one_line(e)
    assert not isinstance(e.value, UnsafeFileError)
    assert msg.startswith(f"{path}: refused to load (not a plain tensor file: {detail}")
    assert msg.endswith("delete it to train from scratch")
    assert path.read_bytes() == blob


def test_a_checkpoint_of_the_previous_format_is_not_resumed(files: dict[str, Path], caplog):
    """No digest: written before checkpoints were sealed. Its code fingerprint cannot match
    today's code, so it would not be resumed anyway: a warning, training from scratch."""
    path = files["last.pt"]
    ckpt = torch_load(path)
    del ckpt[DIGEST_KEY]
    torch_save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="mnistlab.checkpoint"):
        assert load_resumable(path, "fp") is None
    assert "no integrity digest (written by an older mnistlab); not resumed, training from scratch" in caplog.text
    # A tensor file that is no checkpoint at all is refused, not trained over.
    torch_save({"w": torch.zeros(2)}, path)
    with pytest.raises(MnistlabError, match="last.pt: not a checkpoint .*delete it to train from scratch"):
        load_resumable(path, "fp")


def test_a_model_file_of_the_previous_format_is_refused(files: dict[str, Path]):
    path = files["model.pt"]
    rec = torch_load(path)
    del rec[DIGEST_KEY]
    torch_save(rec, path)
    with pytest.raises(MnistlabError) as e:
        load_model(path, CPU)
    assert one_line(e) == (f"{path}: no integrity digest (written by an older mnistlab, or not by the "
                           "train stage): its weights cannot be verified; rerun its train stage "
                           "(dvc repro -f -s train@digits-mlp-1234)")


# --------------------------------------------------------------------------- what still holds


def test_clean_files_round_trip(trained: dict[str, Path]):
    net, record = load_model(trained["model.pt"], CPU)
    assert record["arch"] == ARCH and record[DIGEST_KEY] == payload_sha256(
        {k: v for k, v in record.items() if k != DIGEST_KEY})
    ckpt = load_resumable(trained["last.pt"], "fp")
    assert ckpt["epoch"] == 1 and ckpt["run_id"] == "r1"
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt["model"][k])


def test_same_inputs_give_byte_identical_files(trained: dict[str, Path], tmp_path: Path):
    again = _train(tmp_path)
    for name in ("model.pt", "best.pt"):
        assert again[name].read_bytes() == trained[name].read_bytes(), name
    # last.pt's history holds wall-clock seconds; all else is the same, bit for bit
    a, b = torch_load(again["last.pt"]), torch_load(trained["last.pt"])
    for ckpt in (a, b):
        del ckpt[DIGEST_KEY]
        for row in ckpt["history"]:
            row.pop("epoch_seconds"), row.pop("train_seconds")
    assert payload_sha256(a) == payload_sha256(b)
    # and a resave of a loaded record (digest dropped and recomputed) too
    rec = torch_load(trained["model.pt"])
    save_model(tmp_path / "resaved.pt", rec)
    assert (tmp_path / "resaved.pt").read_bytes() == trained["model.pt"].read_bytes()
    save_checkpoint(tmp_path / "resaved_last.pt", torch_load(trained["last.pt"]))
    assert (tmp_path / "resaved_last.pt").read_bytes() == trained["last.pt"].read_bytes()


def test_the_digest_covers_structure_dtype_and_shape():
    base = {"w": torch.arange(6, dtype=torch.float32), "n": 1, "t": (1, 2)}
    d = payload_sha256(base)
    assert payload_sha256(dict(base)) == d
    for other in ({**base, "w": base["w"].reshape(2, 3)},          # same bytes, other shape
                  {**base, "w": base["w"].view(torch.int32)},      # same bytes, other dtype
                  {**base, "n": True}, {**base, "n": 1.0},         # 1 == True == 1.0 in Python
                  {**base, "t": [1, 2]},                           # list, not tuple
                  {"n": 1, "w": base["w"], "t": (1, 2)}):          # other key order
        assert payload_sha256(other) != d
    assert seal(seal(base)) == seal(base)  # resealing replaces the digest, never nests it
    with pytest.raises(TypeError):
        payload_sha256({"x": {1, 2}})

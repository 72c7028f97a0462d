"""Sources, IDX parsing and validation, the embedded digits, and the real MNIST files.

Also home of the small synthetic-IDX helpers the other data tests import
(``from test_data import ...``): every test builds its own files in ``tmp_path``.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision.datasets as tvd
import yaml

from mnistlab import data
from mnistlab.errors import MnistlabError

ROOT = Path(__file__).resolve().parents[1]
T10K_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
QUICK = data.DownloadSettings(timeout=5, retries=1, backoff=0)


# --------------------------------------------------------------------------- helpers


def idx_bytes(t: torch.Tensor) -> bytes:
    """A uint8 tensor as IDX bytes (magic 0x0000 08 ndim, big-endian dims, data)."""
    t = t.to(torch.uint8).contiguous()
    head = bytes([0, 0, 0x08, t.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in t.shape)
    return head + t.numpy().tobytes()


def make_pair(n: int, num_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct random images (the index is written into pixels 0-1) and cycling labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    x[:, 0, 0] = torch.arange(n) // 256
    x[:, 0, 1] = torch.arange(n) % 256
    return x, torch.arange(n) % num_classes


def dataset_files(n_train: int = 60, n_test: int = 20, num_classes: int = 10, test: bool = True,
                  seed: int = 0) -> dict[str, bytes]:
    """The four official names → uncompressed IDX bytes of a small synthetic dataset."""
    out = {}
    x, y = make_pair(n_train, num_classes, seed)
    out[data.IMAGES["train"]], out[data.LABELS["train"]] = idx_bytes(x), idx_bytes(y)
    if test:
        x, y = make_pair(n_test, num_classes, seed + 1)
        out[data.IMAGES["test"]], out[data.LABELS["test"]] = idx_bytes(x), idx_bytes(y)
    return out


def gz(blob: bytes) -> bytes:
    # mtime=0: the same bytes every time, so MD5s are stable within a test
    return gzip.compress(blob, compresslevel=1, mtime=0)


def write_folder(folder: Path, files: dict[str, bytes], gzipped: bool = True) -> Path:
    """Write ``files`` into ``folder`` (as ``NAME.gz`` when ``gzipped``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        if gzipped:
            (folder / f"{name}.gz").write_bytes(gz(blob))
        else:
            (folder / name).write_bytes(blob)
    return folder


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    """name → MD5 of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): md5(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_source(folder: Path | str, **spec) -> data.Source:
    return data.resolve_source({"sources": {"byo": {"mirrors": [str(folder)], **spec}}}, "byo")


def run_stage(script: str, *args: str, params: dict | None = None, cwd: Path,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``stages/<script>`` as DVC would, with ``params`` written to ``cwd/params.yaml``."""
    if params is not None:
        (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line on stderr (the last), holding ``fragments``."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and p.stderr.rstrip().splitlines()[-1] == errors[0], p.stderr
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def raises_one_line(match: str):
    """pytest.raises(MnistlabError) whose message is one line and matches ``match`` (a regex)."""
    return pytest.raises(MnistlabError, match=match)


def fetch_error(folder: Path, out: Path, **spec) -> str:
    with raises_one_line(".") as e:
        data.fetch(folder_source(folder, **spec), out, QUICK)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- sources


def test_params_yaml_sources_resolve(root: Path):
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name in params["sources"]:
        data.resolve_source(params, name)
    assert data.resolve_source(params, "digits").embedded == "sklearn_digits"
    assert "digits" in params["datasets"]


def test_torchvision_sources_take_official_md5s_mirrors_and_classes():
    mnist = data.resolve_source({"sources": {"m": {"torchvision": "MNIST"}}}, "m")
    assert mnist.md5 == dict(tvd.MNIST.resources)
    assert mnist.mirrors == tuple(tvd.MNIST.mirrors)
    assert mnist.classes == tuple(str(i) for i in range(10))

    fashion = data.resolve_source(
        {"sources": {"f": {"torchvision": "FashionMNIST", "mirrors": ["/org/mirror"]}}}, "f")
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes == tuple(tvd.FashionMNIST.classes)
    assert fashion.mirrors == ("/org/mirror",)  # overridable from params.yaml
    assert fashion.md5["train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"

    kmnist = data.resolve_source({"sources": {"k": {"torchvision": "KMNIST"}}}, "k")
    assert kmnist.classes == tuple(tvd.KMNIST.classes)


def test_md5_override_and_string_source(tmp_path: Path):
    s = data.resolve_source({"sources": {"m": {"torchvision": "MNIST", "mirrors": "/x",
                                               "md5": {"train-images-idx3-ubyte.gz": "A" * 32}}}}, "m")
    assert s.md5["train-images-idx3-ubyte.gz"] == "a" * 32
    assert s.md5["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    s = data.resolve_source({"sources": {"b": str(tmp_path)}}, "b")
    assert s.mirrors == (str(tmp_path),) and s.md5 == {} and s.embedded is None


@pytest.mark.parametrize("spec, match", [
    ({"embedded": "nope"}, r"sources\.x\.embedded: unknown 'nope' \(valid: sklearn_digits\)"),
    ({"torchvision": "EMNIST"}, r"sources\.x\.torchvision: 'EMNIST' is not .* \(valid: MNIST, FashionMNIST, KMNIST\)"),
    ({"torchvision": "CIFAR10"}, r"'CIFAR10' is not"),
    ({"mirror": ["/x"]}, r"sources\.x: unknown key\(s\) mirror \(valid: mirrors, "),
    ({"mirrors": []}, r"sources\.x\.mirrors must list at least one URL or folder"),
    ({"mirrors": [3]}, r"sources\.x\.mirrors must list"),
    ({"mirrors": ["/x"], "md5": {"train.gz": "a" * 32}}, r"sources\.x\.md5: unknown file 'train\.gz'"),
    ({"mirrors": ["/x"], "md5": {"train-images-idx3-ubyte.gz": "xyz"}}, r"md5\.train-images-idx3-ubyte\.gz: not an MD5"),
    ({"mirrors": ["/x"], "classes": ["a"]}, r"sources\.x\.classes must list 2 to 256 distinct names"),
    ({"mirrors": ["/x"], "classes": ["a", "a"]}, r"distinct"),
    (42, r"sources\.x must be a path, a URL or a mapping"),
])
def test_bad_source_specs(spec, match):
    with raises_one_line(match):
        data.resolve_source({"sources": {"x": spec}}, "x")


def test_unknown_dataset_lists_known_ones():
    with raises_one_line(r"unknown dataset 'nope': add it under 'sources' in params\.yaml \(known: a, b\)"):
        data.resolve_source({"sources": {"b": "/x", "a": "/y"}}, "nope")


@pytest.mark.parametrize("section, match", [
    ({"timeout": 0}, r"download\.timeout must be a positive number"),
    ({"retries": 0}, r"download\.retries must be a positive integer"),
    ({"retries": 1.5}, r"download\.retries must be a positive integer"),
    ({"backoff": -1}, r"download\.backoff must be a number >= 0"),
    ({"retry": 3}, r"download: unknown key\(s\) retry"),
])
def test_bad_download_settings(section, match):
    with raises_one_line(match):
        data.DownloadSettings.from_params({"download": section})


# --------------------------------------------------------------------------- the real MNIST files


def _gunzip(src: Path, dest: Path) -> None:
    with gzip.open(src) as f:
        dest.write_bytes(f.read())


def test_real_t10k_files_parse(mnist_t10k: Path, tmp_path: Path):
    for name in (data.IMAGES["test"], data.LABELS["test"], data.LABELS["train"]):
        _gunzip(mnist_t10k / f"{name}.gz", tmp_path / name)
    images, labels = data.read_pair(tmp_path, "test", 10)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == T10K_LABEL_COUNTS
    assert 0 < images.float().mean() < 255 and images.max() == 255
    from torchvision.datasets.mnist import read_label_file

    assert torch.bincount(read_label_file(str(tmp_path / data.LABELS["train"])).long()).tolist() == TRAIN_LABEL_COUNTS


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory, mnist_t10k: Path) -> tuple[Path, str]:
    """A local mirror with three real official files and a synthetic train-images file.

    The 60,000 official training images are not available offline, so
    train-images-idx3-ubyte.gz is 60,000 blank 28x28 images and its official MD5
    is overridden with this file's MD5. The other three files are checked against
    torchvision.datasets.MNIST.resources, unmodified.
    """
    folder = tmp_path_factory.mktemp("official")
    for name in (data.IMAGES["test"], data.LABELS["test"], data.LABELS["train"]):
        (folder / f"{name}.gz").symlink_to(mnist_t10k / f"{name}.gz")
    blank = gz(idx_bytes(torch.zeros(60_000, 28, 28, dtype=torch.uint8)))
    (folder / f"{data.IMAGES['train']}.gz").write_bytes(blank)
    return folder, md5(blank)


def test_official_md5s_verify_the_real_files(official_folder, tmp_path: Path):
    folder, synthetic_md5 = official_folder
    official = dict(tvd.MNIST.resources)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        assert md5((folder / name).read_bytes()) == official[name]  # the files are the real ones

    source = data.resolve_source({"sources": {"mnist": {
        "torchvision": "MNIST", "mirrors": [str(folder)],
        "md5": {"train-images-idx3-ubyte.gz": synthetic_md5}}}}, "mnist")
    assert source.md5["t10k-images-idx3-ubyte.gz"] == official["t10k-images-idx3-ubyte.gz"]
    counts = data.fetch(source, tmp_path / "raw", QUICK)
    assert counts == {"train": 60_000, "test": 10_000}
    manifest = (tmp_path / "raw" / data.MANIFEST).read_text()
    assert manifest.count('"verified": "md5"') == 4
    images, labels = data.read_pair(tmp_path / "raw", "test", 10)
    assert torch.bincount(labels).tolist() == T10K_LABEL_COUNTS


def test_official_md5_rejects_a_modified_real_file(official_folder, mnist_t10k: Path, tmp_path: Path):
    folder, synthetic_md5 = official_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in folder.iterdir():
        (bad / p.name).symlink_to(p.resolve())
    # A valid gzip of a valid IDX file, one label changed: only the MD5 can tell.
    with gzip.open(mnist_t10k / "t10k-labels-idx1-ubyte.gz") as f:
        blob = bytearray(f.read())
    blob[8] = (blob[8] + 1) % 10
    (bad / "t10k-labels-idx1-ubyte.gz").unlink()
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gz(bytes(blob)))
    msg = fetch_error(bad, tmp_path / "raw", torchvision="MNIST",
                      md5={"train-images-idx3-ubyte.gz": synthetic_md5})
    assert f"{bad}/t10k-labels-idx1-ubyte.gz: MD5 mismatch (expected ec29112dd5afa0611ce80d1b7f02629c" in msg
    assert not (tmp_path / "raw").exists()


def test_official_dataset_requires_its_test_set(official_folder, tmp_path: Path):
    """An MD5 pins the t10k files: an official dataset is never silently given a carved test set."""
    folder, synthetic_md5 = official_folder
    partial = tmp_path / "partial"
    partial.mkdir()
    for p in folder.iterdir():
        if not p.name.startswith("t10k"):
            (partial / p.name).symlink_to(p.resolve())
    msg = fetch_error(partial, tmp_path / "raw", torchvision="MNIST",
                      md5={"train-images-idx3-ubyte.gz": synthetic_md5})
    assert "could not get t10k-images-idx3-ubyte.gz" in msg and "no t10k-images-idx3-ubyte.gz or" in msg


# --------------------------------------------------------------------------- local folders


@pytest.mark.parametrize("gzipped", [True, False])
def test_folder_source_gzipped_or_not(tmp_path: Path, gzipped: bool):
    files = dataset_files()
    src = write_folder(tmp_path / "src", files, gzipped=gzipped)
    out = tmp_path / "raw"
    assert data.fetch(folder_source(src), out, QUICK) == {"train": 60, "test": 20}
    for name, blob in files.items():
        assert (out / name).read_bytes() == blob
    assert not list(out.glob("*.gz"))  # local files are not duplicated, only extracted
    assert not list(tmp_path.glob(".raw.*"))  # no staging leftovers


def test_folder_without_test_pair_is_fine(tmp_path: Path):
    src = write_folder(tmp_path / "src", dataset_files(test=False))
    assert data.fetch(folder_source(src), tmp_path / "raw", QUICK) == {"train": 60}


def test_test_images_without_labels_is_an_error(tmp_path: Path):
    files = dataset_files()
    del files[data.LABELS["test"]]
    src = write_folder(tmp_path / "src", files)
    msg = fetch_error(src, tmp_path / "raw")
    assert "found t10k-images-idx3-ubyte but not t10k-labels-idx1-ubyte" in msg


def test_rerun_replaces_stale_files(tmp_path: Path):
    """dvc.yaml persists data/raw/<name>: a source without a test set must not inherit the old one."""
    out = tmp_path / "raw"
    data.fetch(folder_source(write_folder(tmp_path / "a", dataset_files())), out, QUICK)
    assert (out / data.IMAGES["test"]).exists()
    (out / "junk.txt").write_text("left by hand")
    data.fetch(folder_source(write_folder(tmp_path / "b", dataset_files(n_train=40, test=False))), out, QUICK)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [data.IMAGES["train"], data.LABELS["train"], data.MANIFEST])
    assert data.validate_raw(out, 10) == {"train": 40}


# --------------------------------------------------------------------------- validation errors


def _corrupt(files: dict[str, bytes], case: str) -> tuple[dict[str, bytes], str]:
    """Break one file of a good dataset; return the files and the file name blamed."""
    img, lab = data.IMAGES["train"], data.LABELS["train"]
    if case == "bad magic":
        files[img] = b"\x12\x34" + files[img][2:]
        return files, img
    if case == "wrong dtype":
        files[img] = files[img][:2] + b"\x0d" + files[img][3:]  # 0x0D = float32
        return files, img
    if case == "32x32":
        files[img] = idx_bytes(torch.zeros(60, 32, 32))
        return files, img
    if case == "count mismatch":
        files[lab] = idx_bytes(torch.arange(59) % 10)
        return files, img
    if case == "label out of range":
        files[lab] = idx_bytes(torch.arange(60) % 11)
        return files, lab
    if case == "truncated idx":
        files[img] = files[img][:-100]
        return files, img
    if case == "trailing bytes":
        files[img] = files[img] + b"\0" * 7
        return files, img
    if case == "labels as images":
        files[img] = files[lab]
        return files, img
    if case == "empty":
        files[img], files[lab] = idx_bytes(torch.zeros(0, 28, 28)), idx_bytes(torch.zeros(0))
        return files, img
    raise AssertionError(case)


@pytest.mark.parametrize("case, match", [
    ("bad magic", r"not an IDX file \(bad magic 0x12340803\)"),
    ("wrong dtype", r"IDX dtype 0x0d is not unsigned byte \(0x08\)"),
    ("32x32", r"images are 32x32, expected 28x28"),
    ("count mismatch", r"60 images but .*train-labels-idx1-ubyte.gz has 59 labels"),
    ("label out of range", r"label 10 out of range 0\.\.9 \(5 such labels\)"),
    ("truncated idx", r"truncated IDX file \(46956 bytes, the header's 60 images need 47056\)"),
    ("trailing bytes", r"7 trailing bytes after the IDX data"),
    ("labels as images", r"1-d IDX where images need 3-d"),
    ("empty", r"no samples"),  # torchvision cannot even parse it
])
def test_idx_validation_errors_name_the_source_file(tmp_path: Path, case: str, match: str):
    files, blamed = _corrupt(dataset_files(), case)
    src = write_folder(tmp_path / "src", files)
    out = tmp_path / "raw"
    msg = fetch_error(src, out)
    assert msg.startswith(f"{src}/{blamed}.gz: "), msg  # names the file the user gave, not a temp copy
    assert re.search(match, msg), msg
    assert not out.exists()


def test_idx_validation_of_an_existing_raw_folder(tmp_path: Path):
    """The split stage parses data/raw/<name> itself: the same checks, naming that path."""
    files, _ = _corrupt(dataset_files(), "32x32")
    write_folder(tmp_path, files, gzipped=False)
    with raises_one_line(rf"^{tmp_path}/train-images-idx3-ubyte: images are 32x32, expected 28x28$"):
        data.read_pair(tmp_path, "train", 10)
    with raises_one_line(r"t10k-images-idx3-ubyte: file not found \(run the download stage first\)"):
        data.read_pair(tmp_path / "nowhere", "test", 10)


def test_labels_checked_against_the_class_list(tmp_path: Path):
    src = write_folder(tmp_path / "src", dataset_files(num_classes=10))
    msg = fetch_error(src, tmp_path / "raw", classes=["a", "b", "c"])
    assert "train-labels-idx1-ubyte.gz: label 3 out of range 0..2" in msg


@pytest.mark.parametrize("case, match", [
    ("not gzip", r"train-images-idx3-ubyte.gz: named .gz but is not a gzip file \(47056 bytes\)"),
    ("truncated gzip", r"train-images-idx3-ubyte.gz: truncated gzip \(\d+ bytes\)"),
    ("corrupt gzip", r"train-images-idx3-ubyte.gz: corrupt gzip \(CRC check failed"),
])
def test_gzip_errors(tmp_path: Path, case: str, match: str):
    src = write_folder(tmp_path / "src", dataset_files())
    target = src / f"{data.IMAGES['train']}.gz"
    blob = target.read_bytes()
    if case == "not gzip":
        blob = idx_bytes(make_pair(60)[0])
    elif case == "truncated gzip":
        blob = blob[: len(blob) // 2]
    else:
        blob = blob[:-8] + bytes(4) + blob[-4:]  # wrong CRC32 in the gzip trailer
    target.write_bytes(blob)
    msg = fetch_error(src, tmp_path / "raw")
    assert re.search(match, msg), msg
    assert f"{src}/train-images-idx3-ubyte.gz" in msg
    assert "Offline?" not in msg  # local folders only: the network hint would mislead


def test_missing_folder_and_missing_file(tmp_path: Path):
    msg = fetch_error(tmp_path / "nowhere", tmp_path / "raw")
    assert f"could not get train-images-idx3-ubyte.gz from any mirror (tried: {tmp_path}/nowhere: folder not found)" in msg
    files = dataset_files()
    del files[data.LABELS["train"]]
    src = write_folder(tmp_path / "src", files)
    msg = fetch_error(src, tmp_path / "raw")
    assert f"{src}: no train-labels-idx1-ubyte.gz or train-labels-idx1-ubyte" in msg


def test_next_mirror_after_a_bad_local_file(tmp_path: Path):
    bad = write_folder(tmp_path / "bad", dataset_files())
    (bad / f"{data.IMAGES['train']}.gz").write_bytes(b"\x1f\x8b garbage")
    good = write_folder(tmp_path / "good", dataset_files())
    src = data.resolve_source({"sources": {"x": {"mirrors": [str(bad), str(good)]}}}, "x")
    assert data.fetch(src, tmp_path / "raw", QUICK) == {"train": 60, "test": 20}


def test_failed_rerun_keeps_the_earlier_raw_folder(tmp_path: Path):
    src = write_folder(tmp_path / "src", dataset_files())
    out = tmp_path / "raw"
    data.fetch(folder_source(src), out, QUICK)
    before = tree_digest(out)
    (src / f"{data.LABELS['test']}.gz").write_bytes(gz(idx_bytes(torch.full((20,), 12))))
    msg = fetch_error(src, out)
    assert "label 12 out of range" in msg
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]  # no staging left behind


# --------------------------------------------------------------------------- the stage script


@pytest.mark.slow  # runs the stage script in a subprocess
def test_download_stage_errors_exit_2_with_one_line(tmp_path: Path):
    files, _ = _corrupt(dataset_files(), "bad magic")
    write_folder(tmp_path / "bad", files)
    write_folder(tmp_path / "good", dataset_files())
    params = {"sources": {"bad": "bad", "good": "good", "digits": {"embedded": "sklearn_digits"}}}

    p = run_stage("download.py", "--dataset", "bad", "--out", "raw/bad", params=params, cwd=tmp_path)
    assert_one_line_error(p, "error: bad/train-images-idx3-ubyte.gz: not an IDX file (bad magic 0x12340803)")
    assert not (tmp_path / "raw" / "bad").exists()

    p = run_stage("download.py", "--dataset", "nope", "--out", "raw/nope", cwd=tmp_path)
    assert_one_line_error(p, "unknown dataset 'nope'", "known: bad, digits, good")

    p = run_stage("download.py", "--dataset", "good", "--out", "raw/good", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "good: train 60, test 20 samples verified in raw/good" in p.stdout


@pytest.mark.slow  # runs the stage script in a subprocess
def test_download_stage_missing_params_file(tmp_path: Path):
    p = run_stage("download.py", "--dataset", "x", "--out", "raw", "--params", "nope.yaml", cwd=tmp_path)
    assert_one_line_error(p, "nope.yaml: params file not found")


# --------------------------------------------------------------------------- embedded digits


def test_digits_in_mnist_layout():
    t0 = time.perf_counter()
    images, labels = data.digits_as_mnist()
    assert time.perf_counter() - t0 < 10
    assert images.shape == (1797, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # the digit fills the centred 20x20 box; the 4-pixel border stays black, as in MNIST
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert images[:, border].max() == 0
    assert images.max() == 255 and images[:, 4:24, 4:24].float().mean() > 40
    from sklearn.datasets import load_digits

    # Shrinking the 20x20 box back to 8x8 gives (a blurred copy of) the source image, 0..16 → 0..255.
    raw = torch.from_numpy(load_digits().images).float() * 255 / 16  # [N,8,8]
    box = images[:, None, 4:24, 4:24].float()  # [N,1,20,20]
    back = torch.nn.functional.interpolate(box, size=(8, 8), mode="area")[:, 0]  # [N,8,8]
    assert abs(back.mean() - raw.mean()) < 1
    assert torch.corrcoef(torch.stack([back.flatten(), raw.flatten()]))[0, 1] > 0.95


def test_digits_stage_writes_the_train_pair_only(tmp_path: Path):
    out = tmp_path / "raw"
    (out).mkdir()
    (out / data.IMAGES["test"]).write_bytes(b"stale")
    assert data.fetch(data.Source("digits", embedded="sklearn_digits"), out, QUICK) == {"train": 1797}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [data.IMAGES["train"], data.LABELS["train"], data.MANIFEST])
    images, labels = data.read_pair(out, "train", 10)
    assert torch.equal(images, data.digits_as_mnist()[0])


def test_write_idx_round_trips(tmp_path: Path):
    x, y = make_pair(7)
    data.write_idx(tmp_path / data.IMAGES["train"], x)
    data.write_idx(tmp_path / data.LABELS["train"], y)
    assert (tmp_path / data.IMAGES["train"]).read_bytes() == idx_bytes(x)
    xi, yi = data.read_pair(tmp_path, "train", 10)
    assert torch.equal(xi, x) and torch.equal(yi, y)


def test_leftover_staging_from_a_killed_run_is_cleared(tmp_path: Path):
    """A killed run leaves a staging folder; the next run clears it."""
    out = tmp_path / "raw"
    leftover = tmp_path / ".raw.abc.partial"
    leftover.mkdir()
    (leftover / "x").write_bytes(b"1")
    data.fetch(data.Source("digits", embedded="sklearn_digits"), out, QUICK)
    assert not leftover.exists()
    shutil.rmtree(out)

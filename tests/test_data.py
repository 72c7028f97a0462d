"""Sources, IDX parsing and validation, the embedded digits, and the real MNIST files.

Every test builds its own files in ``tmp_path``, with the small synthetic-IDX helpers
of ``helpers.data`` (which the other data tests use too).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import torchvision.datasets as tvd
from helpers.checks import assert_one_line_error
from helpers.data import (
    QUICK,
    corrupt,
    dataset_files,
    gz,
    idx_bytes,
    make_pair,
    manifest_verified,
    md5,
    official_spec,
    regz,
    tree_digest,
    write_folder,
)
from helpers.repo import SHARED, committed_params, run_stage

from mnistlab.artifacts import load_split
from mnistlab.config import DownloadSettings
from mnistlab.data.digits import digits_as_mnist
from mnistlab.data.download import MANIFEST, fetch
from mnistlab.data.idx import FILES, IMAGES, LABELS, read_pair, validate_raw, write_idx
from mnistlab.data.sources import OFFICIAL_CONTENT_MD5, Source, is_url, resolve_source
from mnistlab.data.split import split
from mnistlab.errors import MnistlabError

T10K_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# --------------------------------------------------------------------------- helpers


def folder_source(folder: Path | str, **spec) -> Source:
    return resolve_source({"sources": {"byo": {"mirrors": [str(folder)], **spec}}}, "byo")


def raises_one_line(match: str):
    """pytest.raises(MnistlabError) whose message is one line and matches ``match`` (a regex)."""
    return pytest.raises(MnistlabError, match=match)


def fetch_error(folder: Path, out: Path, **spec) -> str:
    with raises_one_line(".") as e:
        fetch(folder_source(folder, **spec), out, QUICK)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- sources


def test_params_yaml_sources_resolve():
    params = committed_params()
    for name in params["sources"]:
        resolve_source(params, name)
    assert resolve_source(params, "digits").embedded == "sklearn_digits"
    assert "digits" in params["datasets"]


def test_torchvision_sources_take_official_md5s_mirrors_and_classes():
    mnist = resolve_source({"sources": {"m": {"torchvision": "MNIST"}}}, "m")
    assert mnist.md5 == dict(tvd.MNIST.resources)
    assert mnist.mirrors == tuple(tvd.MNIST.mirrors)
    assert mnist.classes == tuple(str(i) for i in range(10))

    fashion = resolve_source(
        {"sources": {"f": {"torchvision": "FashionMNIST", "mirrors": ["/org/mirror"]}}}, "f")
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes == tuple(tvd.FashionMNIST.classes)
    assert fashion.mirrors == ("/org/mirror",)  # overridable from params.yaml
    assert fashion.md5["train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"

    kmnist = resolve_source({"sources": {"k": {"torchvision": "KMNIST"}}}, "k")
    assert kmnist.classes == tuple(tvd.KMNIST.classes)


def test_md5_override_and_string_source(tmp_path: Path):
    s = resolve_source({"sources": {"m": {"torchvision": "MNIST", "mirrors": "/x",
                                          "md5": {"train-images-idx3-ubyte.gz": "A" * 32}}}}, "m")
    assert s.md5["train-images-idx3-ubyte.gz"] == "a" * 32
    assert s.md5["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    s = resolve_source({"sources": {"b": str(tmp_path)}}, "b")
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
    ({"mirrors": ["/x"], "content_md5": {"train-images-idx3-ubyte.gz": "a" * 32}},
     r"^params\.yaml: sources\.x\.content_md5: unknown file 'train-images-idx3-ubyte\.gz' "
     r"\(valid: the uncompressed official MNIST names: train-images-idx3-ubyte, "),
    ({"mirrors": ["/x"], "content_md5": {"train-images-idx3-ubyte": "xyz"}},
     r"^params\.yaml: sources\.x\.content_md5\.train-images-idx3-ubyte: not an MD5 \(got 'xyz'\)$"),
    ({"mirrors": ["/x"], "content_md5": {"t10k-labels-idx1-ubyte": "g" * 32}},
     r"^params\.yaml: sources\.x\.content_md5\.t10k-labels-idx1-ubyte: not an MD5"),
    ({"mirrors": ["/x"], "content_sha256": {"t10k-labels-idx1-ubyte": "a" * 32}},
     r"^params\.yaml: sources\.x\.content_sha256\.t10k-labels-idx1-ubyte: not a SHA-256"),
    ({"torchvision": "MNIST", "content_sha256": {"train": "a" * 64}},
     r"^params\.yaml: sources\.x\.content_sha256: unknown file 'train'"),
    ({"mirrors": ["/x"], "content_md5": ["a" * 32]},
     r"^params\.yaml: sources\.x\.content_md5 must map uncompressed file names to MD5s$"),
    ({"mirrors": ["/x"], "classes": ["a"]}, r"sources\.x\.classes must list 2 to 256 distinct names"),
    ({"mirrors": ["/x"], "classes": ["a", "a"]}, r"distinct"),
    (42, r"sources\.x must be a path, a URL or a mapping"),
])
def test_bad_source_specs(spec, match):
    with raises_one_line(match) as e:
        resolve_source({"sources": {"x": spec}}, "x")
    assert "\n" not in str(e.value)


def test_torchvision_sources_take_official_content_md5s():
    for name in ("MNIST", "FashionMNIST"):
        s = resolve_source({"sources": {"m": {"torchvision": name}}}, "m")
        assert s.content_md5 == OFFICIAL_CONTENT_MD5[name] and set(s.content_md5) == set(FILES)
        assert s.content_sha256 == {}
    kmnist = resolve_source({"sources": {"k": {"torchvision": "KMNIST"}}}, "k")
    assert kmnist.content_md5 == {} and kmnist.md5 == dict(tvd.KMNIST.resources)  # .gz MD5s only
    # params.yaml overrides per file; the built-in ones stay for the others
    s = resolve_source({"sources": {"m": {
        "torchvision": "MNIST", "content_md5": {"train-images-idx3-ubyte": "A" * 32},
        "content_sha256": {"t10k-labels-idx1-ubyte": "b" * 64}}}}, "m")
    assert s.content_md5["train-images-idx3-ubyte"] == "a" * 32
    assert s.content_md5["t10k-labels-idx1-ubyte"] == "27ae3e4e09519cfbb04c329615203637"
    assert s.content_sha256 == {"t10k-labels-idx1-ubyte": "b" * 64}
    # the positional order of Source is unchanged; the new fields default to empty
    assert Source("x", ("/m",), {"a": "b"}).content_md5 == {}


def test_params_yaml_lists_local_folders_first():
    params = committed_params()
    fashion = resolve_source(params, "fashion_mnist")
    assert fashion.mirrors[:2] == ("/usr/share/datasets/fashion-mnist", "../shared/datasets/fashion-mnist")
    assert all(is_url(m) for m in fashion.mirrors[2:]) and len(fashion.mirrors) > 2
    assert fashion.content_md5 == OFFICIAL_CONTENT_MD5["FashionMNIST"]
    assert fashion.md5 == dict(tvd.FashionMNIST.resources)
    mnist = resolve_source(params, "mnist")
    assert mnist.mirrors[0] == "../shared/datasets/mnist" and is_url(mnist.mirrors[1])
    assert mnist.content_md5 == OFFICIAL_CONTENT_MD5["MNIST"]


def test_unknown_dataset_lists_known_ones():
    with raises_one_line(r"unknown dataset 'nope': add it under 'sources' in params\.yaml \(known: a, b\)"):
        resolve_source({"sources": {"b": "/x", "a": "/y"}}, "nope")


@pytest.mark.parametrize("section, match", [
    ({"timeout": 0}, r"download\.timeout must be a positive number"),
    ({"retries": 0}, r"download\.retries must be a positive integer"),
    ({"retries": 1.5}, r"download\.retries must be a positive integer"),
    ({"backoff": -1}, r"download\.backoff must be a number >= 0"),
    ({"retry": 3}, r"download: unknown key\(s\) retry"),
])
def test_bad_download_settings(section, match):
    with raises_one_line(match):
        DownloadSettings.from_params({"download": section})


# --------------------------------------------------------------------------- the real MNIST files


def _gunzip(src: Path, dest: Path) -> None:
    with gzip.open(src) as f:
        dest.write_bytes(f.read())


def test_real_t10k_files_parse(mnist_t10k: Path, tmp_path: Path):
    for name in (IMAGES["test"], LABELS["test"], LABELS["train"]):
        _gunzip(mnist_t10k / f"{name}.gz", tmp_path / name)
    images, labels = read_pair(tmp_path, "test", 10)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == T10K_LABEL_COUNTS
    assert 0 < images.float().mean() < 255 and images.max() == 255
    from torchvision.datasets.mnist import read_label_file

    assert torch.bincount(read_label_file(str(tmp_path / LABELS["train"])).long()).tolist() == TRAIN_LABEL_COUNTS


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory, mnist_t10k: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """A local mirror with three real official files and a synthetic train-images file.

    The 60,000 official training images are not in ``mnist-t10k``, so
    train-images-idx3-ubyte.gz is 60,000 blank 28x28 images and its official MD5
    and content MD5 are overridden (the returned source keys). The other three
    files are checked against torchvision.datasets.MNIST.resources and
    OFFICIAL_CONTENT_MD5, unmodified.
    """
    folder = tmp_path_factory.mktemp("official")
    for name in (IMAGES["test"], LABELS["test"], LABELS["train"]):
        (folder / f"{name}.gz").symlink_to(mnist_t10k / f"{name}.gz")
    raw = idx_bytes(torch.zeros(60_000, 28, 28, dtype=torch.uint8))
    blank = gz(raw)
    (folder / f"{IMAGES['train']}.gz").write_bytes(blank)
    return folder, {"md5": {f"{IMAGES['train']}.gz": md5(blank)},
                    "content_md5": {IMAGES["train"]: md5(raw)}}


def test_official_md5s_verify_the_real_files(official_folder, tmp_path: Path):
    folder, synthetic = official_folder
    official = dict(tvd.MNIST.resources)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        assert md5((folder / name).read_bytes()) == official[name]  # the files are the real ones

    source = resolve_source({"sources": {"mnist": {
        "torchvision": "MNIST", "mirrors": [str(folder)], **synthetic}}}, "mnist")
    assert source.md5["t10k-images-idx3-ubyte.gz"] == official["t10k-images-idx3-ubyte.gz"]
    counts = fetch(source, tmp_path / "raw", QUICK)
    assert counts == {"train": 60_000, "test": 10_000}
    manifest = (tmp_path / "raw" / MANIFEST).read_text()
    assert manifest.count('"verified": "md5+content-md5"') == 4  # the official .gz and its content
    images, labels = read_pair(tmp_path / "raw", "test", 10)
    assert torch.bincount(labels).tolist() == T10K_LABEL_COUNTS


def test_official_md5_rejects_a_modified_real_file(official_folder, mnist_t10k: Path, tmp_path: Path):
    folder, synthetic = official_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in folder.iterdir():
        (bad / p.name).symlink_to(p.resolve())
    # A valid gzip of a valid IDX file, one label changed: only a digest can tell, and
    # since it is re-compressed anyway, only the content digest can tell it from a
    # harmless re-compressed copy.
    with gzip.open(mnist_t10k / "t10k-labels-idx1-ubyte.gz") as f:
        blob = bytearray(f.read())
    blob[8] = (blob[8] + 1) % 10
    (bad / "t10k-labels-idx1-ubyte.gz").unlink()
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gz(bytes(blob)))
    msg = fetch_error(bad, tmp_path / "raw", torchvision="MNIST", **synthetic)
    assert (f"{bad}/t10k-labels-idx1-ubyte.gz: content MD5 mismatch "
            f"(expected 27ae3e4e09519cfbb04c329615203637, got {md5(bytes(blob))})") in msg
    assert not (tmp_path / "raw").exists()


def test_official_dataset_requires_its_test_set(official_folder, tmp_path: Path):
    """An MD5 pins the t10k files: an official dataset is never silently given a carved test set."""
    folder, synthetic = official_folder
    partial = tmp_path / "partial"
    partial.mkdir()
    for p in folder.iterdir():
        if not p.name.startswith("t10k"):
            (partial / p.name).symlink_to(p.resolve())
    msg = fetch_error(partial, tmp_path / "raw", torchvision="MNIST", **synthetic)
    assert "could not get t10k-images-idx3-ubyte.gz" in msg and "no t10k-images-idx3-ubyte.gz or" in msg


# --------------------------------------------------------------------------- content digests


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def test_uncompressed_official_mnist_verifies_by_content(tmp_path: Path, caplog):
    """../shared/datasets/mnist: the official MNIST, uncompressed; the .gz MD5s cannot apply."""
    folder = shared_dataset("mnist")
    assert all((folder / f).is_file() for f in FILES)
    source = resolve_source({"sources": {"mnist": {"torchvision": "MNIST",
                                                   "mirrors": [str(folder)]}}}, "mnist")
    with caplog.at_level(logging.INFO, logger="mnistlab.data.download"):
        assert fetch(source, tmp_path / "raw", QUICK) == {"train": 60_000, "test": 10_000}
    assert manifest_verified(tmp_path / "raw") == {"content-md5"}
    assert "not verified" not in caplog.text and "differs from the official file" not in caplog.text
    assert torch.bincount(read_pair(tmp_path / "raw", "train", 10)[1]).tolist() == TRAIN_LABEL_COUNTS


def test_recompressed_official_fashion_mnist_verifies_by_content(tmp_path: Path, caplog):
    """../shared/datasets/fashion-mnist: Debian's re-compressed copy; its .gz MD5s are not
    torchvision's, its content is the official data. A missing first folder is skipped."""
    folder = shared_dataset("fashion-mnist")
    official = dict(tvd.FashionMNIST.resources)
    assert md5((folder / "train-labels-idx1-ubyte.gz").read_bytes()) != official["train-labels-idx1-ubyte.gz"]
    source = resolve_source({"sources": {"fashion_mnist": {
        "torchvision": "FashionMNIST", "mirrors": [str(tmp_path / "nowhere"), str(folder)]}}}, "fashion_mnist")
    with caplog.at_level(logging.INFO, logger="mnistlab.data.download"):
        assert fetch(source, tmp_path / "raw", QUICK) == {"train": 60_000, "test": 10_000}
    assert manifest_verified(tmp_path / "raw") == {"content-md5"}
    assert f"{folder}/train-images-idx3-ubyte.gz: differs from the official file (MD5 mismatch " \
           f"(expected {official['train-images-idx3-ubyte.gz']}, got " in caplog.text
    assert "but its content matches" in caplog.text
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("copy, verified", [
    ("official", "md5+content-md5"),
    ("recompressed", "content-md5"),
    ("uncompressed", "content-md5"),
])
def test_content_md5_accepts_other_containers_of_the_same_data(tmp_path: Path, caplog, copy: str,
                                                                verified: str):
    files = dataset_files()
    src = tmp_path / "src"
    if copy == "recompressed":
        src.mkdir()
        for name, blob in files.items():
            (src / f"{name}.gz").write_bytes(regz(blob))
    else:
        write_folder(src, files, gzipped=copy == "official")
    out = tmp_path / "raw"
    with caplog.at_level(logging.INFO, logger="mnistlab.data.download"):
        assert fetch(folder_source(src, **official_spec(files)), out, QUICK) == {"train": 60, "test": 20}
    for name, blob in files.items():
        assert (out / name).read_bytes() == blob
    assert manifest_verified(out) == {verified}
    assert ("differs from the official file (MD5 mismatch" in caplog.text) == (copy == "recompressed")
    assert "not verified" not in caplog.text


@pytest.mark.parametrize("copy", ["recompressed", "official gzip settings", "uncompressed"])
@pytest.mark.parametrize("container_pins", [True, False])
def test_one_changed_content_byte_is_refused(tmp_path: Path, copy: str, container_pins: bool):
    """A valid gzip of a valid IDX file, one label changed: only the content digest
    tells it from a re-compressed copy of the official file."""
    files = dataset_files()
    spec = official_spec(files)
    if not container_pins:
        del spec["md5"]
    name = LABELS["train"]
    changed = bytearray(files[name])
    changed[-1] = (changed[-1] + 1) % 10
    src = write_folder(tmp_path / "src", {**files, name: bytes(changed)}, gzipped=copy != "uncompressed")
    if copy == "recompressed":
        (src / f"{name}.gz").write_bytes(regz(bytes(changed)))
    out = tmp_path / "raw"
    msg = fetch_error(src, out, **spec)
    shown = f"{src}/{name}" + ("" if copy == "uncompressed" else ".gz")
    assert msg == (f"dataset 'byo': could not get {name}.gz from any mirror (tried: {shown}: content MD5 "
                   f"mismatch (expected {md5(files[name])}, got {md5(bytes(changed))}))")
    assert not out.exists()


def test_content_sha256(tmp_path: Path):
    files = dataset_files()
    src = tmp_path / "src"
    src.mkdir()
    for name, blob in files.items():
        (src / f"{name}.gz").write_bytes(regz(blob))
    pins = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    out = tmp_path / "raw"
    fetch(folder_source(src, content_sha256=pins), out, QUICK)
    assert manifest_verified(out) == {"content-sha256"}
    fetch(folder_source(src, content_sha256=pins, content_md5={n: md5(b) for n, b in files.items()}),
          out, QUICK)
    assert manifest_verified(out) == {"content-md5+content-sha256"}
    wrong = {**pins, IMAGES["test"]: "0" * 64}
    msg = fetch_error(src, tmp_path / "other", content_sha256=wrong)
    assert (f"{src}/{IMAGES['test']}.gz: content SHA-256 mismatch (expected {'0' * 64}, "
            f"got {pins[IMAGES['test']]})") in msg


def test_content_digest_pins_the_test_pair(tmp_path: Path):
    """A content digest for a t10k file makes the test pair required, as an MD5 does."""
    files = dataset_files()
    src = write_folder(tmp_path / "src", {n: b for n, b in files.items() if not n.startswith("t10k")})
    msg = fetch_error(src, tmp_path / "raw", content_md5={LABELS["test"]: md5(files[LABELS["test"]])})
    assert msg.startswith("dataset 'byo': could not get t10k-labels-idx1-ubyte.gz from any mirror (tried: "
                          f"{src}: no t10k-labels-idx1-ubyte.gz or t10k-labels-idx1-ubyte)")
    assert fetch(folder_source(src, content_md5={LABELS["train"]: md5(files[LABELS["train"]])}),
                 tmp_path / "raw", QUICK) == {"train": 60}


def test_missing_first_folder_is_skipped(tmp_path: Path, caplog):
    src = write_folder(tmp_path / "src", dataset_files())
    source = resolve_source({"sources": {"x": {"mirrors": [str(tmp_path / "nowhere"), str(src)]}}}, "x")
    with caplog.at_level(logging.INFO, logger="mnistlab.data.download"):
        assert fetch(source, tmp_path / "raw", QUICK) == {"train": 60, "test": 20}
    assert "nowhere" not in caplog.text  # skipped without a word
    files = json.loads((tmp_path / "raw" / MANIFEST).read_text())["files"]
    assert {e["from"] for e in files.values()} == {f"{src}/{n}.gz" for n in FILES}


# --------------------------------------------------------------------------- local folders


@pytest.mark.parametrize("gzipped", [True, False])
def test_folder_source_gzipped_or_not(tmp_path: Path, gzipped: bool):
    files = dataset_files()
    src = write_folder(tmp_path / "src", files, gzipped=gzipped)
    out = tmp_path / "raw"
    assert fetch(folder_source(src), out, QUICK) == {"train": 60, "test": 20}
    for name, blob in files.items():
        assert (out / name).read_bytes() == blob
    assert not list(out.glob("*.gz"))  # local files are not duplicated, only extracted
    assert not list(tmp_path.glob(".raw.*"))  # no staging leftovers


def test_folder_without_test_pair_is_fine(tmp_path: Path):
    src = write_folder(tmp_path / "src", dataset_files(test=False))
    assert fetch(folder_source(src), tmp_path / "raw", QUICK) == {"train": 60}


def test_relative_folder_is_found_from_a_queued_experiments_copy(tmp_path: Path, monkeypatch):
    """`dvc exp run --queue` / `--temp` run the stages in <repo>/.dvc/tmp/exps/<...>/, a copy
    of the tracked files only: params.yaml's ``../shared/datasets/...`` means <repo>/../shared
    there too, not a folder beside the copy (found by a new user: download failed offline)."""
    repo = tmp_path / "work" / "repo"
    src = write_folder(tmp_path / "work" / "shared" / "byo", dataset_files())
    for copy in (repo / ".dvc/tmp/exps/tmpa1b2c3", repo / ".dvc/tmp/exps/run/4f5e6d"):
        copy.mkdir(parents=True)
        monkeypatch.chdir(copy)
        out = copy / "data" / "raw"
        assert fetch(folder_source("../shared/byo"), out, QUICK) == {"train": 60, "test": 20}
        files = json.loads((out / MANIFEST).read_text())["files"]
        assert {e["from"] for e in files.values()} == {f"{src}/{n}.gz" for n in FILES}
    monkeypatch.chdir(repo)  # the workspace itself: relative to it, as ever
    assert fetch(folder_source("../shared/byo"), repo / "raw", QUICK) == {"train": 60, "test": 20}
    monkeypatch.chdir(repo / ".dvc")  # not inside an experiment's copy: no rebasing
    with raises_one_line(r"\.\./shared/byo: folder not found"):
        fetch(folder_source("../shared/byo"), tmp_path / "raw2", QUICK)


def test_test_images_without_labels_is_an_error(tmp_path: Path):
    files = dataset_files()
    del files[LABELS["test"]]
    src = write_folder(tmp_path / "src", files)
    msg = fetch_error(src, tmp_path / "raw")
    assert "found t10k-images-idx3-ubyte but not t10k-labels-idx1-ubyte" in msg


def test_rerun_replaces_stale_files(tmp_path: Path):
    """dvc.yaml persists data/raw/<name>: a source without a test set must not inherit the old one."""
    out = tmp_path / "raw"
    fetch(folder_source(write_folder(tmp_path / "a", dataset_files())), out, QUICK)
    assert (out / IMAGES["test"]).exists()
    (out / "junk.txt").write_text("left by hand")
    fetch(folder_source(write_folder(tmp_path / "b", dataset_files(n_train=40, test=False))), out, QUICK)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [IMAGES["train"], LABELS["train"], MANIFEST])
    assert validate_raw(out, 10) == {"train": 40}


# --------------------------------------------------------------------------- take: the first N/M samples


def take_source(folder: Path | str, take, **spec) -> Source:
    return folder_source(folder, take=take, **spec)


def raw_manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


@pytest.mark.parametrize("gzipped", [True, False])
def test_take_keeps_the_first_samples_in_file_order(tmp_path: Path, gzipped: bool):
    files = dataset_files()  # 60 train, 20 test; the index is written into pixels 0-1
    src = write_folder(tmp_path / "src", files, gzipped=gzipped)
    out = tmp_path / "raw"
    source = take_source(src, {"train": 25, "test": 7}, **official_spec(files))
    assert source.take == {"train": 25, "test": 7}
    assert fetch(source, out, QUICK) == {"train": 25, "test": 7}
    assert validate_raw(out, 10) == {"train": 25, "test": 7}
    for subset, n, seed in (("train", 25, 0), ("test", 7, 1)):
        x, y = make_pair(60 if subset == "train" else 20, seed=seed)
        images, labels = read_pair(out, subset, 10)
        assert torch.equal(images, x[:n]) and torch.equal(labels, y[:n])
        # valid IDX files, byte for byte what the full files' first rows make
        assert (out / IMAGES[subset]).read_bytes() == idx_bytes(x[:n])
        assert (out / LABELS[subset]).read_bytes() == idx_bytes(y[:n])
    manifest = raw_manifest(out)
    assert manifest["take"] == {"train": 25, "test": 7}
    # each file entry describes the full file as obtained and verified
    suffix = ".gz" if gzipped else ""
    for name, entry in manifest["files"].items():
        assert entry["from"] == f"{src}/{name}{suffix}"
        assert entry["md5"] == md5((src / f"{name}{suffix}").read_bytes())
        assert entry["verified"] == ("md5+content-md5" if gzipped else "content-md5")
    assert not list(out.glob("*.gz"))


def test_take_one_subset_or_all_of_it(tmp_path: Path):
    files = dataset_files()
    src = write_folder(tmp_path / "src", files)
    out = tmp_path / "raw"
    assert fetch(take_source(src, {"test": 5}), out, QUICK) == {"train": 60, "test": 5}
    assert (out / IMAGES["train"]).read_bytes() == files[IMAGES["train"]]
    assert raw_manifest(out)["take"] == {"test": 5}
    # as many as the file holds: the file is kept as it is
    assert fetch(take_source(src, {"train": 60, "test": 20}), out, QUICK) == {"train": 60, "test": 20}
    for name, blob in files.items():
        assert (out / name).read_bytes() == blob
    # without a take: no take in the manifest
    fetch(folder_source(src), out, QUICK)
    assert "take" not in raw_manifest(out)
    # without a test set, take.train alone is fine
    src2 = write_folder(tmp_path / "src2", dataset_files(test=False))
    assert fetch(take_source(src2, {"train": 10}), tmp_path / "raw2", QUICK) == {"train": 10}


def test_changing_take_gives_the_new_slice(tmp_path: Path):
    files = dataset_files()
    src = write_folder(tmp_path / "src", files)
    out = tmp_path / "raw"
    assert fetch(take_source(src, {"train": 10, "test": 3}), out, QUICK) == {"train": 10, "test": 3}
    assert fetch(take_source(src, {"train": 40, "test": 3}), out, QUICK) == {"train": 40, "test": 3}
    x, y = make_pair(60)
    assert torch.equal(read_pair(out, "train", 10)[0], x[:40])
    assert fetch(folder_source(src), out, QUICK) == {"train": 60, "test": 20}
    assert (out / IMAGES["train"]).read_bytes() == files[IMAGES["train"]]


@pytest.mark.parametrize("pins", ["md5 only", "md5+content"])
def test_take_still_verifies_the_full_files(tmp_path: Path, pins: str):
    """One changed byte in the last training image, far beyond the slice: still refused."""
    files = dataset_files()
    spec = official_spec(files)
    if pins == "md5 only":
        del spec["content_md5"]
    name = IMAGES["train"]
    changed = bytearray(files[name])
    changed[-1] ^= 0xFF
    src = write_folder(tmp_path / "src", {**files, name: bytes(changed)})
    out = tmp_path / "raw"
    msg = fetch_error(src, out, take={"train": 10, "test": 5}, **spec)
    if pins == "md5 only":
        want = f"MD5 mismatch (expected {md5(gz(files[name]))}, got {md5(gz(bytes(changed)))})"
    else:
        want = f"content MD5 mismatch (expected {md5(files[name])}, got {md5(bytes(changed))})"
    assert msg == f"dataset 'byo': could not get {name}.gz from any mirror (tried: {src}/{name}.gz: {want})"
    assert not out.exists()
    # the slice alone is what the good file gives: the same take of the good files works
    good = write_folder(tmp_path / "good", files)
    assert fetch(take_source(good, {"train": 10, "test": 5}, **spec), out, QUICK) == {"train": 10, "test": 5}


def test_take_still_validates_the_full_files(tmp_path: Path):
    """A label out of range beyond the slice is still an error: the full files are validated."""
    files = dataset_files()
    y = make_pair(60)[1]
    y[-1] = 12
    files[LABELS["train"]] = idx_bytes(y)
    src = write_folder(tmp_path / "src", files)
    msg = fetch_error(src, tmp_path / "raw", take={"train": 10})
    assert msg == f"{src}/{LABELS['train']}.gz: label 12 out of range 0..9 (1 such labels)"


def test_take_more_than_the_file_holds(tmp_path: Path):
    src = write_folder(tmp_path / "src", dataset_files())
    out = tmp_path / "raw"
    msg = fetch_error(src, out, take={"train": 61})
    assert msg == (f"params.yaml: sources.byo.take.train: asks for 61 samples, but "
                   f"{src}/train-images-idx3-ubyte.gz holds only 60")
    msg = fetch_error(src, out, take={"train": 8, "test": 2000})
    assert msg == (f"params.yaml: sources.byo.take.test: asks for 2000 samples, but "
                   f"{src}/t10k-images-idx3-ubyte.gz holds only 20")
    assert not out.exists()
    # a failed take leaves an earlier raw folder as it was
    fetch(take_source(src, {"train": 8}), out, QUICK)
    before = tree_digest(out)
    fetch_error(src, out, take={"train": 100})
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]  # no staging left behind

    no_test = write_folder(tmp_path / "no_test", dataset_files(test=False))
    msg = fetch_error(no_test, tmp_path / "raw2", take={"test": 5})
    assert msg == ("params.yaml: sources.byo.take.test: asks for 5 samples, but dataset 'byo' has no "
                   "test set (t10k-images-idx3-ubyte not found in any mirror)")


@pytest.mark.parametrize("take, match", [
    ({"train": 0}, r"^params\.yaml: sources\.x\.take\.train must be a positive integer \(got 0\)$"),
    ({"test": -5}, r"^params\.yaml: sources\.x\.take\.test must be a positive integer \(got -5\)$"),
    ({"train": 8000.0}, r"^params\.yaml: sources\.x\.take\.train must be a positive integer \(got 8000\.0\)$"),
    ({"train": 1.5}, r"^params\.yaml: sources\.x\.take\.train must be a positive integer \(got 1\.5\)$"),
    ({"train": True}, r"^params\.yaml: sources\.x\.take\.train must be a positive integer \(got True\)$"),
    ({"test": "2000"}, r"^params\.yaml: sources\.x\.take\.test must be a positive integer \(got '2000'\)$"),
    ({"train": None}, r"^params\.yaml: sources\.x\.take\.train must be a positive integer \(got None\)$"),
    ({"train": 10, "val": 5}, r"^params\.yaml: sources\.x\.take: unknown key\(s\) val \(valid: train, test\)$"),
    ({1: 5}, r"^params\.yaml: sources\.x\.take: unknown key\(s\) 1 \(valid: train, test\)$"),
    (8000, r"^params\.yaml: sources\.x\.take must map train and/or test to a sample count "
           r"\(e\.g\. \{train: 8000, test: 2000\}; got 8000\)$"),
    ([8000, 2000], r"^params\.yaml: sources\.x\.take must map train and/or test"),
])
def test_bad_take_specs(take, match):
    with raises_one_line(match) as e:
        resolve_source({"sources": {"x": {"mirrors": ["/x"], "take": take}}}, "x")
    assert "\n" not in str(e.value)


def test_take_is_not_for_embedded_sources():
    with raises_one_line(r"^params\.yaml: sources\.x: 'embedded' takes no other keys$"):
        resolve_source({"sources": {"x": {"embedded": "sklearn_digits", "take": {"train": 10}}}}, "x")


def test_fashion_mini_is_the_first_of_the_real_fashion_mnist(root: Path, tmp_path: Path, monkeypatch):
    """params.yaml's fashion_mini: the first 8,000/2,000 official Fashion-MNIST images
    (from ../shared, as the CI gate gets them), verified as official, then split."""
    folder = shared_dataset("fashion-mnist")
    monkeypatch.chdir(root)  # the mirrors are relative to the repo root
    params = committed_params()
    source = resolve_source(params, "fashion_mini")
    assert source.take == {"train": 8000, "test": 2000}
    assert source.content_md5 == OFFICIAL_CONTENT_MD5["FashionMNIST"]
    assert source.mirrors == resolve_source(params, "fashion_mnist").mirrors
    out = tmp_path / "raw"
    assert fetch(source, out, QUICK) == {"train": 8000, "test": 2000}

    manifest = raw_manifest(out)
    assert manifest["take"] == {"train": 8000, "test": 2000}
    assert {e["verified"] for e in manifest["files"].values()} == {"content-md5"}  # the full official content
    first = next(m for m in source.mirrors if Path(m).is_dir())
    assert {e["from"] for e in manifest["files"].values()} == {f"{first}/{f}.gz" for f in FILES}
    for subset, n in (("train", 8000), ("test", 2000)):
        for name, size in ((IMAGES[subset], 28 * 28), (LABELS[subset], 1)):
            head = 16 if size > 1 else 8
            with gzip.open(folder / f"{name}.gz") as f:
                full_head = f.read(head + n * size)  # the full file's header and first n rows
            sliced = (out / name).read_bytes()
            assert len(sliced) == head + n * size and sliced[head:] == full_head[head:]
        images, labels = read_pair(out, subset, 10)
        assert images.shape == (n, 28, 28)
        per_class = torch.bincount(labels, minlength=10)
        assert len(per_class) == 10 and (per_class > 0).all(), per_class.tolist()

    summary = split(out, tmp_path / "split", list(source.classes), 0.1, 0.2, 1234, "fashion_mini")
    assert summary["test_source"] == "official" and summary["classes"][0] == "T-shirt/top"
    assert {k: summary[k]["count"] for k in ("train", "val", "test")} == {"train": 7200, "val": 800, "test": 2000}
    for k in ("train", "val", "test"):
        assert all(c > 0 for c in summary[k]["per_class"]), (k, summary[k]["per_class"])
    x, y = load_split(tmp_path / "split", "test")
    assert torch.equal(x, read_pair(out, "test", 10)[0])


# --------------------------------------------------------------------------- validation errors


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
    files, blamed = corrupt(dataset_files(), case)
    src = write_folder(tmp_path / "src", files)
    out = tmp_path / "raw"
    msg = fetch_error(src, out)
    assert msg.startswith(f"{src}/{blamed}.gz: "), msg  # names the file the user gave, not a temp copy
    assert re.search(match, msg), msg
    assert not out.exists()


def test_idx_validation_of_an_existing_raw_folder(tmp_path: Path):
    """The split stage parses data/raw/<name> itself: the same checks, naming that path."""
    files, _ = corrupt(dataset_files(), "32x32")
    write_folder(tmp_path, files, gzipped=False)
    with raises_one_line(rf"^{tmp_path}/train-images-idx3-ubyte: images are 32x32, expected 28x28$"):
        read_pair(tmp_path, "train", 10)
    with raises_one_line(r"t10k-images-idx3-ubyte: file not found \(run the download stage first\)"):
        read_pair(tmp_path / "nowhere", "test", 10)


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
    target = src / f"{IMAGES['train']}.gz"
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
    del files[LABELS["train"]]
    src = write_folder(tmp_path / "src", files)
    msg = fetch_error(src, tmp_path / "raw")
    assert f"{src}: no train-labels-idx1-ubyte.gz or train-labels-idx1-ubyte" in msg


def test_next_mirror_after_a_bad_local_file(tmp_path: Path):
    bad = write_folder(tmp_path / "bad", dataset_files())
    (bad / f"{IMAGES['train']}.gz").write_bytes(b"\x1f\x8b garbage")
    good = write_folder(tmp_path / "good", dataset_files())
    src = resolve_source({"sources": {"x": {"mirrors": [str(bad), str(good)]}}}, "x")
    assert fetch(src, tmp_path / "raw", QUICK) == {"train": 60, "test": 20}


def test_failed_rerun_keeps_the_earlier_raw_folder(tmp_path: Path):
    src = write_folder(tmp_path / "src", dataset_files())
    out = tmp_path / "raw"
    fetch(folder_source(src), out, QUICK)
    before = tree_digest(out)
    (src / f"{LABELS['test']}.gz").write_bytes(gz(idx_bytes(torch.full((20,), 12))))
    msg = fetch_error(src, out)
    assert "label 12 out of range" in msg
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]  # no staging left behind


# --------------------------------------------------------------------------- the stage script


@pytest.mark.slow  # runs the stage script in a subprocess
def test_download_stage_errors_exit_2_with_one_line(tmp_path: Path):
    files, _ = corrupt(dataset_files(), "bad magic")
    write_folder(tmp_path / "bad", files)
    files = dataset_files()
    write_folder(tmp_path / "good", files)
    pinned = {"mirrors": ["good"], "content_md5": {n: md5(b) for n, b in files.items()}}
    params = {"sources": {"bad": "bad", "good": "good", "pinned": pinned,
                          "digits": {"embedded": "sklearn_digits"}}}

    p = run_stage("download.py", "--dataset", "bad", "--out", "raw/bad", params=params, cwd=tmp_path)
    assert_one_line_error(p, "error: bad/train-images-idx3-ubyte.gz: not an IDX file (bad magic 0x12340803)")
    assert not (tmp_path / "raw" / "bad").exists()

    p = run_stage("download.py", "--dataset", "nope", "--out", "raw/nope", cwd=tmp_path)
    assert_one_line_error(p, "unknown dataset 'nope'", "known: bad, digits, good, pinned")

    # No digest in params.yaml: used, and said to be unverified, file by file and in the summary
    # (it once read "samples verified" whatever was pinned).
    p = run_stage("download.py", "--dataset", "good", "--out", "raw/good", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert ("good: train 60, test 20 samples in raw/good, NOT verified (4 of its files have no "
            "digest in params.yaml)") in p.stdout
    for name in files:
        assert (f"good/{name}.gz: no MD5 or SHA-256 pinned for it (sources.good); "
                f"used as it is, not verified") in p.stderr
    p = run_stage("download.py", "--dataset", "pinned", "--out", "raw/pinned", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "pinned: train 60, test 20 samples verified in raw/pinned" in p.stdout
    assert "not verified" not in p.stderr


@pytest.mark.slow  # runs the stage script in a subprocess
def test_download_stage_missing_params_file(tmp_path: Path):
    p = run_stage("download.py", "--dataset", "x", "--out", "raw", "--params", "nope.yaml", cwd=tmp_path)
    assert_one_line_error(p, "nope.yaml: params file not found")


# --------------------------------------------------------------------------- embedded digits


def test_digits_in_mnist_layout():
    t0 = time.perf_counter()
    images, labels = digits_as_mnist()
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
    (out / IMAGES["test"]).write_bytes(b"stale")
    assert fetch(Source("digits", embedded="sklearn_digits"), out, QUICK) == {"train": 1797}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [IMAGES["train"], LABELS["train"], MANIFEST])
    images, labels = read_pair(out, "train", 10)
    assert torch.equal(images, digits_as_mnist()[0])


def test_write_idx_round_trips(tmp_path: Path):
    x, y = make_pair(7)
    write_idx(tmp_path / IMAGES["train"], x)
    write_idx(tmp_path / LABELS["train"], y)
    assert (tmp_path / IMAGES["train"]).read_bytes() == idx_bytes(x)
    xi, yi = read_pair(tmp_path, "train", 10)
    assert torch.equal(xi, x) and torch.equal(yi, y)


def test_leftover_staging_from_a_killed_run_is_cleared(tmp_path: Path):
    """A killed run leaves a staging folder; the next run clears it."""
    out = tmp_path / "raw"
    leftover = tmp_path / ".raw.abc.partial"
    leftover.mkdir()
    (leftover / "x").write_bytes(b"1")
    fetch(Source("digits", embedded="sklearn_digits"), out, QUICK)
    assert not leftover.exists()
    shutil.rmtree(out)

"""The split stage: stratified carve-outs, determinism, disjoint subsets, file format, errors."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers.checks import assert_one_line_error
from helpers.data import QUICK, dataset_files, idx_bytes, make_pair, tree_digest, write_folder
from helpers.repo import run_stage

from mnistlab.artifacts import load_classes, load_split, save_split
from mnistlab.data.download import fetch
from mnistlab.data.idx import IMAGES, LABELS, read_pair
from mnistlab.data.sources import Source, resolve_source
from mnistlab.data.split import split
from mnistlab.errors import MnistlabError

DIGITS = [str(i) for i in range(10)]
OUTPUTS = ("train.pt", "val.pt", "test.pt", "summary.json")


@pytest.fixture(scope="module")
def digits_raw(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("digits") / "raw"
    fetch(Source("digits", embedded="sklearn_digits"), raw, QUICK)
    return raw


@pytest.fixture(scope="module")
def mini_raw(tmp_path_factory, mnist_mini: Path) -> Path:
    raw = tmp_path_factory.mktemp("mini") / "raw"
    fetch(resolve_source({"sources": {"mnist_mini": str(mnist_mini)}}, "mnist_mini"), raw, QUICK)
    return raw


def load(out: Path, subset: str) -> tuple[torch.Tensor, torch.Tensor]:
    obj = torch.load(out / f"{subset}.pt", weights_only=True)
    return obj["images"], obj["labels"]


def image_ids(images: torch.Tensor) -> list[int]:
    """The index make_pair wrote into pixels (0,0) and (0,1)."""
    return (images[:, 0, 0].long() * 256 + images[:, 0, 1].long()).tolist()


def image_hashes(images: torch.Tensor) -> Counter:
    return Counter(hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images)


def raw_from(tmp_path: Path, files: dict[str, bytes]) -> Path:
    return write_folder(tmp_path / "raw", files, gzipped=False)


# --------------------------------------------------------------------------- digits (no test set)


def test_digits_split_is_stratified(digits_raw: Path, tmp_path: Path):
    summary = split(digits_raw, tmp_path, DIGITS, 0.1, 0.2, 1234, "digits")
    assert summary["test_source"] == "carved from train"
    assert [summary[s]["count"] for s in ("train", "val", "test")] == [1293, 144, 360]
    _, raw_labels = read_pair(digits_raw, "train", 10)
    n = torch.bincount(raw_labels, minlength=10)
    test = torch.tensor(summary["test"]["per_class"])
    val = torch.tensor(summary["val"]["per_class"])
    train = torch.tensor(summary["train"]["per_class"])
    assert torch.equal(train + val + test, n)
    # each class's share is within one sample of the exact fraction
    assert ((test - 0.2 * n).abs() <= 1).all(), (test, n)
    assert ((val - 0.1 * (n - test)).abs() <= 1).all(), (val, n - test)
    for subset in ("train", "val", "test"):
        _, y = load(tmp_path, subset)
        assert torch.bincount(y, minlength=10).tolist() == summary[subset]["per_class"]


def test_digits_subsets_partition_the_images(digits_raw: Path, tmp_path: Path):
    """Digits has duplicate images, so compare multisets: train+val+test is exactly the raw set."""
    split(digits_raw, tmp_path, DIGITS, 0.1, 0.2, 1234, "digits")
    raw_x, raw_y = read_pair(digits_raw, "train", 10)
    parts = [load(tmp_path, s) for s in ("train", "val", "test")]
    assert image_hashes(torch.cat([x for x, _ in parts])) == image_hashes(raw_x)
    pairs = Counter((hashlib.sha1(x.numpy().tobytes()).hexdigest(), int(y))
                    for px, py in parts for x, y in zip(px, py, strict=True))
    assert pairs == Counter((hashlib.sha1(x.numpy().tobytes()).hexdigest(), int(y))
                            for x, y in zip(raw_x, raw_y, strict=True))


def test_subsets_are_disjoint(tmp_path: Path):
    """Synthetic images carry their index: every sample lands in exactly one subset, label intact."""
    raw = raw_from(tmp_path, dataset_files(n_train=500, test=False))
    split(raw, tmp_path / "split", DIGITS, 0.1, 0.2, 7, "synthetic")
    ids = {s: image_ids(load(tmp_path / "split", s)[0]) for s in ("train", "val", "test")}
    assert [len(v) for v in ids.values()] == [360, 40, 100]
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == list(range(500))
    for s in ids:
        x, y = load(tmp_path / "split", s)
        assert torch.equal(y, torch.tensor(image_ids(x)) % 10)  # make_pair's labels are id % 10


def test_val_as_a_count(digits_raw: Path, tmp_path: Path):
    summary = split(digits_raw, tmp_path, DIGITS, 200, 0.2, 1234, "digits")
    assert summary["val"]["count"] == 200 and summary["test"]["count"] == 360


# --------------------------------------------------------------------------- official test set


def test_official_test_set_stays_untouched(mini_raw: Path, tmp_path: Path):
    summary = split(mini_raw, tmp_path, DIGITS, 0.1, 0.2, 1234, "mnist_mini")
    assert summary["test_source"] == "official"
    assert [summary[s]["count"] for s in ("train", "val", "test")] == [7200, 800, 2000]
    test_x, test_y = load(tmp_path, "test")
    raw_test_x, raw_test_y = read_pair(mini_raw, "test", 10)
    assert torch.equal(test_x, raw_test_x) and torch.equal(test_y, raw_test_y)  # same order too
    raw_x, raw_y = read_pair(mini_raw, "train", 10)
    n = torch.bincount(raw_y, minlength=10)
    val = torch.tensor(summary["val"]["per_class"])
    assert ((val - 0.1 * n).abs() <= 1).all()
    (tx, _), (vx, _) = load(tmp_path, "train"), load(tmp_path, "val")
    assert image_hashes(torch.cat([tx, vx])) == image_hashes(raw_x)
    assert not (set(image_hashes(tx)) & set(image_hashes(test_x)))  # the mini set has no leaks


def test_synthetic_official_test_set(tmp_path: Path):
    files = dataset_files(n_train=200, n_test=50)
    raw = raw_from(tmp_path, files)
    summary = split(raw, tmp_path / "split", DIGITS, 0.25, 0.5, 3, "synthetic")
    assert [summary[s]["count"] for s in ("train", "val", "test")] == [150, 50, 50]
    assert idx_bytes(load(tmp_path / "split", "test")[0]) == files[IMAGES["test"]]


# --------------------------------------------------------------------------- format and determinism


def test_files_are_plain_tensors(digits_raw: Path, tmp_path: Path):
    summary = split(digits_raw, tmp_path, DIGITS, 0.1, 0.2, 1234, "digits")
    for subset in ("train", "val", "test"):
        obj = torch.load(tmp_path / f"{subset}.pt", weights_only=True)
        assert set(obj) == {"images", "labels"}
        x, y = obj["images"], obj["labels"]
        assert x.dtype == torch.uint8 and x.dim() == 3 and x.shape[1:] == (28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(x),) == (summary[subset]["count"],)
        assert x.untyped_storage().nbytes() == x.numel()  # saved compactly, not a view of the whole set
        lx, ly = load_split(tmp_path, subset)
        assert torch.equal(lx, x) and torch.equal(ly, y)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert load_classes(tmp_path) == DIGITS


@pytest.mark.parametrize(("subset", "labels", "fragment"), [
    ("test", [3, 42], "label 42 out of range 0..9"),   # was evaluate's "IndexError: Target 42 is out of bounds"
    ("train", [-1, 3], "label -1 out of range 0..9"),  # and train's
    ("val", [9, 10], "label 10 out of range 0..9"),
    ("test", [], "empty (no images; re-run the split stage)"),  # was "torch.cat(): expected a non-empty list"
])
def test_a_damaged_split_file_is_one_line_naming_it(tmp_path: Path, subset, labels, fragment):
    """What the split stage never writes (a label without a class name in summary.json, a
    subset without images) is refused by the loader every stage reads the split with."""
    y = torch.tensor(labels, dtype=torch.int64)
    save_split(tmp_path, {subset: (torch.zeros(len(y), 28, 28, dtype=torch.uint8), y)},
               {"classes": DIGITS})
    with pytest.raises(MnistlabError) as e:
        load_split(tmp_path, subset)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / f'{subset}.pt'}: {fragment}")
    if labels:
        assert msg.endswith(f"({tmp_path / 'summary.json'} names 10 classes; re-run the split stage)")
        save_split(tmp_path, {subset: (torch.zeros(2, 28, 28, dtype=torch.uint8),
                                       torch.tensor([0, 9]))}, {"classes": DIGITS})
        assert load_split(tmp_path, subset)[1].tolist() == [0, 9]  # both ends of the range load


def test_same_seed_same_bytes_different_seed_different_split(digits_raw: Path, tmp_path: Path):
    for run in ("a", "b"):
        split(digits_raw, tmp_path / run, DIGITS, 0.1, 0.2, 1234, "digits")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert sorted(a) == sorted(OUTPUTS) and a == b

    split(digits_raw, tmp_path / "c", DIGITS, 0.1, 0.2, 4321, "digits")
    c = tree_digest(tmp_path / "c")
    for name in ("train.pt", "val.pt", "test.pt"):
        assert c[name] != a[name]
    assert image_hashes(load(tmp_path / "a", "val")[0]) != image_hashes(load(tmp_path / "c", "val")[0])


@pytest.mark.slow  # runs the stage script in a subprocess
def test_same_bytes_from_the_stage_in_another_process(digits_raw: Path, tmp_path: Path):
    split(digits_raw, tmp_path / "a", DIGITS, 0.1, 0.2, 1234, "digits")
    # the second run in another process, as DVC would run it
    params = {"seed": 1234, "split": {"val_fraction": 0.1, "test_fraction": 0.2},
              "sources": {"digits": {"embedded": "sklearn_digits"}}}
    p = run_stage("split.py", "--dataset", "digits", "--raw", str(digits_raw), "--out", "b",
                  params=params, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "digits: train 1293, val 144, test 360 (carved from train test set)" in p.stdout
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("val, test, match", [
    (0.0, 0.2, r"split\.val_fraction must be a fraction in \(0, 1\) or a count \(got 0\.0\)"),
    (1.0, 0.2, r"split\.val_fraction must be a fraction in \(0, 1\) or a count \(got 1\.0\)"),
    (1.5, 0.2, r"split\.val_fraction .*\(got 1\.5\)"),
    (-0.1, 0.2, r"split\.val_fraction .*\(got -0\.1\)"),
    ("0.1", 0.2, r"split\.val_fraction .*\(got '0\.1'\)"),
    (True, 0.2, r"split\.val_fraction .*\(got True\)"),
    (0, 0.2, r"split\.val_fraction must be a fraction in \(0, 1\) or a count >= 1 \(got 0\)"),
    (0.1, 1.0, r"split\.test_fraction .*\(got 1\.0\)"),
    (5, 0.2, r"dataset 'digits': cannot carve the validation set: The test_size = 5 should be "
             r"greater or equal to the number of classes = 10"),
    (5000, 0.2, r"dataset 'digits': cannot carve the validation set: test_size=5000 should be"),
])
def test_bad_fractions(digits_raw: Path, tmp_path: Path, val, test, match):
    with pytest.raises(MnistlabError, match=match):
        split(digits_raw, tmp_path, DIGITS, val, test, 1234, "digits")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("seed", [1.5, -1, "1", 2**32, None])
def test_bad_seed(digits_raw: Path, tmp_path: Path, seed):
    with pytest.raises(MnistlabError, match=r"params\.yaml: seed must be an integer in \[0, 2\*\*32\)"):
        split(digits_raw, tmp_path, DIGITS, 0.1, 0.2, seed, "digits")


def _with_labels(train_labels: torch.Tensor, test: bool = False) -> dict[str, bytes]:
    files = dataset_files(n_train=len(train_labels), test=test)
    files[LABELS["train"]] = idx_bytes(train_labels)
    return files


def test_class_too_small_for_a_stratified_test_set(tmp_path: Path):
    y = torch.arange(100) % 10
    y[3::10] = 4
    y[3] = 3  # class 3 keeps a single sample
    raw = raw_from(tmp_path, _with_labels(y))
    with pytest.raises(MnistlabError, match=r"^dataset 'tiny': class 3 has only 1 sample\(s\); "
                                            r"cannot carve a stratified test set$"):
        split(raw, tmp_path / "split", DIGITS, 0.1, 0.2, 0, "tiny")


def test_class_too_small_for_a_stratified_validation_set(tmp_path: Path):
    y = torch.arange(100) % 10
    y[7::10] = 0
    y[7] = 7  # one sample of class 7 in train; the official test set does not help
    raw = raw_from(tmp_path, _with_labels(y, test=True))
    with pytest.raises(MnistlabError, match=r"class 7 has only 1 sample\(s\); cannot carve a stratified validation set"):
        split(raw, tmp_path / "split", DIGITS, 0.1, 0.2, 0, "tiny")


def test_class_missing_from_train(tmp_path: Path):
    y = torch.arange(100) % 9  # no 9s; the test set has them
    raw = raw_from(tmp_path, _with_labels(y, test=True))
    with pytest.raises(MnistlabError, match=r"dataset 'nine': no training samples of class\(es\) \['9'\]"):
        split(raw, tmp_path / "split", DIGITS, 0.1, 0.2, 0, "nine")


def test_labels_beyond_the_class_names(digits_raw: Path, tmp_path: Path):
    with pytest.raises(MnistlabError, match=r"train-labels-idx1-ubyte: label 5 out of range 0\.\.4"):
        split(digits_raw, tmp_path, list("abcde"), 0.1, 0.2, 0, "digits")


def test_failed_rerun_keeps_the_earlier_split(tmp_path: Path):
    x, y = make_pair(300)
    files = {IMAGES["train"]: idx_bytes(x), LABELS["train"]: idx_bytes(y)}
    raw = raw_from(tmp_path, files)
    out = tmp_path / "split"
    split(raw, out, DIGITS, 0.1, 0.2, 0, "s")
    before = tree_digest(out)
    with pytest.raises(MnistlabError):
        split(raw, out, DIGITS, 1.5, 0.2, 0, "s")
    (raw / LABELS["train"]).write_bytes(idx_bytes(torch.arange(300) % 10 * 0))  # only class 0
    with pytest.raises(MnistlabError, match="no training samples"):
        split(raw, out, DIGITS, 0.1, 0.2, 0, "s")
    assert tree_digest(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temp files left


@pytest.mark.slow  # runs the stage script in a subprocess
def test_split_stage_errors_exit_2_and_keep_outputs(digits_raw: Path, tmp_path: Path):
    params = {"seed": 1234, "split": {"val_fraction": 0.1, "test_fraction": 0.2},
              "sources": {"digits": {"embedded": "sklearn_digits"}}}
    split(digits_raw, tmp_path / "out", DIGITS, 0.1, 0.2, 1234, "digits")
    before = tree_digest(tmp_path / "out")
    params["split"]["val_fraction"] = 1.5
    p = run_stage("split.py", "--dataset", "digits", "--raw", str(digits_raw), "--out", "out",
                  params=params, cwd=tmp_path)
    assert_one_line_error(p, "error: params.yaml: split.val_fraction must be a fraction in (0, 1) or a count (got 1.5)")
    assert tree_digest(tmp_path / "out") == before

    params["split"]["val_fraction"] = 0.1
    p = run_stage("split.py", "--dataset", "digits", "--raw", "missing", "--out", "out",
                  params=params, cwd=tmp_path)
    assert_one_line_error(p, "error: missing/train-images-idx3-ubyte: file not found (run the download stage first)")
    assert tree_digest(tmp_path / "out") == before


@pytest.mark.slow  # runs the stage script in a subprocess
def test_split_stage_too_few_samples_exits_2(tmp_path: Path):
    y = torch.arange(50) % 10
    y[10::10] = 1  # class 0 keeps one sample (index 0)
    raw = raw_from(tmp_path, _with_labels(y))
    params = {"seed": 1, "split": {"val_fraction": 0.1, "test_fraction": 0.2},
              "sources": {"tiny": str(tmp_path)}}
    p = run_stage("split.py", "--dataset", "tiny", "--raw", str(raw), "--out", "out", params=params, cwd=tmp_path)
    assert_one_line_error(p, "error: dataset 'tiny': class 0 has only 1 sample(s); cannot carve a stratified test set")
    assert not (tmp_path / "out").exists()

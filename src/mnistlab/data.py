"""Datasets: fetch, verify, parse and split the MNIST family into one raw format.

Every dataset ends up the same way on disk, so later stages never care where
it came from:

    data/raw/<name>/          four IDX files under the official MNIST names,
                              uncompressed (``t10k-*`` may be absent: then the
                              split stage carves a test set out of train), plus
                              the verified ``.gz`` files for downloaded sources
    data/split/<name>/        train.pt, val.pt, test.pt  ({images: uint8 [N,28,28],
                              labels: int64 [N]}, loadable with weights_only=True)
                              and summary.json

Download, MD5 checks and IDX parsing are torchvision's (``download_url``,
``check_integrity``, ``read_image_file``/``read_label_file``); what we add is
what they lack for a pipeline: a timeout, retries with backoff, falling back
across mirrors, atomic writes, and one-line errors that name the file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

import torch
import torchvision.datasets as tvd
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_integrity, download_url

from mnistlab.errors import MnistlabError
from mnistlab.utils import atomic_path, torch_save, write_json

log = logging.getLogger(__name__)

IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
FILES = [IMAGES["train"], LABELS["train"], IMAGES["test"], LABELS["test"]]
SIDE = 28  # every dataset is brought to MNIST's 28x28 uint8 layout
EMBEDDED = ("sklearn_digits",)
DIGIT_CLASSES = tuple(str(i) for i in range(10))


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Where one dataset comes from (``sources.<name>`` in params.yaml)."""

    name: str
    mirrors: tuple[str, ...] = ()
    md5: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] = DIGIT_CLASSES
    embedded: str | None = None


def resolve_source(params: dict[str, Any], name: str) -> Source:
    """Build the :class:`Source` for dataset ``name`` from ``params['sources']``.

    Accepted forms: ``{embedded: sklearn_digits}``; a plain string (a folder or a
    base URL); or ``{mirrors: [...], torchvision: MNIST, md5: {...}, classes: [...]}``
    where ``torchvision`` borrows the official MD5s and class names from that
    ``torchvision.datasets`` class.
    """
    sources = params.get("sources") or {}
    if name not in sources:
        raise MnistlabError(
            f"unknown dataset {name!r}: add it under 'sources' in params.yaml "
            f"(known: {', '.join(sorted(sources)) or 'none'})"
        )
    spec = sources[name]
    key = f"sources.{name}"
    if isinstance(spec, str):
        spec = {"mirrors": [spec]}
    if not isinstance(spec, dict):
        raise MnistlabError(f"params.yaml: {key} must be a path, a URL or a mapping")
    if "embedded" in spec:
        if spec["embedded"] not in EMBEDDED:
            raise MnistlabError(
                f"params.yaml: {key}.embedded: unknown {spec['embedded']!r} (valid: {', '.join(EMBEDDED)})"
            )
        return Source(name, embedded=spec["embedded"])
    md5: dict[str, str] = {}
    classes = DIGIT_CLASSES
    if "torchvision" in spec:
        cls = getattr(tvd, str(spec["torchvision"]), None)
        if not (isinstance(cls, type) and issubclass(cls, tvd.MNIST)):
            raise MnistlabError(
                f"params.yaml: {key}.torchvision: {spec['torchvision']!r} is not an MNIST-style "
                "torchvision dataset (e.g. MNIST, FashionMNIST, KMNIST)"
            )
        md5 = dict(cls.resources)
        if cls is not tvd.MNIST:  # MNIST's names are "0 - zero"...; plain digits read better
            classes = tuple(cls.classes)
    md5.update(spec.get("md5") or {})
    if spec.get("classes"):
        classes = tuple(str(c) for c in spec["classes"])
    mirrors = spec.get("mirrors")
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    if not mirrors or not all(isinstance(m, str) and m for m in mirrors):
        raise MnistlabError(f"params.yaml: {key}.mirrors must list at least one URL or folder")
    return Source(name, tuple(mirrors), md5, classes)


def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https", "ftp", "file")


# --------------------------------------------------------------------------- download


@dataclass(frozen=True)
class DownloadSettings:
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DownloadSettings:
        from mnistlab.config import non_negative, positive

        d = params.get("download") or {}
        return cls(
            timeout=positive("download.timeout", d.get("timeout", cls.timeout)),
            retries=positive("download.retries", d.get("retries", cls.retries), int),
            backoff=non_negative("download.backoff", d.get("backoff", cls.backoff)),
        )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's download_url calls urlopen without a timeout; the socket
    # default is the only knob that reaches it.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _fetch_url(url: str, dest: Path, md5: str | None, settings: DownloadSettings) -> str | None:
    """Download ``url`` to ``dest`` (atomically); return None on success or the last error."""
    error = None
    for attempt in range(1, settings.retries + 1):
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
            try:
                with _socket_timeout(settings.timeout):
                    download_url(url, tmp, filename=dest.name, md5=None)
                if md5 and not check_integrity(Path(tmp) / dest.name, md5):
                    # A corrupt copy will not improve on retry: go to the next mirror.
                    return f"{url}: MD5 mismatch (expected {md5})"
                (Path(tmp) / dest.name).replace(dest)
                return None
            except urllib.error.HTTPError as e:
                error = f"{url}: HTTP {e.code}"
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    return error  # permanent: no point retrying this mirror
            except (urllib.error.URLError, OSError, HTTPException, RuntimeError) as e:
                reason = getattr(e, "reason", None) or e
                error = f"{url}: {type(e).__name__}: {' '.join(str(reason).split()) or 'connection failed'}"
        if attempt < settings.retries:
            delay = settings.backoff * 2 ** (attempt - 1)
            log.warning("%s (attempt %d/%d); retrying in %.1fs", error, attempt, settings.retries, delay)
            time.sleep(delay)
    return error


def _find_local(folder: Path, fname: str) -> Path | None:
    for cand in (folder / f"{fname}.gz", folder / fname):
        if cand.is_file():
            return cand
    return None


def _extract(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` uncompressed (gzip detected by content, not name)."""
    with open(src, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    if src.suffix == ".gz" and not is_gzip:
        raise MnistlabError(f"{src}: named .gz but is not a gzip file")
    with atomic_path(dest) as tmp:
        if not is_gzip:
            shutil.copyfile(src, tmp)
            return
        try:
            with gzip.open(src, "rb") as rf, open(tmp, "wb") as wf:
                shutil.copyfileobj(rf, wf)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise MnistlabError(f"{src}: corrupt or truncated gzip ({e})") from None


def fetch(source: Source, out: Path, settings: DownloadSettings) -> list[str]:
    """Bring ``source``'s files into ``out`` (uncompressed IDX); return the names written.

    Files already present and verified are not fetched again (no network at all).
    The ``t10k-*`` pair is optional for folders and URLs that lack it, but
    required when an MD5 is known for it (an official dataset).
    """
    out.mkdir(parents=True, exist_ok=True)
    if source.embedded:
        return write_digits(out)
    written = []
    tried: list[str] = []
    for fname in FILES:
        gz = f"{fname}.gz"
        optional = fname.startswith("t10k") and gz not in source.md5 and fname not in source.md5
        md5 = source.md5.get(gz)
        if md5 and check_integrity(out / gz, md5) and (out / fname).is_file():
            log.info("%s: %s present and verified, not fetched", source.name, gz)
            written.append(fname)
            continue
        got = None
        errors = []
        for mirror in source.mirrors:
            if _is_url(mirror):
                url = mirror.rstrip("/") + "/" + gz
                tried.append(url)
                err = _fetch_url(url, out / gz, md5, settings)
                if err is None:
                    got = out / gz
                    break
                errors.append(err)
            else:
                local = _find_local(Path(mirror), fname)
                tried.append(str(Path(mirror) / gz))
                if local is None:
                    errors.append(f"{mirror}: no {gz} or {fname}")
                    continue
                want = source.md5.get(local.name)
                if want and not check_integrity(local, want):
                    errors.append(f"{local}: MD5 mismatch (expected {want})")
                    continue
                got = local
                break
        if got is None:
            if optional and all("HTTP 404" in e or ": no " in e for e in errors):
                log.info("%s: no %s in any mirror; the split will carve a test set", source.name, fname)
                continue
            raise MnistlabError(
                f"dataset {source.name!r}: could not get {gz} ({'; '.join(errors)}). "
                f"Offline? Put the four MNIST files in a folder and set "
                f"sources.{source.name}.mirrors: [/that/folder] in params.yaml"
            )
        _extract(got, out / fname)
        written.append(fname)
    if LABELS["train"] not in written or IMAGES["train"] not in written:
        raise MnistlabError(f"dataset {source.name!r}: the training files are required")
    if (IMAGES["test"] in written) != (LABELS["test"] in written):
        raise MnistlabError(f"dataset {source.name!r}: t10k images and labels must come together")
    return written


# --------------------------------------------------------------------------- IDX parsing


def _check_idx_header(path: Path, want_ndim: int) -> None:
    """Check an uncompressed IDX file's header and length before torchvision parses it.

    torchvision's reader asserts (bare AssertionError) or mis-shapes on bad
    input; we want a sentence naming the file and the problem.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * want_ndim)
    if len(head) < 4:
        raise MnistlabError(f"{path}: truncated IDX file ({size} bytes)")
    if head[0:2] != b"\x00\x00":
        raise MnistlabError(f"{path}: not an IDX file (bad magic {head[:4].hex()})")
    if head[2] != 0x08:
        raise MnistlabError(f"{path}: IDX dtype 0x{head[2]:02x} is not unsigned byte (0x08)")
    if head[3] != want_ndim:
        kind = "images" if want_ndim == 3 else "labels"
        raise MnistlabError(f"{path}: {head[3]}-d IDX where {kind} need {want_ndim}-d")
    if len(head) < 4 + 4 * want_ndim:
        raise MnistlabError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(want_ndim)]
    if want_ndim == 3 and dims[1:] != [SIDE, SIDE]:
        raise MnistlabError(f"{path}: images are {dims[1]}x{dims[2]}, expected {SIDE}x{SIDE}")
    expected = len(head) + int(torch.tensor(dims).prod())
    if size < expected:
        raise MnistlabError(f"{path}: truncated IDX file ({size} bytes, header says {expected})")
    if size > expected:
        raise MnistlabError(f"{path}: {size - expected} trailing bytes after the IDX data")


def read_pair(raw: Path, subset: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse and validate one (images, labels) pair: uint8 [N,28,28], int64 [N]."""
    ipath, lpath = raw / IMAGES[subset], raw / LABELS[subset]
    for p in (ipath, lpath):
        if not p.is_file():
            raise MnistlabError(f"{p}: file not found (run the download stage first)")
    _check_idx_header(ipath, 3)
    _check_idx_header(lpath, 1)
    images = read_image_file(str(ipath))
    labels = read_label_file(str(lpath)).long()
    if len(images) != len(labels):
        raise MnistlabError(
            f"{ipath}: {len(images)} images but {lpath.name} has {len(labels)} labels"
        )
    if len(labels) == 0:
        raise MnistlabError(f"{lpath}: no samples")
    bad = labels >= num_classes
    if bad.any():
        raise MnistlabError(
            f"{lpath}: label {int(labels[bad][0])} out of range 0..{num_classes - 1} "
            f"({int(bad.sum())} such labels)"
        )
    return images, labels


def validate_raw(raw: Path, num_classes: int) -> dict[str, int]:
    """Parse every pair present in ``raw``; return sample counts per official subset."""
    counts = {"train": len(read_pair(raw, "train", num_classes)[1])}
    if (raw / IMAGES["test"]).is_file():
        counts["test"] = len(read_pair(raw, "test", num_classes)[1])
    return counts


# --------------------------------------------------------------------------- embedded digits


def digits_as_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 UCI digits in MNIST's layout.

    8x8 values 0..16 → 0..255, resized (bilinear, antialiased) into a 20x20 box
    centred in a 28x28 canvas, as MNIST's digits are. Shapes: [1797,28,28] uint8, [1797] int64.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # [N,1,8,8] in 0..1
    box = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", antialias=True,
                                          align_corners=False)
    canvas = torch.zeros(len(x), 1, SIDE, SIDE)
    canvas[:, :, 4:24, 4:24] = box.clamp(0, 1)
    images = (canvas.squeeze(1) * 255).round().to(torch.uint8)
    return images, torch.from_numpy(d.target).long()


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (atomically)."""
    a = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, a.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + a.numpy().tobytes())


def write_digits(out: Path) -> list[str]:
    """The embedded dataset has no official test set: write the train pair only."""
    images, labels = digits_as_mnist()
    write_idx(out / IMAGES["train"], images)
    write_idx(out / LABELS["train"], labels)
    for stale in (IMAGES["test"], LABELS["test"]):
        (out / stale).unlink(missing_ok=True)
    return [IMAGES["train"], LABELS["train"]]


# --------------------------------------------------------------------------- split


def _carve(labels: torch.Tensor, amount: float | int, seed: int, what: str, dataset: str
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (keep, carved) index split of ``labels``; sklearn does the stratifying."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(labels)).numpy()
    y = labels.numpy()
    counts = torch.bincount(labels)
    present = counts[counts > 0]
    if present.min() < 2:
        cls = int(torch.nonzero(counts == present.min())[0])
        raise MnistlabError(
            f"dataset {dataset!r}: class {cls} has only {int(present.min())} sample(s); "
            f"cannot carve a stratified {what} set"
        )
    try:
        keep, carved = train_test_split(idx, test_size=amount, stratify=y, random_state=seed, shuffle=True)
    except ValueError as e:
        raise MnistlabError(f"dataset {dataset!r}: cannot carve the {what} set: {e}") from None
    # Sorted indices keep the saved order independent of sklearn's shuffle (same seed,
    # same bytes either way, but sorted is easier to reason about).
    return torch.from_numpy(keep).sort().values, torch.from_numpy(carved).sort().values


def _amount(key: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count (got {value!r})")
    if isinstance(value, float) and not 0 < value < 1:
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count (got {value!r})")
    if isinstance(value, int) and value < 1:
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count >= 1 (got {value!r})")
    return value


def split(raw: Path, out: Path, classes: list[str], val: Any, test: Any, seed: int,
          dataset: str) -> dict[str, Any]:
    """Split ``raw`` into train/val/test tensor files under ``out``; return the summary.

    The official test set stays the test set; without one, a stratified test set
    is carved from train first, then validation from the rest. Same seed, same bytes.
    """
    val = _amount("split.val_fraction", val)
    test = _amount("split.test_fraction", test)
    n_cls = len(classes)
    images, labels = read_pair(raw, "train", n_cls)
    if (raw / IMAGES["test"]).is_file():
        test_images, test_labels = read_pair(raw, "test", n_cls)
        test_from = "official"
    else:
        keep, carved = _carve(labels, test, seed, "test", dataset)
        test_images, test_labels = images[carved], labels[carved]
        images, labels = images[keep], labels[keep]
        test_from = "carved from train"
    keep, carved = _carve(labels, val, seed, "validation", dataset)
    subsets = {
        "train": (images[keep], labels[keep]),
        "val": (images[carved], labels[carved]),
        "test": (test_images, test_labels),
    }
    summary: dict[str, Any] = {"classes": list(classes), "test_source": test_from}
    for name, (x, y) in subsets.items():
        per_class = torch.bincount(y, minlength=n_cls)
        if name == "train" and (per_class == 0).any():
            missing = [classes[i] for i in torch.nonzero(per_class == 0).flatten().tolist()]
            raise MnistlabError(f"dataset {dataset!r}: no training samples of class(es) {missing}")
        summary[name] = {"count": len(y), "per_class": per_class.tolist()}
        torch_save({"images": x.clone(), "labels": y.clone()}, out / f"{name}.pt")
    write_json(out / "summary.json", summary)
    return summary


def load_split(split_dir: Path, subset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one subset written by :func:`split` (weights_only, validated shapes)."""
    from mnistlab.utils import torch_load

    obj = torch_load(split_dir / f"{subset}.pt")
    if not (isinstance(obj, dict) and {"images", "labels"} <= set(obj)):
        raise MnistlabError(f"{split_dir / f'{subset}.pt'}: not a split file (needs images, labels)")
    return obj["images"], obj["labels"]


def load_classes(split_dir: Path) -> list[str]:
    try:
        return json.loads((split_dir / "summary.json").read_text())["classes"]
    except (OSError, ValueError, KeyError):
        raise MnistlabError(f"{split_dir / 'summary.json'}: missing or invalid (run the split stage)") from None

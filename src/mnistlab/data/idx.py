"""The raw format: the four IDX files under the official MNIST names, read, checked and written.

Parsing is torchvision's (``read_image_file``/``read_label_file``); the header and
length checks before it turn what its reader would assert on or mis-shape into one
sentence naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mnistlab.artifacts import SIDE
from mnistlab.errors import MnistlabError
from mnistlab.utils import atomic_path


# torchvision is imported on first use: it adds ~1 s to every process start, and
# only the download and split stages need it (train/evaluate/features read split files).
def _tvm():
    import torchvision.datasets.mnist

    return torchvision.datasets.mnist


IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
FILES = [IMAGES["train"], LABELS["train"], IMAGES["test"], LABELS["test"]]


def _check_idx_header(path: Path, want_ndim: int, shown: str) -> list[int]:
    """Check an uncompressed IDX file's header and length before torchvision parses it.

    torchvision's reader asserts (bare AssertionError) or mis-shapes on bad
    input; we want a sentence naming the file (``shown``) and the problem.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * want_ndim)
    kind = "images" if want_ndim == 3 else "labels"
    if len(head) < 4:
        raise MnistlabError(f"{shown}: truncated IDX file ({size} bytes)")
    if head[0:2] != b"\x00\x00":
        raise MnistlabError(f"{shown}: not an IDX file (bad magic 0x{head[:4].hex()})")
    if head[2] != 0x08:
        raise MnistlabError(f"{shown}: IDX dtype 0x{head[2]:02x} is not unsigned byte (0x08)")
    if head[3] != want_ndim:
        raise MnistlabError(f"{shown}: {head[3]}-d IDX where {kind} need {want_ndim}-d")
    if len(head) < 4 + 4 * want_ndim:
        raise MnistlabError(f"{shown}: truncated IDX header ({size} bytes)")
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(want_ndim)]
    if want_ndim == 3 and dims[1:] != [SIDE, SIDE]:
        raise MnistlabError(f"{shown}: images are {dims[1]}x{dims[2]}, expected {SIDE}x{SIDE}")
    expected = len(head) + math.prod(dims)
    if size < expected:
        raise MnistlabError(
            f"{shown}: truncated IDX file ({size} bytes, the header's {dims[0]} {kind} need {expected})"
        )
    if size > expected:
        raise MnistlabError(f"{shown}: {size - expected} trailing bytes after the IDX data")
    if dims[0] == 0:
        raise MnistlabError(f"{shown}: no samples")
    return dims


def read_pair(raw: Path, subset: str, num_classes: int, shown: dict[str, str] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse and validate one (images, labels) pair: uint8 [N,28,28], int64 [N].

    ``shown`` maps a file name to what error messages call it (its origin);
    by default its path in ``raw``.
    """
    raw = Path(raw)
    ipath, lpath = raw / IMAGES[subset], raw / LABELS[subset]
    name = {p: (shown or {}).get(p.name, str(p)) for p in (ipath, lpath)}
    for p in (ipath, lpath):
        if not p.is_file():
            raise MnistlabError(f"{p}: file not found (run the download stage first)")
    _check_idx_header(ipath, 3, name[ipath])
    _check_idx_header(lpath, 1, name[lpath])
    images = _tvm().read_image_file(str(ipath))
    labels = _tvm().read_label_file(str(lpath)).long()
    if len(images) != len(labels):
        raise MnistlabError(
            f"{name[ipath]}: {len(images)} images but {name[lpath]} has {len(labels)} labels"
        )
    bad = labels >= num_classes
    if bad.any():
        raise MnistlabError(
            f"{name[lpath]}: label {int(labels[bad][0])} out of range 0..{num_classes - 1} "
            f"({int(bad.sum())} such labels)"
        )
    return images, labels


def validate_raw(raw: Path, num_classes: int, shown: dict[str, str] | None = None
                 ) -> dict[str, int]:
    """Parse every pair present in ``raw``; return sample counts per official subset."""
    raw = Path(raw)
    counts = {"train": len(read_pair(raw, "train", num_classes, shown)[1])}
    if (raw / IMAGES["test"]).is_file() or (raw / LABELS["test"]).is_file():
        counts["test"] = len(read_pair(raw, "test", num_classes, shown)[1])
    return counts


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a tensor as an unsigned-byte IDX file (atomically)."""
    a = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, a.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + a.numpy().tobytes())

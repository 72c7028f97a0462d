"""Small synthetic IDX datasets and file digests: build the files a test needs in its own folder."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import torch

from mnistlab.config import DownloadSettings
from mnistlab.data.download import MANIFEST
from mnistlab.data.idx import IMAGES, LABELS

QUICK = DownloadSettings(timeout=5, retries=1, backoff=0)


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
    out[IMAGES["train"]], out[LABELS["train"]] = idx_bytes(x), idx_bytes(y)
    if test:
        x, y = make_pair(n_test, num_classes, seed + 1)
        out[IMAGES["test"]], out[LABELS["test"]] = idx_bytes(x), idx_bytes(y)
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


def manifest_verified(out: Path) -> set[str]:
    return {e["verified"] for e in json.loads((out / MANIFEST).read_text())["files"].values()}


def regz(blob: bytes) -> bytes:
    """Another gzip of ``blob`` than :func:`gz` makes: the same content, other bytes."""
    other = gzip.compress(blob, compresslevel=9, mtime=1_234_567)
    assert other != gz(blob)
    return other


def official_spec(files: dict[str, bytes], **extra) -> dict:
    """Source keys pinning ``files`` as an official dataset would: their .gz MD5 (as
    :func:`gz` makes them) and their content MD5."""
    return {"md5": {f"{n}.gz": md5(gz(b)) for n, b in files.items()},
            "content_md5": {n: md5(b) for n, b in files.items()}, **extra}


def corrupt(files: dict[str, bytes], case: str) -> tuple[dict[str, bytes], str]:
    """Break one file of a good dataset; return the files and the file name blamed."""
    img, lab = IMAGES["train"], LABELS["train"]
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

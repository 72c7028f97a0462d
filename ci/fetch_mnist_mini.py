"""Rebuild ``../shared/datasets/mnist-mini`` from the official MNIST test files.

For machines without ``../shared`` (the GitHub workflow): the CI profile's
``mnist_mini`` is real MNIST, train = the first 8,000 t10k images, test = the last
2,000, under the four official file names. The same bytes give the same CI
results, so the committed ci/baseline.json holds there too.

    python ci/fetch_mnist_mini.py --out ../shared/datasets/mnist-mini
    python ci/fetch_mnist_mini.py --out /tmp/mini --mirror ../shared/datasets/mnist-t10k

Mirrors (URLs or folders) are tried in order; every file is checked against
torchvision's official MD5 before use.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import torch
import torchvision.datasets as tvd
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_integrity, download_url

from mnistlab.errors import MnistlabError, run_stage
from mnistlab.utils import atomic_path

TRAIN = 8000  # the first 8,000 t10k images; the last 2,000 are the test set
FILES = {"images": "t10k-images-idx3-ubyte.gz", "labels": "t10k-labels-idx1-ubyte.gz"}


def fetch(name: str, mirrors: list[str], dest: Path) -> Path:
    """``name`` from the first mirror that has it with the official MD5."""
    md5 = dict(tvd.MNIST.resources)[name]
    for m in mirrors:
        try:
            if "://" in m:
                download_url(m.rstrip("/") + "/" + name, str(dest), name, md5)
            else:
                shutil.copy2(Path(m) / name, dest / name)
        except (OSError, RuntimeError) as e:
            print(f"{m}: {name} not fetched ({' '.join(str(e).split())})")
            continue
        if check_integrity(str(dest / name), md5):
            return dest / name
        print(f"{m}: {name} has the wrong MD5; trying the next mirror")
    raise MnistlabError(f"{name}: no mirror of {', '.join(mirrors)} has it with MD5 {md5}")


def idx_gz(path: Path, t: torch.Tensor) -> None:
    """Write a uint8 tensor as a gzipped IDX file (magic, big-endian sizes, bytes)."""
    t = t.to(torch.uint8).contiguous()
    head = bytes([0, 0, 0x08, t.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in t.shape)
    with atomic_path(path) as tmp:
        # mtime=0: the same input gives byte-identical files
        with gzip.GzipFile(tmp, "wb", mtime=0) as f:
            f.write(head + t.numpy().tobytes())


def build(mirrors: list[str], out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = {}
        for kind, name in FILES.items():
            gz = fetch(name, mirrors, tmp)
            plain = tmp / name.removesuffix(".gz")
            with gzip.open(gz) as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw[kind] = (read_image_file if kind == "images" else read_label_file)(str(plain))
    images, labels = raw["images"], raw["labels"]
    out.mkdir(parents=True, exist_ok=True)
    idx_gz(out / "train-images-idx3-ubyte.gz", images[:TRAIN])
    idx_gz(out / "train-labels-idx1-ubyte.gz", labels[:TRAIN])
    idx_gz(out / "t10k-images-idx3-ubyte.gz", images[TRAIN:])
    idx_gz(out / "t10k-labels-idx1-ubyte.gz", labels[TRAIN:])
    print(f"{out}: {TRAIN} train + {len(labels) - TRAIN} test MNIST digits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mirror", action="append", default=None,
                    help="URL or folder with the t10k files (repeatable; default: "
                         "sources.mnist.mirrors of params.yaml)")
    args = ap.parse_args()
    mirrors = args.mirror
    if not mirrors:
        from mnistlab.config import get, load_params

        mirrors = list(get(load_params(Path(__file__).resolve().parents[1] / "params.yaml"),
                           "sources.mnist.mirrors"))
    build(mirrors, args.out)


if __name__ == "__main__":
    run_stage(main)

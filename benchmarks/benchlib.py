"""What the benchmark scripts share: the IDX files unpacked, and the CPU they ran on.

Imported by ``compare_loops.py`` and ``concurrency.py`` as a sibling module (a script's own
folder is first on ``sys.path``).
"""

from __future__ import annotations

import gzip
import platform
import shutil
from pathlib import Path

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_file(src: Path, name: str) -> Path | None:
    """``src``'s file for the official IDX ``name``: ``<name>.gz`` first, else ``<name>``; None if neither."""
    for path in (src / f"{name}.gz", src / name):
        if path.is_file():
            return path
    return None


def unpack_idx(src: Path, dest: Path) -> Path:
    """The MNIST files of ``src`` (``.gz`` or not) uncompressed in ``dest``, under their
    official names (a missing t10k pair is skipped); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in IDX_NAMES:
        path = idx_file(src, name)
        if path is None:
            continue
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as r, open(dest / name, "wb") as w:
                shutil.copyfileobj(r, w)
        else:
            shutil.copyfile(path, dest / name)
    return dest


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and its vector extensions (AVX*, AMX*: what decides CPU kernel
    speed, 3-4x between an AVX2-only and an AVX512-BF16 CPU), from /proc/cpuinfo."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = sorted(f for f in value.split() if f.startswith(("avx", "amx")))
    except OSError:
        pass
    return model or platform.processor() or "cpu", flags

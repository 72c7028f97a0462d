"""Predict with the champion (or any trained model) on your own images.

::

    python -m mnistlab.predict PATH... [--model URI_OR_FILE] [--csv F] [--json F] [--top K]

``PATH``: PNG/JPEG files (any image Pillow reads), folders of them (``*.png``,
``*.jpg``, ``*.jpeg``, not recursive), or IDX image files (``*-idx3-ubyte``, gzipped
or not; these are MNIST's own layout already and go to the model as they are).

``--model``: a ``model.pt`` of the train stage (``models/<ds>/<arch>/seed-<seed>/model.pt``), or
an MLflow URI — ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or
``runs:/<run_id>/model`` — loaded from the store of ``$MLFLOW_TRACKING_URI``
(default ``sqlite:///mlflow.db``). Default: the champion of the first dataset in
params.yaml (``models:/mnistlab-digits@champion`` here), or
``models:/mnistlab-mnist@champion`` without a params.yaml.

An image is brought to MNIST's convention the way MNIST itself was made
(:func:`to_mnist`): grayscale; inverted when the background is light; the digit's
bounding box scaled so that its longer side is 20 px; pasted into 28x28 with its
centre of mass at the centre.

Output: a table on stdout (file, class, probability, top-K); ``--csv`` and ``--json``
write the same rows (atomically). Problems are one line, ``error: ...``, exit 2.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab.artifacts import SIDE
from mnistlab.errors import MnistlabError, exit_after, run_stage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BOX = 20            # MNIST: the digit's bounding box is scaled to fit 20x20 ...
CENTRE = SIDE / 2    # ... its centre of mass put at pixel (14, 14): MNIST's test set has it
                     # there (mean 14.0, sd 0.3 on either axis; pixel centres 0..27)
INK = 0.2           # ink: above this share of the brightest pixel (after background removal)
MARGIN = 0.25       # kept around the bounding box, in units of its longer side (antialiased edges)
MIN_CONTRAST = 8.0  # grey levels between background and the brightest ink: less is a blank image
BATCH = 1000
DEFAULT_MODEL = "models:/mnistlab-mnist@champion"


# --------------------------------------------------------------------------- images → MNIST


def _gray(img) -> np.ndarray:
    """A Pillow image as float32 [H,W] luminance in 0..255, transparency flattened.

    Transparent pixels become the paper: the median of the opaque ones when most of the
    image is opaque, else (a digit drawn on a transparent canvas) the shade opposite to
    its ink.
    """
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.float32) / 257.0
    if img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float32)
        return a * (255.0 / max(float(a.max()), 1.0)) if a.max() > 255 else a
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        lum = np.asarray(rgba.convert("L"), dtype=np.float32)
        if (alpha < 1).any():
            seen = lum[alpha > 0.5]
            if seen.size == 0:
                paper = 0.0
            elif seen.size > alpha.size / 2:
                paper = float(np.median(seen))
            else:
                paper = 255.0 if np.median(seen) < 128 else 0.0
            lum = lum * alpha + paper * (1.0 - alpha)
        return lum
    return np.asarray(img.convert("L"), dtype=np.float32)


def to_mnist(img) -> np.ndarray:
    """A photo or scan of one digit → uint8 [28,28] in MNIST's convention.

    1. Grayscale (EXIF rotation applied, transparency flattened).
    2. Inverted if the background is light: the median of the border pixels decides.
    3. Background to 0 (the border median is subtracted) and contrast stretched so the
       brightest ink is 255.
    4. Bounding box of the ink: pixels above :data:`INK` of the brightest.
    5. The box and a margin around it (antialiased edges) resized with Pillow's Lanczos
       filter (antialiased) so that the box's longer side is 20 px, aspect ratio kept.
    6. Pasted into 28x28 with its centre of mass (numpy, over the whole array) on pixel
       (14, 14), moved by whole pixels as MNIST's own images were, and the box kept
       inside the canvas. An image already in MNIST's layout comes out as it was (9 in
       10 of MNIST's 10,000 test images bit for bit; mean |difference| 0.03 grey levels).

    Raises:
        ValueError: No ink at all (a blank image).
    """
    from PIL import Image, ImageOps

    a = _gray(ImageOps.exif_transpose(img))
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    if np.median(border) > 127.5:
        a, border = 255.0 - a, 255.0 - border
    a = np.clip(a - np.median(border), 0.0, None)
    peak = float(a.max())
    if peak < MIN_CONTRAST:
        raise ValueError("no digit found (a blank image)")
    a *= 255.0 / peak

    rows, cols = np.nonzero(a > INK * 255.0)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    longer = max(bottom - top, right - left)
    scale = BOX / longer
    # The box and a margin (antialiased edges), zeros past the image's edge, and enough
    # zeros beyond for the resize's rounding up to whole output pixels.
    m = int(np.ceil(MARGIN * longer))
    extra = int(np.ceil(1 / scale)) + 1
    h, w = bottom - top + 2 * m, right - left + 2 * m
    y0, x0 = top + extra, left + extra  # where the margin starts in the padded array
    crop = np.pad(a, m + extra)[y0:y0 + h + extra, x0:x0 + w + extra]
    size = (int(np.ceil(w * scale)), int(np.ceil(h * scale)))
    digit = np.asarray(Image.fromarray(crop.astype(np.float32)).resize(
        size, Image.Resampling.LANCZOS, box=(0.0, 0.0, size[0] / scale, size[1] / scale)),
        dtype=np.float32).clip(0.0, 255.0)
    mass = digit.sum()
    cy = float((digit.sum(axis=1) * np.arange(digit.shape[0])).sum() / mass)
    cx = float((digit.sum(axis=0) * np.arange(digit.shape[1])).sum() / mass)
    # keep the bounding box (not necessarily the margin) inside the canvas
    bt, bl = m * scale, m * scale
    bh, bw = (bottom - top) * scale, (right - left) * scale
    y = int(np.clip(round(CENTRE - cy), np.ceil(-bt), np.floor(SIDE - bt - bh)))
    x = int(np.clip(round(CENTRE - cx), np.ceil(-bl), np.floor(SIDE - bl - bw)))
    return np.round(_paste(digit, y, x)).astype(np.uint8)


def _paste(a: np.ndarray, top: int, left: int) -> np.ndarray:
    """``a`` placed at (top, left) of a black 28x28 canvas; what falls outside is cut off."""
    out = np.zeros((SIDE, SIDE), dtype=np.float32)
    h, w = a.shape
    y0, x0, y1, x1 = max(0, top), max(0, left), min(SIDE, top + h), min(SIDE, left + w)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = a[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


# --------------------------------------------------------------------------- reading inputs


def read_image(path: Path) -> np.ndarray:
    """One image file → uint8 [28,28] (:func:`to_mnist`); one-line errors naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice it (and prints the warning's
            # source line): one error line instead, as above twice the limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_mnist(img)
    except UnidentifiedImageError:
        raise MnistlabError(f"{path}: not an image Pillow can read, nor an IDX images file") from None
    except ValueError as e:
        raise MnistlabError(f"{path}: {e}") from None
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning, SyntaxError) as e:
        raise MnistlabError(f"{path}: unreadable image ({' '.join(str(e).split())})") from None


def read_idx(path: Path) -> torch.Tensor:
    """An IDX images file (gzipped or not) → uint8 [N,28,28], checked as the split stage checks it."""
    from mnistlab.data import idx

    with tempfile.TemporaryDirectory() as tmp:
        raw = path
        if _head(path)[:2] == b"\x1f\x8b":
            raw = Path(tmp) / "images-idx3-ubyte"
            try:
                with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise MnistlabError(f"{path}: unreadable gzip file ({e})") from None
        # The header and length checks of the download/split stages (private to idx.py,
        # reused so both say the same about the same file), then torchvision's reader.
        idx._check_idx_header(raw, 3, str(path))
        return idx._tvm().read_image_file(str(raw))


def _head(path: Path, n: int = 4) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise MnistlabError(f"{path}: unreadable ({e.strerror or e})") from None


def _is_idx(path: Path) -> bool:
    head = _head(path)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(4)
        except (OSError, EOFError) as e:
            raise MnistlabError(f"{path}: unreadable gzip file ({e})") from None
        if head[:2] != b"\x00\x00":
            raise MnistlabError(f"{path}: a gzip file that holds no IDX images file")
    return head[:2] == b"\x00\x00"  # IDX magic; idx._check_idx_header says what else is wrong


def collect(paths: list[Path]) -> tuple[list[str], torch.Tensor]:
    """Every input of ``paths`` → (names, uint8 [N,28,28]), in the order given (folders sorted)."""
    names: list[str] = []
    images: list[torch.Tensor] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise MnistlabError(f"{path}: no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} "
                                    "images in this folder")
            for f in files:
                names.append(str(f))
                images.append(torch.from_numpy(read_image(f)).unsqueeze(0))
        elif path.is_file():
            if _is_idx(path):
                x = read_idx(path)
                names += [f"{path}[{i}]" for i in range(len(x))]
                images.append(x)
            else:
                names.append(str(path))
                images.append(torch.from_numpy(read_image(path)).unsqueeze(0))
        else:
            raise MnistlabError(f"{path}: no such file or folder")
    if not images:
        raise MnistlabError("no input images")
    return names, torch.cat(images)


# --------------------------------------------------------------------------- models


@dataclass
class Predictor:
    """A loaded model: its class names and ``probabilities(uint8 [N,28,28]) -> float [N,K]``."""

    source: str
    classes: list[str]
    probabilities: Callable[[torch.Tensor], np.ndarray]


def _is_uri(spec: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", spec)) and not Path(spec).exists()


def load_predictor(spec: str) -> Predictor:
    """``spec``: a ``model.pt`` of the train stage, or an MLflow model URI (module docstring)."""
    return _mlflow_predictor(spec) if _is_uri(spec) else _local_predictor(Path(spec))


def _local_predictor(path: Path) -> Predictor:
    from mnistlab.models import load_model
    from mnistlab.serving import RawImageClassifier, check_classes

    net, record = load_model(path, torch.device("cpu"))
    if not isinstance(record.get("normalize"), dict) or not {"mean", "std"} <= set(record["normalize"]):
        raise MnistlabError(f"{path}: normalize must hold mean and std")
    clf = RawImageClassifier(net, record["normalize"]["mean"], record["normalize"]["std"]).eval()
    with torch.inference_mode():
        outputs = clf(torch.zeros(1, SIDE, SIDE)).shape[1]
    classes = check_classes(record["classes"], outputs, str(path))

    @torch.inference_mode()
    def probabilities(images: torch.Tensor) -> np.ndarray:
        return torch.cat([clf(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]).numpy()

    return Predictor(str(path), classes, probabilities)


def _mlflow_predictor(uri: str) -> Predictor:
    from mnistlab import serving, tracking

    model = tracking.load_pyfunc(uri)
    flavor = model.metadata.flavors.get("python_function", {})
    meta = (model.metadata.metadata or {}).get(serving.METADATA_KEY)
    if flavor.get("loader_module") != serving.__name__ or not meta:
        raise MnistlabError(
            f"{uri}: not a raw-image classifier (logged before mnistlab.serving: it takes "
            "normalised tensors and returns no class names); re-run its train stage, or pass "
            "its models/<dataset>/<arch>/seed-<seed>/model.pt")
    classes = serving.check_classes(meta["classes"], where=uri)

    def probabilities(images: torch.Tensor) -> np.ndarray:
        frame = model.predict(images.unsqueeze(1).numpy().astype(np.float32))
        missing = [c for c in classes if c not in frame.columns]
        if missing:
            raise MnistlabError(f"{uri}: the model's output lacks class(es) {', '.join(missing)} "
                                "(classes do not match the model)")
        return frame[classes].to_numpy(dtype=np.float64)

    return Predictor(uri, classes, probabilities)


def default_model(params_file: Path = Path("params.yaml")) -> str:
    """``models:/<registry_prefix>-<first dataset>@<alias>`` from params.yaml, if there is one."""
    if not params_file.is_file():
        return DEFAULT_MODEL
    from mnistlab.config import CompareSettings, load_params

    s = CompareSettings.from_params(load_params(params_file))
    return f"models:/{s.registry_prefix}-{s.datasets[0]}@{s.alias}"


# --------------------------------------------------------------------------- predicting


def predict(names: list[str], images: torch.Tensor, predictor: Predictor, top: int = 3
            ) -> list[dict[str, Any]]:
    """One row per image: ``file``, ``class``, ``probability``, ``top`` [(class, probability)]."""
    probs = predictor.probabilities(images)
    k = max(1, min(top, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = []
    for name, p, idx in zip(names, probs, order, strict=True):
        best = [(predictor.classes[j], float(p[j])) for j in idx]
        rows.append({"file": name, "class": best[0][0], "probability": best[0][1], "top": best})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    body = [[r["file"], r["class"], f"{r['probability']:.4f}",
             ", ".join(f"{c} {p:.3f}" for c, p in r["top"])] for r in rows]
    return tabulate(body, headers=["file", "class", "probability", f"top-{len(rows[0]['top'])}"],
                    disable_numparse=True) + "\n"


def write_outputs(rows: list[dict[str, Any]], predictor: Predictor, csv_path: Path | None,
                  json_path: Path | None) -> None:
    from mnistlab.artifacts import write_csv
    from mnistlab.utils import write_json

    k = len(rows[0]["top"])
    if csv_path is not None:
        fields = ["file", "class", "probability"] + [f"top{i}_{s}" for i in range(1, k + 1)
                                                     for s in ("class", "probability")]
        write_csv(csv_path, [{"file": r["file"], "class": r["class"],
                              "probability": f"{r['probability']:.6g}",
                              **{f"top{i}_{s}": (c if s == "class" else f"{p:.6g}")
                                 for i, (c, p) in enumerate(r["top"], 1)
                                 for s in ("class", "probability")}} for r in rows], fields)
    if json_path is not None:
        write_json(json_path, {"model": predictor.source, "classes": predictor.classes,
                               "predictions": [{**r, "top": [{"class": c, "probability": p}
                                                            for c, p in r["top"]]} for r in rows]})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mnistlab.predict",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                    help="PNG/JPEG files, folders of them, or IDX image files (.gz or not)")
    ap.add_argument("--model", default=None,
                    help="models/<ds>/<arch>/seed-<seed>/model.pt, or models:/<name>@<alias>, runs:/<id>/model "
                         "(default: the champion of params.yaml's first dataset)")
    ap.add_argument("--csv", type=Path, help="also write the predictions as CSV")
    ap.add_argument("--json", type=Path, help="also write the predictions as JSON")
    ap.add_argument("--top", type=int, default=3, help="classes listed per image (default 3)")
    args = ap.parse_args(argv)

    def run() -> None:
        if args.top < 1:
            raise MnistlabError("--top must be at least 1")
        # Images first: a typo in a path should not wait for a model to load.
        names, images = collect(args.paths)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        predictor = load_predictor(args.model or default_model())
        rows = predict(names, images, predictor, args.top)
        write_outputs(rows, predictor, args.csv, args.json)
        print(table(rows), end="")

    run_stage(run)


if __name__ == "__main__":
    exit_after(main)

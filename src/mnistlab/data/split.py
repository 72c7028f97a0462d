"""The split stage's work: raw IDX files → stratified train/val/test tensor files.

The files' format (and their loaders) belongs to :mod:`mnistlab.artifacts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnistlab import artifacts
from mnistlab.config import section
from mnistlab.data.idx import IMAGES, LABELS, read_pair
from mnistlab.errors import MnistlabError


def _carve(labels: torch.Tensor, amount: float | int, seed: int, what: str, dataset: str
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (keep, carved) index split of ``labels``; sklearn does the stratifying."""
    from sklearn.model_selection import train_test_split

    counts = torch.bincount(labels)
    present = counts[counts > 0]
    if present.min() < 2:
        cls = int(torch.nonzero(counts == present.min())[0])
        raise MnistlabError(
            f"dataset {dataset!r}: class {cls} has only {int(present.min())} sample(s); "
            f"cannot carve a stratified {what} set"
        )
    try:
        keep, carved = train_test_split(torch.arange(len(labels)).numpy(), test_size=amount,
                                        stratify=labels.numpy(), random_state=seed, shuffle=True)
    except ValueError as e:
        raise MnistlabError(f"dataset {dataset!r}: cannot carve the {what} set: {e}") from None
    # Sorted indices: each subset keeps the raw files' order (training shuffles anyway).
    return torch.from_numpy(keep).sort().values, torch.from_numpy(carved).sort().values


def _amount(key: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count (got {value!r})")
    if isinstance(value, float) and not 0 < value < 1:
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count (got {value!r})")
    if isinstance(value, int) and value < 1:
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count >= 1 (got {value!r})")
    return value


def split_settings(params: dict[str, Any]) -> tuple[float | int, float | int]:
    """params.yaml's ``split``: ``(val_fraction, test_fraction)``, each a fraction in (0, 1) or
    a count >= 1, no other key. (Whether the data has that many images, :func:`split` checks.)"""
    fractions = section(params, "split", dict.fromkeys(("val_fraction", "test_fraction"), _amount))
    return fractions["val_fraction"], fractions["test_fraction"]


def split(raw: Path, out: Path, classes: list[str], val: Any, test: Any, seed: int,
          dataset: str) -> dict[str, Any]:
    """Split ``raw`` into train/val/test tensor files under ``out``; return the summary.

    The official test set stays the test set; without one, a stratified test set
    is carved from train first, then validation from the rest. Same seed, same
    bytes. Nothing is written unless every check passes.
    """
    raw, out = Path(raw), Path(out)
    val = _amount("split.val_fraction", val)
    test = _amount("split.test_fraction", test)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise MnistlabError(f"params.yaml: seed must be an integer in [0, 2**32) (got {seed!r})")
    n_cls = len(classes)
    images, labels = read_pair(raw, "train", n_cls)
    if (raw / IMAGES["test"]).is_file() or (raw / LABELS["test"]).is_file():
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
    for name, (_, y) in subsets.items():
        per_class = torch.bincount(y, minlength=n_cls)
        if name == "train" and (per_class == 0).any():
            missing = [classes[i] for i in torch.nonzero(per_class == 0).flatten().tolist()]
            raise MnistlabError(f"dataset {dataset!r}: no training samples of class(es) {missing}")
        summary[name] = {"count": len(y), "per_class": per_class.tolist()}
    artifacts.save_split(out, subsets, summary)
    return summary

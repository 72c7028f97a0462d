"""The embedded dataset: scikit-learn's 8x8 digits, brought to MNIST's layout (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

from mnistlab.artifacts import SIDE
from mnistlab.data.idx import IMAGES, LABELS, write_idx


def digits_as_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 UCI digits in MNIST's layout.

    8x8 values 0..16 → 0..255, resized (bilinear) into a 20x20 box centred in a
    28x28 canvas, as MNIST's digits are. Shapes: [1797,28,28] uint8, [1797] int64.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # [N,1,8,8] in 0..1
    box = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", antialias=True,
                                          align_corners=False)  # [N,1,20,20]
    canvas = torch.zeros(len(x), 1, SIDE, SIDE)
    canvas[:, :, 4:24, 4:24] = box.clamp(0, 1)
    images = (canvas.squeeze(1) * 255).round().to(torch.uint8)  # [N,28,28]
    return images, torch.from_numpy(d.target).long()



def write_digits(out: Path) -> list[str]:
    """The embedded dataset has no official test set: write the train pair only."""
    images, labels = digits_as_mnist()
    write_idx(out / IMAGES["train"], images)
    write_idx(out / LABELS["train"], labels)
    return [IMAGES["train"], LABELS["train"]]

"""Model-stage inputs as the earlier stages write them: a test split of real digits, a model record."""

from __future__ import annotations

from pathlib import Path

import torch

from mnistlab.data.digits import digits_as_mnist
from mnistlab.models import build_model, model_record, save_model
from mnistlab.utils import torch_save, write_json

CLASSES = [str(i) for i in range(10)]


def write_split(split: Path, n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """A test split of ``n`` real digits (scikit-learn's, at 28x28) and its summary.json."""
    x, y = digits_as_mnist()
    x, y = x[:n].clone(), y[:n].clone()
    torch_save({"images": x, "labels": y}, split / "test.pt")
    write_json(split / "summary.json", {"classes": CLASSES, "test": {"count": n}})
    return x, y


def write_model(model_dir: Path, arch: str, seed: int = 0, **args) -> torch.nn.Module:
    """An (untrained) model record exactly as the train stage writes ``model.pt``."""
    torch.manual_seed(seed)
    args = {"num_classes": len(CLASSES), **args}
    model = build_model(arch, **args)
    save_model(model_dir / "model.pt", model_record(arch, args, model.state_dict(),
                                                    {"mean": 0.1307, "std": 0.3081}, CLASSES))
    return model

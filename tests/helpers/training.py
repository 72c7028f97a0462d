"""Training in one call, as the train stage does it: :func:`build` then :func:`fit`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnistlab.config import TrainSettings
from mnistlab.distributed import SINGLE
from mnistlab.hparams import HParams
from mnistlab.inference import DeviceSplit
from mnistlab.training import TrainResult, build, fit


def train_fit(hp: HParams, settings: TrainSettings, train: DeviceSplit, val: DeviceSplit, *,
              seed: int, fingerprint: str, checkpoint: Path, num_classes: int = 10,
              dataset: str = "digits", **kw: Any) -> TrainResult:
    """Build ``hp.arch`` for ``train`` and fit it (``kw``: resume, on_epoch, extra_state, dist)."""
    built = build(hp, settings, num_classes=num_classes, n_train=len(train), device=train.x.device,
                  seed=seed, dist=kw.get("dist", SINGLE))
    return fit(built, train, val, hp=hp, settings=settings, dataset=dataset, seed=seed,
               fingerprint=fingerprint, checkpoint=checkpoint, **kw)


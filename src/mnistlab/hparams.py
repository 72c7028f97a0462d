"""``hparams.<arch>`` of params.yaml: one architecture's hyperparameters, validated.

Apart from :mod:`mnistlab.config` because validating an arch's ``args`` needs the
model registry: keeping this here keeps models.py out of the import graph (and so
out of the DVC deps) of the stages that never build a network (download, split,
compare).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mnistlab.config import boolean, choice, mapping, non_negative, number, positive
from mnistlab.errors import MnistlabError
from mnistlab.models import REGISTRY, check_args

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "onecycle", "cosine")


@dataclasses.dataclass(frozen=True)
class HParams:
    """The hyperparameters of one architecture (``hparams.<arch>`` in params.yaml)."""

    arch: str
    args: dict[str, Any]
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    epochs: int
    batch_size: int
    mean: float
    std: float
    translate: float
    rotate: float
    scale: float
    label_smoothing: float
    min_steps: int | None = None  # overrides train.min_steps for this arch when set

    @classmethod
    def from_params(cls, params: dict[str, Any], arch: str) -> HParams:
        """Validate ``hparams.<arch>``.

        Args:
            params: The whole params.yaml mapping.
            arch: A registered architecture name.

        Returns:
            The validated hyperparameters, with defaults filled in.

        Raises:
            MnistlabError: One line naming the offending key, e.g.
                ``params.yaml: hparams.mlp.lr must be a positive number (got 0)``.
        """
        if arch not in REGISTRY:
            raise MnistlabError(f"unknown arch {arch!r} (valid: {', '.join(sorted(REGISTRY))})")
        # Only registered archs: a misspelt section (cnn_16_23) would otherwise sit unused.
        hparams = mapping("hparams", params.get("hparams"), tuple(REGISTRY))
        section = hparams.get(arch)
        if not isinstance(section, dict):
            raise MnistlabError(f"params.yaml: no section hparams.{arch} for arch {arch!r}")
        k = f"hparams.{arch}"
        mapping(k, section, ("args", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
                             "schedule", "epochs", "batch_size", "normalize", "augment",
                             "label_smoothing", "min_steps"))
        args = mapping(f"{k}.args", section.get("args"))
        # num_classes comes from the data and in_channels from the images, never from params.
        for derived in ("num_classes", "in_channels"):
            if derived in args:
                raise MnistlabError(f"params.yaml: {k}.args.{derived} is set from the data; remove it")
        check_args(arch, args, key=f"params.yaml: {k}.args")
        norm = mapping(f"{k}.normalize", section.get("normalize"), ("mean", "std"))
        aug = mapping(f"{k}.augment", section.get("augment"), ("translate", "rotate", "scale"))
        optimizer = choice(f"{k}.optimizer", section.get("optimizer"), OPTIMIZERS)
        mom = non_negative(f"{k}.momentum", section.get("momentum", 0.0))
        nesterov = boolean(f"{k}.nesterov", section.get("nesterov", False))
        # Adam's momentum is betas[0]; silently ignoring a momentum the user set would mislead.
        if optimizer != "sgd" and ("momentum" in section or nesterov):
            raise MnistlabError(f"params.yaml: {k}.momentum/nesterov apply to sgd only "
                                f"(optimizer is {optimizer})")
        if nesterov and mom == 0:
            raise MnistlabError(f"params.yaml: {k}.nesterov needs {k}.momentum > 0")
        hp = cls(
            arch=arch,
            args=args,
            optimizer=optimizer,
            lr=positive(f"{k}.lr", section.get("lr")),
            momentum=mom,
            nesterov=nesterov,
            weight_decay=non_negative(f"{k}.weight_decay", section.get("weight_decay", 0.0)),
            schedule=choice(f"{k}.schedule", section.get("schedule", "constant"), SCHEDULES),
            epochs=positive(f"{k}.epochs", section.get("epochs"), int),
            batch_size=positive(f"{k}.batch_size", section.get("batch_size"), int),
            mean=number(f"{k}.normalize.mean", norm.get("mean", 0.0)),
            std=positive(f"{k}.normalize.std", norm.get("std", 1.0)),
            translate=non_negative(f"{k}.augment.translate", aug.get("translate", 0.0)),
            rotate=non_negative(f"{k}.augment.rotate", aug.get("rotate", 0.0)),
            scale=non_negative(f"{k}.augment.scale", aug.get("scale", 0.0)),
            label_smoothing=non_negative(f"{k}.label_smoothing", section.get("label_smoothing", 0.0)),
        )
        if "min_steps" in section:
            ms = section["min_steps"]
            if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
                raise MnistlabError(f"params.yaml: {k}.min_steps must be an integer >= 0 (got {ms!r})")
            hp = dataclasses.replace(hp, min_steps=ms)
        if hp.momentum >= 1:  # 1 never forgets a gradient: the step grows without bound
            raise MnistlabError(f"params.yaml: {k}.momentum must be < 1 (got {hp.momentum})")
        if hp.label_smoothing >= 1:
            raise MnistlabError(f"params.yaml: {k}.label_smoothing must be < 1 (got {hp.label_smoothing})")
        if hp.scale >= 1:
            raise MnistlabError(f"params.yaml: {k}.augment.scale must be < 1 (got {hp.scale})")
        return hp

    @property
    def augments(self) -> bool:
        """Whether any random affine augmentation is configured."""
        return self.translate > 0 or self.rotate > 0 or self.scale > 0

    def flat(self) -> dict[str, Any]:
        """Flat ``{name: value}`` for MLflow params (args prefixed ``arg_``)."""
        d = dataclasses.asdict(self)
        if d["min_steps"] is None:  # unset: train.min_steps applies (logged beside)
            del d["min_steps"]
        args = d.pop("args")
        d.update({f"arg_{a}": v for a, v in sorted(args.items())})
        return d

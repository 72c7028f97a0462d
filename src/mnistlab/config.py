"""Reading params.yaml and validating the sections stages use.

Every error names the exact params key, e.g. ``hparams.mlp.lr: must be > 0 (got -1)``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from mnistlab.errors import MnistlabError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "onecycle", "cosine")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load params.yaml (a user error if missing or not YAML)."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MnistlabError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise MnistlabError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(params, dict):
        raise MnistlabError(f"{path}: expected a mapping at the top level")
    return params


def get(params: dict[str, Any], key: str) -> Any:
    """``get(p, "a.b")`` → ``p["a"]["b"]``, or an error naming the missing key."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise MnistlabError(f"params.yaml: missing key {key!r}")
        node = node[part]
    return node


def positive(key: str, value: Any, kind: type = float) -> Any:
    """Check ``value`` is a finite number > 0 (an int if ``kind`` is int)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise MnistlabError(f"params.yaml: {key} must be {what} (got {value!r})")
    return kind(value)


def non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise MnistlabError(f"params.yaml: {key} must be a number >= 0 (got {value!r})")
    return float(value)


def choice(key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise MnistlabError(
            f"params.yaml: {key}: unknown value {value!r} (valid: {', '.join(valid)})"
        )
    return value


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

    @classmethod
    def from_params(cls, params: dict[str, Any], arch: str) -> HParams:
        """Validate ``hparams.<arch>``; every problem names its key."""
        section = params.get("hparams", {}).get(arch)
        if not isinstance(section, dict):
            raise MnistlabError(f"params.yaml: no section hparams.{arch} for arch {arch!r}")
        k = f"hparams.{arch}"
        known = {f.name for f in dataclasses.fields(cls)} - {"mean", "std", "translate",
                                                            "rotate", "scale", "arch"}
        known |= {"normalize", "augment"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise MnistlabError(f"params.yaml: {k}: unknown key(s) {', '.join(unknown)}")
        norm = section.get("normalize", {"mean": 0.0, "std": 1.0})
        aug = section.get("augment", {}) or {}
        mom = non_negative(f"{k}.momentum", section.get("momentum", 0.0))
        nesterov = bool(section.get("nesterov", False))
        if nesterov and mom == 0:
            raise MnistlabError(f"params.yaml: {k}.nesterov needs {k}.momentum > 0")
        hp = cls(
            arch=arch,
            args=dict(section.get("args", {}) or {}),
            optimizer=choice(f"{k}.optimizer", section.get("optimizer"), OPTIMIZERS),
            lr=positive(f"{k}.lr", section.get("lr")),
            momentum=mom,
            nesterov=nesterov,
            weight_decay=non_negative(f"{k}.weight_decay", section.get("weight_decay", 0.0)),
            schedule=choice(f"{k}.schedule", section.get("schedule", "constant"), SCHEDULES),
            epochs=positive(f"{k}.epochs", section.get("epochs"), int),
            batch_size=positive(f"{k}.batch_size", section.get("batch_size"), int),
            mean=float(norm.get("mean", 0.0)),
            std=positive(f"{k}.normalize.std", norm.get("std", 1.0)),
            translate=non_negative(f"{k}.augment.translate", aug.get("translate", 0.0)),
            rotate=non_negative(f"{k}.augment.rotate", aug.get("rotate", 0.0)),
            scale=non_negative(f"{k}.augment.scale", aug.get("scale", 0.0)),
            label_smoothing=non_negative(f"{k}.label_smoothing", section.get("label_smoothing", 0.0)),
        )
        if hp.label_smoothing >= 1:
            raise MnistlabError(f"params.yaml: {k}.label_smoothing must be < 1")
        return hp

    @property
    def augments(self) -> bool:
        return self.translate > 0 or self.rotate > 0 or self.scale > 0

    def flat(self) -> dict[str, Any]:
        """Flat ``{name: value}`` for MLflow params (args prefixed ``arg_``)."""
        d = dataclasses.asdict(self)
        args = d.pop("args")
        d.update({f"arg_{a}": v for a, v in sorted(args.items())})
        return d


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Settings shared by every train stage (``train`` in params.yaml)."""

    device: str = "auto"
    deterministic: bool = True
    min_steps: int = 0
    bf16: bool = True
    channels_last: bool = False
    compile: bool = False
    eval_batch_size: int = 2000
    checkpoint_every: int = 1

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainSettings:
        s = dict(params.get("train", {}) or {})
        unknown = sorted(set(s) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise MnistlabError(f"params.yaml: train: unknown key(s) {', '.join(unknown)}")
        ms = s.get("min_steps", 0)
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise MnistlabError(f"params.yaml: train.min_steps must be an integer >= 0 (got {ms!r})")
        out = cls(**s)
        positive("train.eval_batch_size", out.eval_batch_size, int)
        positive("train.checkpoint_every", out.checkpoint_every, int)
        return out

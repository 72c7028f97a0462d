"""Reading params.yaml and validating the sections stages use.

Every error names the exact params key, e.g. ``hparams.mlp.lr: must be > 0 (got -1)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from mnistlab.errors import MnistlabError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "onecycle", "cosine")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats.

    Why: PyYAML follows YAML 1.1, where a float needs a dot, so ``1e-06`` (which
    ``dvc exp run -S hparams.mlp.lr=1e-6`` writes, and DVC itself reads as a
    float) would arrive here as a string.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text as params.yaml is parsed (safe, with YAML 1.2 floats)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: str | Path = "params.yaml", what: str = "params file") -> dict[str, Any]:
    """Load a YAML mapping such as params.yaml (a user error if missing, not YAML or not a mapping).

    ``what`` names the file in the not-found message (e.g. "CI profile").
    """
    path = Path(path)
    try:
        params = load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise MnistlabError(f"{path}: {what} not found") from None
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
    """Check ``value`` is a finite number >= 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
            or not math.isfinite(value)):
        raise MnistlabError(f"params.yaml: {key} must be a number >= 0 (got {value!r})")
    return float(value)


def number(key: str, value: Any) -> float:
    """Check ``value`` is a finite number (any sign)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MnistlabError(f"params.yaml: {key} must be a number (got {value!r})")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    """Check ``value`` is a YAML boolean (``"yes"`` as a string would silently be truthy)."""
    if not isinstance(value, bool):
        raise MnistlabError(f"params.yaml: {key} must be true or false (got {value!r})")
    return value


def choice(key: str, value: Any, valid: tuple[str, ...]) -> str:
    """Check ``value`` is one of ``valid``; the error lists them."""
    if value not in valid:
        raise MnistlabError(
            f"params.yaml: {key}: unknown value {value!r} (valid: {', '.join(valid)})"
        )
    return value


def mapping(key: str, value: Any, known: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check ``value`` is a mapping (``None`` counts as empty) with only ``known`` keys.

    Why reject unknown keys: a typo such as ``augment: {rotation: 10}`` would
    otherwise be ignored without a word, and the run would silently differ.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MnistlabError(f"params.yaml: {key} must be a mapping (got {value!r})")
    if known is not None:
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise MnistlabError(
                f"params.yaml: {key}: unknown key(s) {', '.join(map(str, unknown))} "
                f"(valid: {', '.join(known)})"
            )
    return dict(value)


def seed_of(params: dict[str, Any]) -> int:
    """The global ``seed``: an integer >= 0."""
    seed = get(params, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MnistlabError(f"params.yaml: seed must be an integer >= 0 (got {seed!r})")
    return seed


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
        from mnistlab.models import REGISTRY, check_args

        if arch not in REGISTRY:
            raise MnistlabError(f"unknown arch {arch!r} (valid: {', '.join(sorted(REGISTRY))})")
        hparams = mapping("hparams", params.get("hparams"))
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


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Settings shared by every train stage (``train`` in params.yaml)."""

    device: str = "auto"
    deterministic: bool = True
    min_steps: int = 0
    # The floor applies only to training sets smaller than this (see training.step_floor).
    min_steps_below: int = 50_000
    bf16: bool = True
    channels_last: bool = False
    compile: bool = False
    eval_batch_size: int = 2000
    checkpoint_every: int = 1
    # Read by dvc.yaml's train command only: "python", or e.g.
    # "torchrun --standalone --nproc_per_node 2" to train each stage with DDP.
    launcher: str = "python"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainSettings:
        """Validate the ``train`` section; every problem names its key."""
        s = mapping("train", params.get("train"), tuple(f.name for f in dataclasses.fields(cls)))
        ms = s.get("min_steps", 0)
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise MnistlabError(f"params.yaml: train.min_steps must be an integer >= 0 (got {ms!r})")
        if not isinstance(s.get("device", "auto"), str):
            raise MnistlabError(f"params.yaml: train.device must be a string such as auto, cpu "
                                f"or cuda:0 (got {s['device']!r})")
        if not isinstance(s.get("launcher", "python"), str) or not s.get("launcher", "python").strip():
            raise MnistlabError("params.yaml: train.launcher must be a command such as python or "
                                f"'torchrun --standalone --nproc_per_node 2' (got {s['launcher']!r})")
        for flag in ("deterministic", "bf16", "channels_last", "compile"):
            if flag in s:
                boolean(f"train.{flag}", s[flag])
        for count in ("eval_batch_size", "checkpoint_every", "min_steps_below"):
            if count in s:
                s[count] = positive(f"train.{count}", s[count], int)
        return cls(**s)

"""One registry of architectures: name → builder taking its sizes as arguments.

The five classic tutorial networks are reproduced layer for layer (their
training hyperparameters live in params.yaml, ``hparams.<arch>``), plus
``resnet_bn``, our modern one. Every builder takes ``num_classes`` and
``in_channels`` so a model can be rebuilt from a checkpoint's
``(arch, args)`` alone, without params.yaml.

All models map [N, C, 28, 28] float → [N, num_classes] scores. ``cnn_4_8``
returns log-probabilities as its tutorial did; cross-entropy on those equals
NLL (log_softmax is idempotent), so one loss serves every architecture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import pydantic
import torch
from pydantic.fields import FieldInfo
from torch import nn

from mnistlab.errors import MnistlabError
from mnistlab.utils import check_seal, seal, torch_load, torch_save

REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# name -> a strict pydantic schema of its builder's arguments, made by register().
ARGS: dict[str, type[pydantic.BaseModel]] = {}

# The types a builder's arguments are annotated with: each carries its range and the
# words an error uses. Strict: YAML's "500" (a string), 5.0 or true is refused, never
# coerced, so params.yaml means what it says; a 0 or -5 is a one-line error naming the
# key instead of a torch traceback or, for 0, a model that silently learns nothing.
Size = Annotated[int, pydantic.Field(strict=True, ge=1, description="an integer >= 1")]
Probability = Annotated[float, pydantic.Field(strict=True, ge=0, lt=1,
                                              description="a number in [0, 1)")]
Scale = Annotated[float, pydantic.Field(strict=True, gt=0, allow_inf_nan=False,
                                        description="a finite number > 0")]


def _args_schema(fn: Callable[..., nn.Module]) -> type[pydantic.BaseModel]:
    """A pydantic model of ``fn``'s keyword arguments, from its signature and annotations.

    Every argument must have a default (a model is rebuilt from partial args) and a
    ranged type such as :data:`Size` (an unranged ``int`` would let 0 through).
    """
    hints = get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        ranged = any(isinstance(m, FieldInfo) and m.description
                     for m in getattr(hints.get(p.name), "__metadata__", ()))
        if not ranged or p.default is inspect.Parameter.empty:
            raise TypeError(f"arch {fn.__name__!r}: argument {p.name!r} needs a default and a "
                            "ranged type such as Size or Probability")
        fields[p.name] = (hints[p.name], p.default)
    return pydantic.create_model(f"{fn.__name__}_args", __config__=pydantic.ConfigDict(extra="forbid"),
                                 **fields)


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add a builder to :data:`REGISTRY` under its function name (names must be unique)."""
    if fn.__name__ in REGISTRY:
        raise ValueError(f"arch {fn.__name__!r} registered twice")
    ARGS[fn.__name__] = _args_schema(fn)
    REGISTRY[fn.__name__] = fn
    return fn


def build_model(name: str, **args: Any) -> nn.Module:
    """Build architecture ``name`` with size arguments ``args``.

    Args:
        name: A key of :data:`REGISTRY`.
        **args: The builder's keyword arguments (``num_classes``, ``in_channels``, sizes).

    Returns:
        A freshly initialised ``nn.Module`` (on the CPU, in training mode).

    Raises:
        MnistlabError: ``name`` is not registered, ``args`` names an argument the
            builder does not take (both one line listing the valid choices), or a value
            is out of its type's range.
    """
    check_args(name, args)
    try:
        return REGISTRY[name](**args)
    except (MemoryError, RuntimeError) as e:
        # A size in range that no machine can hold (hidden: 100000000): the allocator's
        # error is the user's setting, not a bug. Any other RuntimeError keeps its traceback.
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(e):
            raise
        shown = ", ".join(f"{k}={v}" for k, v in args.items() if k not in ("num_classes", "in_channels"))
        raise MnistlabError(f"arch {name!r} ({shown}): the network's weights do not fit in "
                            f"memory; make its sizes (hparams.{name}.args in params.yaml) "
                            "smaller") from None


def check_args(name: str, args: dict[str, Any], key: str | None = None) -> None:
    """Raise a one-line error unless ``name`` is registered and ``args`` fit its schema (:data:`ARGS`).

    Why validate up front instead of catching errors from the call: a ``TypeError``
    raised *inside* a builder is a bug and must keep its traceback.

    Args:
        name: Architecture name.
        args: Keyword arguments meant for its builder.
        key: The params key to name in the message (default: ``arch 'name'``), e.g.
            ``params.yaml: hparams.mlp.args`` gives
            ``params.yaml: hparams.mlp.args.hidden: must be an integer >= 1 (got -5)``.
    """
    if name not in REGISTRY:
        raise MnistlabError(f"unknown arch {name!r} (valid: {', '.join(sorted(REGISTRY))})")
    schema, where = ARGS[name], key or f"arch {name!r}"
    unknown = sorted(map(str, set(args) - set(schema.model_fields)))
    if unknown:
        raise MnistlabError(
            f"{where}: unknown argument(s) {', '.join(unknown)} "
            f"(valid: {', '.join(schema.model_fields)})"
        )
    try:
        schema.model_validate(args)
    except pydantic.ValidationError as e:
        arg = e.errors()[0]["loc"][0]  # the first bad one: one line, as for every other key
        raise MnistlabError(f"{where}.{arg}: must be {schema.model_fields[arg].description} "
                            f"(got {args[arg]!r})") from None


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the five classics


@register
def mlp(num_classes: Size = 10, in_channels: Size = 1, hidden: Size = 500) -> nn.Module:
    """784-500-10 feed-forward net with ReLU (yunjey/pytorch-tutorial)."""
    return nn.Sequential(
        nn.Flatten(),                          # [N,1,28,28] -> [N,784]
        nn.Linear(in_channels * 28 * 28, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register
def cnn_16_32(num_classes: Size = 10, in_channels: Size = 1, c1: Size = 16, c2: Size = 32) -> nn.Module:
    """conv16 5x5 → conv32 5x5 → linear, ReLU + 2x2 max-pool (MorvanZhou's 401_CNN)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # -> [N,16,14,14]
        nn.Conv2d(c1, c2, 5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2),           # -> [N,32,7,7]
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, num_classes),
    )


@register
def cnn_32_64(num_classes: Size = 10, in_channels: Size = 1, c1: Size = 32, c2: Size = 64,
              hidden: Size = 128) -> nn.Module:
    """conv32 3x3 → pool → conv64 3x3 → pool → fc128 → fc, no dropout (the SGD 0.01/0.9 tutorial).

    225,034 parameters at the defaults. Not pytorch/examples' conv-conv-pool-dropout-fc9216
    net (1.2 M parameters), which an earlier version registered under this name.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3), nn.ReLU(), nn.MaxPool2d(2),   # -> [N,32,13,13]
        nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2),            # -> [N,64,5,5]
        nn.Flatten(),
        nn.Linear(c2 * 5 * 5, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register
def cnn_4_8(num_classes: Size = 10, in_channels: Size = 1, c1: Size = 4, c2: Size = 8,
            hidden: Size = 512, dropout: Probability = 0.5) -> nn.Module:
    """conv4 5x5 p2 → pool → conv8 5x5 p2 → pool → fc512 + dropout → fc → log-softmax.

    207,258 parameters at the defaults. The padding keeps 28→14→7, so the first
    linear layer sees 8x7x7 = 392 features (without it: 8x4x4 and 72,090 parameters).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # -> [N,4,14,14]
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),            # -> [N,8,7,7]
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
        nn.LogSoftmax(dim=1),
    )


@register
def lenet5(num_classes: Size = 10, in_channels: Size = 1) -> nn.Module:
    """LeNet-5 as in d2l.ai: sigmoid, average pooling, Xavier-uniform init."""
    net = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),  # -> [N,6,14,14]
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2, 2),                      # -> [N,16,5,5]
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)  # d2l's init_cnn; biases keep torch's default
    return net


# --------------------------------------------------------------------------- ours


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        # No conv bias: BatchNorm's shift makes it redundant.
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _GlobalMaxPool(nn.Module):
    """[N,C,H,W] → [N,C]: the max over each feature map.

    Why not ``nn.AdaptiveMaxPool2d(1)``: its CUDA backward has no deterministic
    implementation, so ``train.deterministic: true`` would raise on a GPU.
    ``amax``'s backward is elementwise, hence deterministic everywhere.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class _Residual(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = _ConvBN(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetBN(nn.Module):
    """Small residual CNN with BatchNorm: three stages at 28/14/7 px, global pooling.

    Sized for CPUs: ~22 M multiply-adds per image (cnn_32_64 needs ~12 M) and
    pooling early, where the classics spend most of their compute at 28x28.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32,
                 logit_scale: float = 1.0):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            _ConvBN(in_channels, w1), nn.MaxPool2d(2),        # -> [N,w1,14,14]
            _ConvBN(w1, w2), _Residual(w2), nn.MaxPool2d(2),  # -> [N,w2,7,7]
            _ConvBN(w2, w3), _Residual(w3),                   # -> [N,w3,7,7]
            _GlobalMaxPool(),                                 # -> [N,w3]
        )
        self.head = nn.Linear(w3, num_classes)
        # Why scale the logits: the pooled features are maxima of ReLU outputs plus residual
        # sums, all positive and large (mean ~3 at init), so the head's gradient is ~10x its
        # weights and the first warm-up steps of SGD with momentum throw the logits far out:
        # on digits every seed's training loss rose from 2.3 to 7-17 in epochs 2-3 before
        # recovering. A constant 1/8 on the logits (the DAWNBench ResNet-9's Mul(0.125),
        # airbench's 1/9) keeps the head's steps in proportion; params.yaml sets it. The
        # default 1.0 is the network as first trained: model files whose args lack it
        # rebuild unchanged.
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * self.logit_scale


@register
def resnet_bn(num_classes: Size = 10, in_channels: Size = 1, width: Size = 32,
              logit_scale: Scale = 1.0) -> nn.Module:
    """Ours: residual BatchNorm CNN, trained with one-cycle + on-device augmentation."""
    return ResNetBN(num_classes, in_channels, width, logit_scale)


# --------------------------------------------------------------------------- the model file
# models/<ds>/<arch>/seed-<seed>/{model,best}.pt: written by the train stage, read by evaluate and
# features. It lives here, beside the registry (as timm keeps its checkpoint loader
# beside create_model), because reading it means building a registered network.

MODEL_KEYS = ("arch", "args", "state_dict", "normalize", "classes")


def model_record(arch: str, args: dict[str, Any], state: dict[str, torch.Tensor],
                 normalize: dict[str, float], classes: list[str]) -> dict[str, Any]:
    """A final-model file: weights plus all that is needed to rebuild and feed the model.

    Keys: ``arch``, ``args`` (builder arguments incl. num_classes), ``state_dict``
    (CPU tensors), ``normalize`` ({mean, std}) and ``classes``. Later stages read
    it with ``weights_only=True``, so it holds only tensors and plain containers.
    """
    return {"arch": arch, "args": args, "state_dict": {k: v.cpu() for k, v in state.items()},
            "normalize": dict(normalize), "classes": list(classes)}


def save_model(path: Path, record: dict[str, Any]) -> None:
    """Write a :func:`model_record` atomically, sealed with its SHA-256 (:func:`mnistlab.utils.seal`)."""
    torch_save(seal(record), path)


def _retrain_hint(path: Path) -> str:
    """How to rewrite a model file: its train stage, when the path is
    ``<models>/<ds>/<arch>/seed-<seed>/`` (:func:`mnistlab.config.run_dir`)."""
    ds, arch, run = path.parent.parent.parent.name, path.parent.parent.name, path.parent.name
    seed = run.removeprefix("seed-")
    if ds and arch in REGISTRY and run.startswith("seed-") and seed.isdigit():
        return f"rerun its train stage (dvc repro -f -s train@{ds}-{arch}-{seed})"
    return "retrain it (dvc repro -f -s train@<dataset>-<arch>-<seed>)"


def load_model(path: Path, device: torch.device, arch: str | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a train stage saved (weights only) and put it on ``device`` in eval mode.

    Args:
        path: A ``model.pt`` written by the train stage.
        device: Where to put the model.
        arch: If given, the arch the file must hold (a stage's item), else a one-line error.

    Returns:
        The model and its record (``arch``, ``args``, ``normalize``, ``classes``, ...).

    Raises:
        MnistlabError: Not a loadable model file, one whose digest differs (altered or
            damaged), or one without a digest. Why refuse the last: it was written before
            model files were sealed (or not by the train stage), and in the pipeline DVC
            retrains it anyway (the train stage's code changed since), so only a stale or
            hand-made file gets here, and its weights cannot be vouched for.
    """
    record = torch_load(path)
    if not isinstance(record, dict) or not set(MODEL_KEYS) <= set(record):
        raise MnistlabError(f"{path}: not a model file (needs keys {', '.join(MODEL_KEYS)})")
    if not check_seal(record, path, _retrain_hint(path)):
        raise MnistlabError(f"{path}: no integrity digest (written by an older mnistlab, or not "
                            f"by the train stage): its weights cannot be verified; {_retrain_hint(path)}")
    if arch is not None and record["arch"] != arch:
        raise MnistlabError(f"{path}: holds arch {record['arch']!r}, expected {arch!r}")
    model = build_model(record["arch"], **record["args"])
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise MnistlabError(f"{path}: weights do not fit arch {record['arch']!r} ({first})") from None
    return model.to(device).eval(), record

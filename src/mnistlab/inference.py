"""Models on the device: resident data, autocast, batched prediction.

What training, evaluation, features and prediction share. The whole split is
moved to the device once as uint8 and converted and normalised there, as in
airbench; prediction is batched under ``torch.inference_mode`` in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnistlab.errors import MnistlabError


@dataclass
class DeviceSplit:
    """One subset resident on the device: x [N,1,28,28] float normalised, y [N] int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def to_device(images: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
              device: torch.device, channels_last: bool = False) -> DeviceSplit:
    """uint8 [N,28,28] → normalised float [N,1,28,28] on ``device``, converted once.

    The copy travels as uint8 (4x less than float) and is converted on arrival.
    """
    x = images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return DeviceSplit(x, labels.to(device, non_blocking=True).long())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls/convs natively (so autocast speeds it up).

    CUDA does; so do CPUs with AVX512-BF16 or AMX through oneDNN (about 1.3-1.7x on
    these convs on a 2-core EPYC). Elsewhere bf16 would be emulated: slower, so off.
    """
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast(device: torch.device, bf16: bool, *, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``bf16`` and the device has native bf16; a no-op context elsewhere.

    The loss is always computed in float32 (callers cast the scores with ``.float()``).
    ``cache=False``: no cache of the weights' bf16 casts (a CUDA graph's captured step).
    """
    if bf16 and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, bf16: bool = True) -> torch.Tensor:
    """Scores for ``x`` in eval mode, batched; returns float32 [N, classes] on x's device."""
    model.eval()
    outs = []
    for start in range(0, len(x), batch_size):
        with autocast(x.device, bf16):
            outs.append(model(x[start:start + batch_size]).float())
    return torch.cat(outs)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: the last ``nn.Linear``; its input is the penultimate-layer embedding."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MnistlabError(f"{type(model).__name__}: no nn.Linear layer to take embeddings from")
    return linears[-1]


@contextlib.contextmanager
def recording(layers: dict[str, nn.Module], inputs: bool = False) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While open, every forward pass appends what each of ``layers`` saw (``inputs``) or produced
    to ``{name: [CPU float32 tensor per call]}``; the hooks are removed on leaving."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = []
    for name, layer in layers.items():
        if inputs:
            handles.append(layer.register_forward_pre_hook(
                lambda _m, args, name=name: got[name].append(args[0].detach().float().cpu())))
        else:
            handles.append(layer.register_forward_hook(
                lambda _m, _a, out, name=name: got[name].append(out.detach().float().cpu())))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def capture(model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor, inputs: bool = False,
            batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` (eval mode, fp32, batched) and return what each layer saw or produced.

    Args:
        model: Any network.
        layers: ``{name: module}`` to hook.
        x: The model's input [N, C, H, W].
        inputs: Record each layer's input (forward pre-hook) instead of its output.
        batch_size: Batch size for :func:`predict` (default: all at once).

    Returns:
        ``{name: tensor}`` concatenated over batches, on the CPU ([N, ...] each).
    """
    with recording(layers, inputs) as got:
        predict(model, x, batch_size or max(1, len(x)), bf16=False)
    return {n: torch.cat(v) for n, v in got.items()}


def evaluate(model: nn.Module, data: DeviceSplit, batch_size: int, bf16: bool = True
             ) -> dict[str, torch.Tensor]:
    """Mean cross-entropy and accuracy on ``data`` (device tensors; read them when needed)."""
    out = predict(model, data.x, batch_size, bf16)
    return {"loss": F.cross_entropy(out, data.y), "accuracy": (out.argmax(1) == data.y).float().mean()}


def channels_last(model: nn.Module) -> nn.Module:
    """``model`` (in place) with NHWC conv weights: oneDNN's fast layout on CPU, as in training."""
    return model.to(memory_format=torch.channels_last)


def scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: dict[str, float],
           device: torch.device, batch_size: int, nhwc: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of ``model`` for uint8 ``images`` [N,28,28], normalised as in training.

    ``nhwc``: run in channels_last (converts ``model`` in place); same scores to ~1e-6.

    Returns:
        ``(scores [N, K] float32 on the CPU, labels [N] int64 on the CPU)``.
    """
    if nhwc:
        channels_last(model)
    d = to_device(images, labels, normalize["mean"], normalize["std"], device, nhwc)
    # fp32 even on CUDA: these are the numbers of record, and the CI gate compares
    # them across machines; bf16 would add its own rounding to every logit.
    out = predict(model, d.x, batch_size, bf16=False)
    return out.cpu(), d.y.cpu()

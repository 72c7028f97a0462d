"""Training on device-resident tensors, with exact resume.

The loop follows airbench rather than the tutorials: the whole split is moved
to the device once as uint8, converted and normalised once; each epoch shuffles
with a seeded on-device ``randperm`` and slices batches out of it; augmentation
is one batched affine warp on the device. There is no DataLoader and no host
sync per step: losses and hits are summed in device tensors and read once per
epoch (which is also when the NaN guard looks at them).

Reproducibility: the epoch's permutation and augmentation come from a generator
seeded with ``(seed, epoch)``, and dropout's global RNG state is saved in every
checkpoint, so a run resumed from epoch k ends bit-identical to one that was
never interrupted (deterministic algorithms are on by default on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mnistlab.config import HParams, TrainSettings
from mnistlab.errors import MnistlabError
from mnistlab.models import build_model
from mnistlab.utils import torch_load, torch_save

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data on the device


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


def augment(x: torch.Tensor, hp: HParams, gen: torch.Generator) -> torch.Tensor:
    """Random affine warp (translate px, rotate deg, scale fraction) of a batch, on its device.

    One ``affine_grid``/``grid_sample`` for the whole batch: no per-sample Python.
    Shapes: [B,C,H,W] → [B,C,H,W]; the background keeps the value of an empty pixel.
    """
    b, _, h, _ = x.shape
    u = torch.rand(b, 4, generator=gen, device=x.device) * 2 - 1  # U(-1, 1)
    angle = u[:, 0] * math.radians(hp.rotate)
    scale = 1 + u[:, 1] * hp.scale
    shift = u[:, 2:] * (2 * hp.translate / h)  # pixels -> normalised [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # [B,2,3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin()  # the normalised value of a 0 pixel
    return F.grid_sample(x - background, grid, padding_mode="zeros", align_corners=False) + background


# --------------------------------------------------------------------------- optimisation


def make_optimizer(model: nn.Module, hp: HParams) -> torch.optim.Optimizer:
    params = model.parameters()
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                               weight_decay=hp.weight_decay)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    raise MnistlabError(f"hparams.{hp.arch}.optimizer: unknown {hp.optimizer!r} (valid: sgd, adam, adamw)")


def make_scheduler(opt: torch.optim.Optimizer, hp: HParams, total_steps: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: ``constant`` (the tutorials), ``onecycle`` or ``cosine``."""
    if hp.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=total_steps,
                                                   pct_start=0.25)
    if hp.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (``drop_last=True``; one batch of all ``n`` if n < batch_size).

    Why not the tutorials' ``drop_last=False``: a fixed batch shape is what
    torch.compile and CUDA graphs want, and a tiny trailing batch (13 images on
    digits at batch 256) is a huge noisy step at LeNet's lr 0.9 that keeps it at
    chance. The epoch's fresh permutation still shows every image over epochs.
    """
    return max(1, n // batch_size)


def effective_epochs(hp: HParams, n_train: int, min_steps: int) -> int:
    """``hp.epochs``, raised until the run makes at least ``min_steps`` optimiser steps.

    Why: the tutorials' epoch counts assume 60,000 images. On the 1,300-image
    digits quickstart, LeNet-5's 10 epochs at batch 256 are 60 steps — chance
    level. A floor on steps keeps every architecture meaningful on small data,
    and ``train.min_steps: 0`` restores the tutorials' settings exactly.
    """
    return max(hp.epochs, math.ceil(min_steps / steps_per_epoch(n_train, hp.batch_size)))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator for one epoch's shuffle and augmentation: a pure function of (seed, epoch)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    # bf16 autocast only on CUDA: on CPU it is slower for these small convs and
    # would make CPU runs differ from the fp32 reference numbers.
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, data: DeviceSplit, hp: HParams,
                    gen: torch.Generator, bf16: bool, progress: tqdm | None = None
                    ) -> dict[str, torch.Tensor]:
    """One pass over ``data``; returns on-device sums (no host sync inside)."""
    model.train()
    device = data.x.device
    perm = torch.randperm(len(data), generator=gen, device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for step in range(steps_per_epoch(len(data), hp.batch_size)):
        idx = perm[step * hp.batch_size:(step + 1) * hp.batch_size]
        x, y = data.x[idx], data.y[idx]
        if hp.augments:
            x = augment(x, hp, gen)
        with autocast(device, bf16):
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=hp.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        if progress is not None:
            progress.update()
    return {"loss_sum": loss_sum, "correct": correct}


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, bf16: bool = True) -> torch.Tensor:
    """Scores for ``x`` in eval mode, batched; returns float32 [N, classes] on x's device."""
    model.eval()
    outs = []
    for start in range(0, len(x), batch_size):
        with autocast(x.device, bf16):
            outs.append(model(x[start:start + batch_size]).float())
    return torch.cat(outs)


def evaluate(model: nn.Module, data: DeviceSplit, batch_size: int, bf16: bool = True
             ) -> dict[str, torch.Tensor]:
    """Mean cross-entropy and accuracy on ``data`` (device tensors; read them when needed)."""
    out = predict(model, data.x, batch_size, bf16)
    return {"loss": F.cross_entropy(out, data.y), "accuracy": (out.argmax(1) == data.y).float().mean()}


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resumable(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this exact run (same fingerprint), else None."""
    if not path.is_file():
        return None
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != fingerprint:
        log.warning("%s: made with other params or data (fingerprint differs); not resumed, "
                    "training from scratch", path)
        return None
    return ckpt


# --------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]]
    summary: dict[str, float]
    best_state: dict[str, torch.Tensor]


def fit(hp: HParams, settings: TrainSettings, train: DeviceSplit, val: DeviceSplit, *,
        num_classes: int, seed: int, fingerprint: str, checkpoint: Path, tag: str,
        resume: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        extra_state: dict[str, Any] | None = None,
        ) -> TrainResult:
    """Train ``hp.arch`` on ``train``, validating on ``val`` each epoch.

    Continues from ``resume`` (a checkpoint from :func:`load_resumable`) if given;
    writes ``checkpoint`` after every ``settings.checkpoint_every`` epochs
    (atomically) and at the end.
    ``on_epoch`` receives each epoch's metrics (epoch, train/val loss and accuracy,
    lr, epoch_seconds); ``extra_state`` is stored in the checkpoint verbatim.
    """
    device = train.x.device
    torch.manual_seed(seed)  # model init and dropout draw from the global RNG
    args = {"num_classes": num_classes, **hp.args}
    model = build_model(hp.arch, **args).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    epochs = effective_epochs(hp, len(train), settings.min_steps)
    total_steps = epochs * steps_per_epoch(len(train), hp.batch_size)
    opt = make_optimizer(model, hp)
    sched = make_scheduler(opt, hp, total_steps)
    history: list[dict[str, float]] = []
    best_acc, best_state = -1.0, {k: v.detach().clone() for k, v in model.state_dict().items()}
    start_epoch = 1

    ckpt = resume
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        best_acc, best_state = ckpt["best_val_accuracy"], ckpt["best_model"]
        start_epoch = ckpt["epoch"] + 1
        log.info("%s: resuming from %s after epoch %d/%d", tag, checkpoint, ckpt["epoch"], epochs)

    step_model = torch.compile(model) if settings.compile else model
    if epochs != hp.epochs and start_epoch == 1:
        log.info("%s: %d epochs instead of %d so that at least train.min_steps=%d steps are made",
                 tag, epochs, hp.epochs, settings.min_steps)

    def save(epoch: int) -> None:
        torch_save({
            "arch": hp.arch, "args": args, "epoch": epoch, "epochs": epochs,
            "fingerprint": fingerprint, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
            "history": history, "best_val_accuracy": best_acc, "best_model": best_state,
            **(extra_state or {}),
        }, checkpoint)

    quiet = not sys.stderr.isatty()
    for epoch in range(start_epoch, epochs + 1):
        gen = epoch_generator(seed, epoch, device)
        lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        with tqdm(total=steps_per_epoch(len(train), hp.batch_size), desc=f"{tag} {epoch}/{epochs}", unit="step", disable=quiet,
                  leave=False) as bar:
            sums = train_one_epoch(step_model, opt, sched, train, hp, gen, settings.bf16, bar)
        # Host syncs happen here, twice an epoch: once to time training alone,
        # once to read validation; never inside the step loop.
        loss_sum, correct = float(sums["loss_sum"]), int(sums["correct"])
        train_s = time.perf_counter() - t0
        v = evaluate(step_model, val, settings.eval_batch_size, settings.bf16)
        v_loss, v_acc = float(v["loss"]), float(v["accuracy"])
        seconds = time.perf_counter() - t0
        if not math.isfinite(loss_sum):
            raise MnistlabError(
                f"dataset {tag.split('-')[0]!r}, arch {hp.arch!r}: loss became non-finite in epoch "
                f"{epoch}; likely cause: learning rate too high (hparams.{hp.arch}.lr={hp.lr}). "
                f"Last good checkpoint kept: {checkpoint}"
            )
        seen = steps_per_epoch(len(train), hp.batch_size) * min(hp.batch_size, len(train))
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "val_loss": v_loss, "val_accuracy": v_acc, "lr": lr, "epoch_seconds": seconds,
               "train_seconds": train_s}
        history.append(row)
        if v_acc > best_acc:
            best_acc = v_acc
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        log.info("%s epoch %d/%d: train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f (%.1fs)",
                 tag, epoch, epochs, row["train_loss"], row["train_accuracy"], v_loss, v_acc, seconds)
        if on_epoch is not None:
            on_epoch(row)
        if epoch % settings.checkpoint_every == 0 or epoch == epochs:
            save(epoch)

    train_seconds = sum(r["train_seconds"] for r in history)
    summary = {
        "epochs": epochs,
        "best_val_accuracy": max(r["val_accuracy"] for r in history),
        "final_val_accuracy": history[-1]["val_accuracy"],
        "final_train_loss": history[-1]["train_loss"],
        "train_seconds": train_seconds,
        "train_images_per_second": (epochs * steps_per_epoch(len(train), hp.batch_size)
                                    * min(hp.batch_size, len(train)) / train_seconds),
    }
    return TrainResult(model, history, summary, best_state)

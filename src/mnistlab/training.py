"""Training on device-resident tensors, with exact resume.

The loop follows airbench rather than the tutorials: the whole split is moved
to the device once as uint8, converted and normalised once; each epoch shuffles
with a seeded on-device ``randperm`` and slices batches out of it; augmentation
is one batched affine warp on the device. There is no DataLoader and no host
sync per step: losses and hits are summed in device tensors and read once per
epoch (which is also when the NaN guard looks at them). The one progress bar of a
run (:class:`RunProgress`, drawn only on a terminal) reads its running loss at
most once a second, never per step. On CUDA each step's gather, augmentation, forward and
backward replay as one CUDA graph (:class:`StepGraph`, ``train.cuda_graph``), with the
optimizer as one fused kernel beside it: the same bits as the eager loop, 5-12x faster steps
at the tutorials' batch sizes on an H100 (README: Performance, GPU).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mnistlab.checkpoint import rng_state, save_checkpoint, save_kept, set_rng_state
from mnistlab.config import TrainSettings
from mnistlab.distributed import SINGLE, Dist, all_reduce_sum
from mnistlab.errors import MnistlabError
from mnistlab.hparams import HParams
from mnistlab.inference import DeviceSplit, autocast, evaluate
from mnistlab.models import build_model

log = logging.getLogger(__name__)

# A classifier's mean cross-entropy starts near ln(classes) (2.3 for 10) and falls.
# An epoch averaging above this has blown up its weights: the usual face of an
# absurd learning rate in float32 is a huge *finite* loss (1e10..1e30), not NaN,
# so the guard stops on this too. Legit runs stay far below (the worst seen, a
# 10-step one-cycle warm-up of resnet_bn, averaged 28).
DIVERGED_LOSS = 1e3

# How often the progress bar's running loss is read off the device. Each read is a
# host sync (on CUDA it waits for every queued kernel), so it is rationed by time,
# not done per step: once a second costs a run well under 1 %, however short its steps.
LOSS_REFRESH_S = 1.0


# --------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, hp: HParams, gen: torch.Generator | None,
            draws: torch.Tensor | None = None) -> torch.Tensor:
    """Random affine warp (translate px, rotate deg, scale fraction) of a batch, on its device.

    One ``affine_grid``/``grid_sample`` for the whole batch: no per-sample Python.
    Shapes: [B,C,H,W] → [B,C,H,W]; the background keeps the value of an empty pixel.

    Args:
        x: A normalised batch (``(pixel/255 - hp.mean) / hp.std``).
        hp: Supplies the ranges ``translate`` (pixels), ``rotate`` (degrees), ``scale`` (fraction).
        gen: The epoch's generator, so the warp is a pure function of (seed, epoch).
        draws: This batch's rows of U[0,1) draws [B,4] made by the caller instead of
            drawing from ``gen`` (DDP: the global batch's draws, sliced per rank, so
            each image is warped as in single-process training).
    """
    b, _, h, _ = x.shape
    if draws is None:
        draws = torch.rand(b, 4, generator=gen, device=x.device)
    u = draws * 2 - 1  # U(-1, 1)
    angle = u[:, 0] * math.radians(hp.rotate)
    scale = 1 + u[:, 1] * hp.scale
    shift = u[:, 2:] * (2 * hp.translate / h)  # pixels -> normalised [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # [B,2,3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with zeros; shift so that "zero" is the normalised value of
    # an empty (0) pixel, not of a mid-grey one. Computed with the very float32 ops of
    # to_device, so it equals that pixel bit for bit (and no reduction over x is needed).
    background = torch.zeros((), device=x.device).sub_(hp.mean).div_(hp.std)
    return F.grid_sample(x - background, grid, padding_mode="zeros", align_corners=False) + background


# --------------------------------------------------------------------------- optimisation


def make_optimizer(model: nn.Module, hp: HParams, *, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``hp.optimizer`` over all of ``model``'s parameters.

    ``fused``: one kernel for the whole update instead of a few per parameter group (torch's
    fused implementations; :func:`build` asks for it on CUDA, where a small net's step is
    bound by kernel launches). On CPU the default implementation is kept: its results are
    the committed ones.
    """
    params = model.parameters()
    extra = {"fused": True} if fused else {}
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                               weight_decay=hp.weight_decay, **extra)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, **extra)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, **extra)
    raise MnistlabError(f"hparams.{hp.arch}.optimizer: unknown {hp.optimizer!r} (valid: sgd, adam, adamw)")


def make_scheduler(opt: torch.optim.Optimizer, hp: HParams, total_steps: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: ``constant`` (the tutorials), ``onecycle`` or ``cosine``."""
    if hp.schedule == "onecycle":
        if total_steps < 2:
            raise MnistlabError(f"hparams.{hp.arch}.schedule: onecycle needs at least 2 optimiser "
                                f"steps (got {total_steps}); raise epochs or train.min_steps")
        # One-cycle also cycles momentum (0.95 → 0.85 → 0.95, replacing hp.momentum), as in
        # Smith's recipe; but it must not switch momentum on for a plain SGD that has none.
        cycle = not (hp.optimizer == "sgd" and hp.momentum == 0)
        # 25% warm-up; on tiny runs (< 6 steps) stretched so the warm-up phase spans
        # at least one step: torch divides by its length, and crashes on zero.
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=total_steps,
                                                   pct_start=max(0.25, 1.5 / total_steps),
                                                   cycle_momentum=cycle)
    if hp.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if hp.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    raise MnistlabError(f"hparams.{hp.arch}.schedule: unknown {hp.schedule!r} "
                        "(valid: constant, onecycle, cosine)")


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (``drop_last=True``; one batch of all ``n`` if n < batch_size).

    Why not the tutorials' ``drop_last=False``: a fixed batch shape is what
    torch.compile and CUDA graphs want, and a tiny trailing batch (13 images on
    digits at batch 256) is a huge noisy step at LeNet's lr 0.9 that keeps it at
    chance. The epoch's fresh permutation still shows every image over epochs.
    """
    return max(1, n // batch_size)


def step_floor(hp: HParams, settings: TrainSettings, n_train: int) -> int:
    """The minimum number of optimiser steps for ``hp.arch`` on ``n_train`` images (0: none).

    The rule: the tutorials' epoch counts are kept exactly on data of the size they were
    written for; only a training set smaller than ``train.min_steps_below`` images (default
    50,000, below full MNIST's 54,000 after the validation split) gets the floor
    ``hparams.<arch>.min_steps`` if set, else ``train.min_steps``.

    Why a floor at all: on the 1,300-image digits quickstart LeNet-5's 10 epochs at batch
    256 are 50 steps, chance level. Why a size threshold rather than always: on full data
    a floor of 1,500 steps would silently give cnn_16_32 two epochs instead of its one,
    and the reproduction of the tutorial would no longer be one.
    """
    if n_train >= settings.min_steps_below:
        return 0
    return hp.min_steps if hp.min_steps is not None else settings.min_steps


def effective_epochs(hp: HParams, settings: TrainSettings, n_train: int) -> int:
    """``hp.epochs``, raised until the run makes at least :func:`step_floor` optimiser steps."""
    floor = step_floor(hp, settings, n_train)
    return max(hp.epochs, math.ceil(floor / steps_per_epoch(n_train, hp.batch_size)))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator for one epoch's shuffle and augmentation: a pure function of (seed, epoch)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


class RunProgress:
    """One tqdm bar over a whole run (epochs x steps), so its ETA is the stage's.

    The postfix reads ``epoch 3/10, train_loss 0.1234, val_acc 0.9612``: the loss is
    the current epoch's running mean, the accuracy the last finished epoch's. The
    bar advances once per step (a counter, no sync); the running loss is read from
    the on-device sum at most every ``refresh_s`` seconds (:data:`LOSS_REFRESH_S`),
    and the epoch's exact mean replaces it when :func:`fit` has it on the host
    anyway. A disabled bar does nothing at all: no clock reads, no syncs.
    """

    def __init__(self, tag: str, epochs: int, steps: int, start_epoch: int, *, enabled: bool,
                 file: TextIO | None = None, refresh_s: float = LOSS_REFRESH_S):
        self.enabled, self.epochs, self.refresh_s = enabled, epochs, refresh_s
        self.epoch, self.loss, self.val_acc = start_epoch, math.nan, math.nan
        # initial: a resumed run's bar starts where the checkpoint left off, so the ETA
        # counts only the steps still to do. leave: the finished bar stays, one line per stage.
        self.bar = tqdm(total=epochs * steps, initial=(start_epoch - 1) * steps, desc=tag,
                        unit="step", disable=not enabled, file=file, leave=True,
                        dynamic_ncols=True)
        self.last = time.perf_counter()

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def start_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` begins (the last epoch's loss stays shown until the first read)."""
        self.epoch = epoch
        self._show()

    def step(self, loss_sum: torch.Tensor, seen: int) -> None:
        """One optimiser step done; ``loss_sum`` (on device) over ``seen`` images so far this epoch."""
        if not self.enabled:
            return
        self.bar.update()
        now = time.perf_counter()
        if now - self.last >= self.refresh_s:
            self.last = now
            self.loss = float(loss_sum) / seen  # the rationed host sync
            self._show()

    def end_epoch(self, train_loss: float, val_acc: float) -> None:
        """The epoch's exact mean training loss and its validation accuracy (already on the host)."""
        self.loss, self.val_acc = train_loss, val_acc
        self._show(refresh=True)

    def _show(self, refresh: bool = False) -> None:
        if not self.enabled:
            return
        parts = [f"epoch {self.epoch}/{self.epochs}"]
        if not math.isnan(self.loss):
            parts.append(f"train_loss {self.loss:.4f}")
        if not math.isnan(self.val_acc):
            parts.append(f"val_acc {self.val_acc:.4f}")
        self.bar.set_postfix_str(", ".join(parts), refresh=refresh)


def _logs_to_console() -> bool:
    """Whether the root logger prints to stdout/stderr (then log lines must go around the bar)."""
    return any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
               for h in logging.getLogger().handlers)


def loss_and_grads(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor, hp: HParams, bf16: bool, *, cache: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's forward (bf16 autocast where native, the loss in float32) and backward into
    fresh gradients: the part :func:`train_one_epoch` and :class:`StepGraph` share, so that
    the graph records the very step the eager loop runs. Returns ``(scores, loss)``.

    ``cache=False``: no cache of the weights' bf16 casts; inside a CUDA graph capture it
    would be freed at the context's exit, and a replay recasts every step anyway.
    """
    with autocast(x.device, bf16, cache=cache):
        out = model(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=hp.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return out, loss


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, data: DeviceSplit, hp: HParams,
                    gen: torch.Generator, bf16: bool, progress: RunProgress | None = None,
                    dist: Dist = SINGLE) -> dict[str, torch.Tensor]:
    """One pass over ``data`` in seeded random order.

    Args:
        model: The network (possibly compiled), switched to training mode here.
        opt: Its optimizer.
        sched: A per-step scheduler (stepped after every optimiser step).
        data: The training split, resident on the device.
        hp: Batch size, augmentation and label smoothing.
        gen: The epoch's generator (shuffle, then augmentation).
        bf16: Autocast to bfloat16 on CUDA.
        progress: The run's bar, advanced once per step (its loss read is rationed), or None.
        dist: Under torchrun, this rank's place: every rank draws the same permutation
            and trains on its own contiguous slice of each global batch (the model is
            DDP-wrapped, so gradients are averaged over the global batch).

    Returns:
        On-device sums ``loss_sum`` (float) and ``correct`` (int64) over the images
        this rank trained on; no host sync happens inside.
    """
    model.train()
    device = data.x.device
    perm = torch.randperm(len(data), generator=gen, device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    batch = min(hp.batch_size, len(data))
    local = slice(dist.rank * batch // dist.world, (dist.rank + 1) * batch // dist.world)
    for step in range(steps_per_epoch(len(data), hp.batch_size)):
        idx = perm[step * batch:(step + 1) * batch][local]
        x, y = data.x[idx], data.y[idx]
        if hp.augments:
            draws = torch.rand(batch, 4, generator=gen, device=device)[local] if dist.enabled else None
            x = augment(x, hp, gen, draws)
        out, loss = loss_and_grads(model, opt, x, y, hp, bf16)
        opt.step()
        sched.step()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        if progress is not None:
            progress.step(loss_sum, (step + 1) * len(y))
    return {"loss_sum": loss_sum, "correct": correct}


class StepGraph:
    """A training step replayed as one CUDA graph: batch gather, augmentation, forward, loss,
    backward and the epoch sums, all captured once and relaunched with one call per step.

    Why: at the tutorials' batch sizes (50-256) a small net's GPU step is a few dozen tiny
    kernels, each launched from Python; the launches, not the arithmetic, set its speed
    (~3 ms a step on an H200, README: Performance, GPU). A replay costs one launch. The
    optimizer stays outside the graph, as one fused kernel, so the per-step learning-rate
    schedule works unchanged; the graph writes the gradients into the same tensors
    (``param.grad``) on every replay, which the optimizer then reads.

    Exactness: the graph runs the same kernels in the same order as :func:`train_one_epoch`,
    reads the same rows of the epoch's permutation and the same augmentation draws, and
    dropout draws from the global generator at the offsets an eager step would (replays
    advance its offset as eager calls do), so a graphed run equals an eager one bit for bit
    and resumes from checkpoints exactly (tests/test_training.py, GPU tests).

    How: static buffers hold what changes between steps: the epoch's order (``perm``), the
    step's index into it (``step_t``, advanced inside the graph), the augmentation draws
    (filled from the epoch's generator before each replay, as the eager step draws them).
    The first :attr:`WARMUP` steps of a run run eagerly on a side stream (what CUDA graph
    capture needs: autograd's and cuBLAS's lazy set-up, the optimizer's state), as real
    training steps; the next one is captured, then every step is a replay.

    With ``capture=False`` (any device) the same step runs eagerly every time: the CPU tests
    check it against :func:`train_one_epoch`, which is what makes the graph's step the same one.
    """

    WARMUP = 3

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, data: DeviceSplit,
                 hp: HParams, bf16: bool, *, capture: bool) -> None:
        self.model, self.opt, self.data, self.hp, self.bf16 = model, opt, data, hp, bf16
        self.capture = capture
        device = data.x.device
        self.batch = min(hp.batch_size, len(data))
        self.steps = steps_per_epoch(len(data), hp.batch_size)
        self.perm = torch.zeros(self.steps, self.batch, dtype=torch.long, device=device)
        self.step_t = torch.zeros(1, dtype=torch.long, device=device)
        self.draws = torch.zeros(self.batch, 4, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def start_epoch(self, perm: torch.Tensor) -> None:
        """Load the epoch's order (full batches only) and zero the step index and the sums."""
        self.perm.copy_(perm[:self.steps * self.batch].view(self.steps, self.batch))
        self.step_t.zero_()
        self.loss_sum.zero_()
        self.correct.zero_()

    def _step(self) -> None:
        """The step as captured: everything from "which images" to the gradients."""
        idx = self.perm.index_select(0, self.step_t).view(self.batch)
        x, y = self.data.x[idx], self.data.y[idx]
        if self.hp.augments:
            x = augment(x, self.hp, None, self.draws)
        out, loss = loss_and_grads(self.model, self.opt, x, y, self.hp, self.bf16, cache=False)
        self.loss_sum += loss.detach() * self.batch
        self.correct += (out.argmax(1) == y).sum()
        self.step_t += 1

    def run(self) -> None:
        """One step's forward and backward: eagerly (warm-up, or capture=False), else a replay."""
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self._step()
        elif self.eager_steps < self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
        else:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, runs nothing
                self._step()
            self.graph.replay()


def train_one_epoch_graphed(graph: StepGraph, sched: torch.optim.lr_scheduler.LRScheduler,
                            gen: torch.Generator, progress: RunProgress | None = None
                            ) -> dict[str, torch.Tensor]:
    """:func:`train_one_epoch` with each step's forward and backward run by ``graph``.

    Draws from ``gen`` exactly what the eager epoch draws, in the same order: the
    permutation, then each step's augmentation draws.
    """
    g, device = graph, graph.data.x.device
    g.model.train()
    g.start_epoch(torch.randperm(len(g.data), generator=gen, device=device))
    for step in range(g.steps):
        if g.hp.augments:
            torch.rand(g.batch, 4, generator=gen, device=device, out=g.draws)
        g.run()
        g.opt.step()
        sched.step()
        if progress is not None:
            progress.step(g.loss_sum, (step + 1) * g.batch)
    return {"loss_sum": g.loss_sum.clone(), "correct": g.correct.clone()}


def use_step_graph(settings: TrainSettings, device: torch.device, dist: Dist = SINGLE) -> bool:
    """Whether a run replays its steps as a CUDA graph (:class:`StepGraph`): ``train.cuda_graph``
    on CUDA, in one process (DDP's gradient all-reduce is not captured), not torch.compiled
    (``reduce-overhead`` makes its own graphs)."""
    return settings.cuda_graph and device.type == "cuda" and not dist.enabled and not settings.compile


# --------------------------------------------------------------------------- the run


@dataclass
class Built:
    """What :func:`build` makes and :func:`fit` consumes, as torchvision's ``main`` builds
    what its ``train_one_epoch`` is handed.

    Attributes:
        model: The bare network: checkpointed, validated and returned.
        step_model: What a training step calls: ``model``, DDP-wrapped and/or compiled.
        opt: Its optimizer.
        sched: A per-step scheduler over all ``epochs``.
        epochs: The run's epochs (:func:`effective_epochs`).
        args: The builder arguments (``num_classes`` + ``hparams.<arch>.args``), stored in
            checkpoints so the network can be rebuilt without params.yaml.
    """

    model: nn.Module
    step_model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    epochs: int
    args: dict[str, Any]


def build(hp: HParams, settings: TrainSettings, *, num_classes: int, n_train: int,
          device: torch.device, seed: int, dist: Dist = SINGLE) -> Built:
    """Model, optimizer and schedule for ``hp.arch`` on ``n_train`` images, seeded by ``seed``.

    Under torchrun the model is DDP-wrapped (with SyncBatchNorm on CUDA); with
    ``train.compile`` the step model is compiled.
    """
    torch.manual_seed(seed)  # model init and dropout draw from the global RNG
    args = {"num_classes": num_classes, **hp.args}
    model = build_model(hp.arch, **args).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.enabled and device.type == "cuda":
        # One set of BatchNorm statistics over the global batch, as in single-process
        # training (gloo has no SyncBatchNorm: on CPU each rank normalises its slice).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    batch = min(hp.batch_size, n_train)
    if dist.enabled and batch % dist.world:
        raise MnistlabError(f"hparams.{hp.arch}.batch_size: {batch} is not divisible by the "
                            f"{dist.world} torchrun processes (each takes an equal slice)")
    epochs = effective_epochs(hp, settings, n_train)
    opt = make_optimizer(model, hp, fused=device.type == "cuda")
    sched = make_scheduler(opt, hp, epochs * steps_per_epoch(n_train, hp.batch_size))
    step_model: nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index]
                                             if device.type == "cuda" else None)
    if settings.compile:
        # true: torch.compile's default mode (fused kernels); "reduce-overhead" also replays
        # the forward and backward as CUDA graphs, the lever for nets this small, whose GPU
        # steps are launch-bound. Compile time is part of the first epoch: on a one-epoch run
        # it did not pay (README, Performance: GPU).
        mode = None if settings.compile is True else settings.compile
        # Inductor reads its own deterministic flag, which seed_everything leaves alone
        # (utils.set_deterministic): the public call sets both.
        torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled())
        step_model = torch.compile(step_model, mode=mode)
    return Built(model, step_model, opt, sched, epochs, args)


@dataclass
class TrainResult:
    """What :func:`fit` returns: the final model (on its device) and its records."""

    model: nn.Module
    history: list[dict[str, float]]
    summary: dict[str, float]
    best_state: dict[str, torch.Tensor]


def fit(built: Built, train: DeviceSplit, val: DeviceSplit, *, hp: HParams,
        settings: TrainSettings, dataset: str, seed: int, fingerprint: str, checkpoint: Path,
        resume: dict[str, Any] | None = None, keep_copy: bool = False,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        extra_state: Mapping[str, Any] | None = None,
        dist: Dist = SINGLE,
        progress_file: TextIO | None = None,
        ) -> TrainResult:
    """Train ``built`` on ``train`` for ``built.epochs``, validating on ``val`` after each epoch.

    Args:
        built: Model, optimizer, schedule and epochs from :func:`build`.
        train: Training split on the device (normalised with ``hp``).
        val: Validation split on the same device.
        hp: The architecture's hyperparameters (batch size, augmentation, smoothing).
        settings: Shared settings (bf16, checkpoint_every, eval_batch_size).
        dataset: Dataset name, for messages and progress bars.
        seed: Seeds shuffling and augmentation (per epoch).
        fingerprint: Identity of params + data + code, stored in every checkpoint.
        checkpoint: Where the resumable checkpoint is written (atomically) every
            ``settings.checkpoint_every`` epochs and after the last one.
        resume: A checkpoint from :func:`mnistlab.checkpoint.load_resumable` to continue from.
        keep_copy: Also keep each checkpoint beside its DVC output folder
            (:func:`mnistlab.checkpoint.save_kept`), where ``dvc exp run`` cannot replace it;
            the train stage removes the copy once the run has finished.
        on_epoch: Called with each finished epoch's row (epoch, train/val loss and
            accuracy, lr at the epoch's start, epoch_seconds, train_seconds) *before*
            that epoch's checkpoint is written: if it fails, the epoch is redone on
            resume, so a logger sees every epoch at least once.
        extra_state: Stored in the checkpoint verbatim, read at each write (e.g. the MLflow
            run id: :class:`mnistlab.stages.train.RunRecord`).
        dist: Under torchrun, this process's rank: each rank trains on its slice of
            every global batch, epoch sums are all-reduced, and only rank 0 writes
            checkpoints (callers pass ``on_epoch`` on rank 0 only).
        progress_file: Where the run's progress bar (:class:`RunProgress`) goes. None:
            stderr, and only when it is a terminal (``dvc repro`` passes one through; a CI
            log gets no bar); a file: always drawn there (the train stage passes stderr
            when :data:`mnistlab.config.PROGRESS_ENV` is ``always``). Rank 0 only. Per-epoch lines
            are logged at DEBUG (``MNISTLAB_LOG_LEVEL=DEBUG``).

    Returns:
        The final model, the per-epoch history, a summary and the best epoch's weights.

    Raises:
        MnistlabError: The run diverged (NaN/inf loss or weights, or a mean training
            loss above :data:`DIVERGED_LOSS`); names dataset, arch, epoch and the likely
            cause. The last good checkpoint is left untouched.
    """
    model, opt, sched, epochs = built.model, built.opt, built.sched, built.epochs
    tag = f"{dataset}-{hp.arch}"
    history: list[dict[str, float]] = []
    best_acc, best_state = -1.0, {k: v.detach().clone() for k, v in model.state_dict().items()}
    start_epoch = 1

    if resume is not None:
        model.load_state_dict(resume["model"])
        # The implementation (fused on CUDA, not on CPU) is this run's choice, not the
        # checkpoint's: a CUDA run's checkpoint resumes on the CPU too.
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
        opt.load_state_dict(resume["optimizer"])
        for group, flags in zip(opt.param_groups, impl, strict=True):
            group.update(flags)
        sched.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        history = list(resume["history"])
        best_acc, best_state = resume["best_val_accuracy"], resume["best_model"]
        start_epoch = resume["epoch"] + 1
        if start_epoch > epochs:
            log.info("%s: %s is a finished run with these exact params, data and code; "
                     "reusing it", tag, checkpoint)
        else:
            log.info("%s: resuming from %s after epoch %d/%d", tag, checkpoint, resume["epoch"], epochs)

    # DDP's forward syncs buffers across ranks; evaluation (same data on every rank) needs no sync.
    eval_model = model if dist.enabled else built.step_model
    if epochs != hp.epochs and start_epoch == 1:
        log.info("%s: %d epochs instead of %d so that at least min_steps=%d steps are made "
                 "(%d training images < train.min_steps_below=%d)", tag, epochs, hp.epochs,
                 step_floor(hp, settings, len(train)), len(train), settings.min_steps_below)

    def save(epoch: int) -> None:
        if not dist.is_main:
            return
        (save_kept if keep_copy else save_checkpoint)(checkpoint, {
            "arch": hp.arch, "args": built.args, "epoch": epoch, "epochs": epochs,
            "fingerprint": fingerprint, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
            "history": history, "best_val_accuracy": best_acc, "best_model": best_state,
            **(extra_state or {}),
        })

    n_steps = steps_per_epoch(len(train), hp.batch_size)
    graph = (StepGraph(built.step_model, opt, train, hp, settings.bf16, capture=True)
             if use_step_graph(settings, train.x.device, dist) else None)
    seen_per_epoch = n_steps * min(hp.batch_size, len(train))  # drop_last: full batches only
    show = (dist.is_main and start_epoch <= epochs
            and (progress_file is not None or sys.stderr.isatty()))
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(RunProgress(tag, epochs, n_steps, start_epoch, enabled=show,
                                              file=progress_file))
        if show and progress_file in (None, sys.stderr) and _logs_to_console():
            # Log lines printed while the bar is drawn would tear it: route them above it.
            stack.enter_context(logging_redirect_tqdm(tqdm_class=type(bar.bar)))
        for epoch in range(start_epoch, epochs + 1):
            gen = epoch_generator(seed, epoch, train.x.device)
            lr = opt.param_groups[0]["lr"]
            t0 = time.perf_counter()
            bar.start_epoch(epoch)
            sums = (train_one_epoch_graphed(graph, sched, gen, bar) if graph is not None else
                    train_one_epoch(built.step_model, opt, sched, train, hp, gen, settings.bf16,
                                    bar, dist))
            all_reduce_sum(dist, sums["loss_sum"], sums["correct"])
            # Host syncs happen here, twice an epoch: once to time training alone,
            # once to read validation; never inside the step loop.
            loss_sum, correct = float(sums["loss_sum"]), int(sums["correct"])
            train_s = time.perf_counter() - t0
            v = evaluate(eval_model, val, settings.eval_batch_size, settings.bf16)
            v_loss, v_acc = float(v["loss"]), float(v["accuracy"])
            seconds = time.perf_counter() - t0
            # The validation loss is checked too: a diverging last step can leave NaN
            # weights behind a finite training loss, and those must not be checkpointed.
            # (Only for NaN/inf: a BatchNorm net's early val loss can be large but fine.)
            if not (math.isfinite(loss_sum) and math.isfinite(v_loss)
                    and loss_sum / seen_per_epoch <= DIVERGED_LOSS):
                kept = (f"last good checkpoint kept: {checkpoint}" if checkpoint.is_file()
                        else "no checkpoint written")
                raise MnistlabError(
                    f"dataset {dataset!r}, arch {hp.arch!r}: loss diverged (NaN/inf or mean "
                    f"> {DIVERGED_LOSS:g}) in epoch {epoch}; "
                    f"likely cause: learning rate too high (hparams.{hp.arch}.lr={hp.lr}) or "
                    f"unnormalised inputs (hparams.{hp.arch}.normalize); {kept}"
                )
            row = {"epoch": epoch, "train_loss": loss_sum / seen_per_epoch,
                   "train_accuracy": correct / seen_per_epoch,
                   "val_loss": v_loss, "val_accuracy": v_acc, "lr": lr, "epoch_seconds": seconds,
                   "train_seconds": train_s}
            history.append(row)
            if v_acc > best_acc:
                best_acc = v_acc
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            bar.end_epoch(row["train_loss"], v_acc)
            # DEBUG: the bar shows the run's progress; a line per epoch flooded the log
            # (785 of them on the digits quickstart). MNISTLAB_LOG_LEVEL=DEBUG brings them back.
            log.debug("%s epoch %d/%d: train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f "
                      "(%.1fs)", tag, epoch, epochs, row["train_loss"], row["train_accuracy"],
                      v_loss, v_acc, seconds)
            if on_epoch is not None:
                on_epoch(row)
            if epoch % settings.checkpoint_every == 0 or epoch == epochs:
                save(epoch)

    # Training time only (validation excluded), summed over every epoch, including
    # those done before a resume; so images/s counts exactly the images trained on.
    train_seconds = sum(r["train_seconds"] for r in history)
    summary = {
        "epochs": epochs,
        "best_val_accuracy": best_acc,
        "final_val_accuracy": history[-1]["val_accuracy"],
        "final_train_loss": history[-1]["train_loss"],
        "train_seconds": train_seconds,
        "train_images_per_second": len(history) * seen_per_epoch / train_seconds,
    }
    if dist.is_main:
        log.info("%s: %d epochs, %.1fs training (%.0f images/s); val_acc best %.4f, final %.4f",
                 tag, epochs, train_seconds, summary["train_images_per_second"], best_acc,
                 summary["final_val_accuracy"])
    return TrainResult(model, history, summary, best_state)

"""Stage ``features@{dataset}-{arch}-{seed}``: look inside a trained network.

Generic over the registry: nothing here knows an architecture by name. Layers
are found by type and read with forward hooks, so a new builder in
:mod:`mnistlab.models` gets its pictures for free.

- every ``nn.Conv2d``: its kernels as an image grid (rows = output channels,
  columns = input channels; a one-input layer's kernels reflowed into a square
  grid labelled ``k0``, ``k1``, ...), and its output feature maps for one test
  image per class (rows = classes, first column = the input image);
- a network without convolutions (the MLP): the weights of the linear layer
  that reads the raw pixels, each unit's row shown as a 28x28 image (``u0``, ...);
- every network: the penultimate-layer embedding of the whole test set (the
  input of the last ``nn.Linear``), as the evaluate stage recorded it in its own
  pass over the test set (``features/<ds>/<arch>/seed-<seed>/embeddings.pt``), mapped
  to 2-D with scikit-learn's PCA (all points) and t-SNE (a seeded subsample),
  coloured by class.

Every picture is titled (the title also goes into the PNG's ``Title`` text chunk)
and at least :data:`mnistlab.plots.MIN_SIDE` pixels wide and tall; grids are zoomed
by whole pixels (nearest-neighbour) and label every cell, or every row and column.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnistlab import artifacts, plots, tracking
from mnistlab.config import FeatureSettings, seed_of, stage_name
from mnistlab.errors import MnistlabError
from mnistlab.inference import capture, last_linear, to_device
from mnistlab.models import load_model
from mnistlab.utils import pick_device, staged, torch_load

log = logging.getLogger(__name__)

CELL = 28  # kernels and feature maps are zoomed to at least MNIST's size, to line up with the input


@dataclass(frozen=True)
class FeaturePaths:
    """Every file ``features@{dataset}-{arch}-{seed}`` reads or writes; dvc.yaml passes each one in."""

    split: Path      # data/split/<ds>: test.pt, summary.json
    model_dir: Path  # models/<ds>/<arch>/seed-<seed>: model.pt, run.json
    features: Path   # features/<ds>/<arch>/seed-<seed>: embeddings.pt (the evaluate stage's)
    reports: Path    # reports/<ds>/<arch>/seed-<seed>/features: the PNGs


# --------------------------------------------------------------------------- finding layers


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every ``nn.Conv2d`` with its qualified name, in definition (= forward, for ours) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def pixel_linear(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Linear] | None:
    """The first ``nn.Linear`` if it reads the raw pixels of ``x`` (no convolution before it).

    Checked with a hook rather than by shape alone: its input must equal the
    flattened image, so a linear layer after some other transform is not mistaken
    for one that sees pixels.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if conv_layers(model) or not linears:
        return None
    name, layer = linears[0]
    seen = capture(model, {name: layer}, x[:1], inputs=True)[name]
    # capture() hands back CPU tensors; x may be on the GPU
    return (name, layer) if torch.equal(seen, x[:1].flatten(1).to(seen.device)) else None


# --------------------------------------------------------------------------- image grids


def upscale(t: torch.Tensor, size: int = CELL) -> torch.Tensor:
    """[N, h, w] → [N, h*f, w*f], f the least whole factor reaching ``size``: nearest-neighbour,
    so each weight or activation stays one even square block (3x3 → 30x30, 7x7 → 28x28)."""
    f = -(-size // max(t.shape[-2:]))
    return t.float().repeat_interleave(f, -2).repeat_interleave(f, -1)


def describe(layer: nn.Module) -> str:
    """A layer in words for a title: ``Conv2d 1→32, 3×3`` or ``Linear 784→500``."""
    if isinstance(layer, nn.Conv2d):
        return f"Conv2d {layer.in_channels}→{layer.out_channels}, {'×'.join(map(str, layer.kernel_size))}"
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}→{layer.out_features}"
    return type(layer).__name__


def kernel_grid(weight: torch.Tensor, max_channels: int) -> plots.Grid:
    """Conv weights [O, I, k, k] → a grid of the first ``max_channels`` outputs x inputs.

    One input channel (a first layer): the O kernels reflowed into a near-square grid,
    each labelled ``k<o>``, rather than one O x 1 strip. Several: row o, column i is
    kernel (o, i), rows and columns labelled by channel.
    """
    w = weight.detach().float().cpu()[:max_channels, :max_channels]
    o, i = w.shape[:2]
    cells = upscale(w.reshape(o * i, *w.shape[2:])).numpy()
    if i == 1:
        return plots.Grid(cells, ncol=int(np.ceil(np.sqrt(o))), cell_labels=[f"k{j}" for j in range(o)])
    return plots.Grid(cells, ncol=i, row_labels=[str(j) for j in range(o)],
                      col_labels=[str(j) for j in range(i)], xlabel="input channel",
                      ylabel="output channel")


def feature_map_grid(images: torch.Tensor, fmaps: torch.Tensor, max_channels: int,
                     row_labels: list[str]) -> plots.Grid:
    """One row per probe image: the input, then its first ``max_channels`` feature maps.

    Args:
        images: [n, 1, H, W] the probe inputs (normalised model input).
        fmaps: [n, C, h, w] a layer's output for them.
        max_channels: Feature maps per row.
        row_labels: The probe images' class names.
    """
    n = len(images)
    maps = fmaps.float()[:, :max_channels]
    c = maps.shape[1]
    cells = upscale(maps.reshape(n * c, *maps.shape[2:]))  # [n*c, s, s]
    size = tuple(cells.shape[-2:])
    # the input at the maps' cell size (28 → 30 for 5x5 or 10x10 maps): nearest, as the maps
    inp = F.interpolate(images[:, :1].float(), size=size, mode="nearest")  # [n, 1, s, s]
    cells = torch.cat([inp, cells.view(n, c, *size)], 1).reshape(n * (c + 1), *size)
    return plots.Grid(cells.numpy(), ncol=c + 1, row_labels=row_labels,
                      col_labels=["input"] + [str(j) for j in range(c)],
                      xlabel="output channel", ylabel="one test image per class")


def weight_images(layer: nn.Linear, shape: tuple[int, ...], max_units: int) -> plots.Grid:
    """A pixel-reading linear layer's weight rows [units, C*H*W] shown as images [H, W], ``u<j>``."""
    w = layer.weight.detach().float().cpu()[:max_units]
    return plots.Grid(w.reshape(len(w), *shape)[:, 0].numpy(), ncol=int(np.ceil(np.sqrt(len(w)))),
                      cell_labels=[f"u{j}" for j in range(len(w))])


def probe_indices(labels: torch.Tensor, num_classes: int) -> list[int]:
    """The first test image of each class present: a fixed, seed-free probe set."""
    return [int(torch.nonzero(labels == c)[0]) for c in range(num_classes) if (labels == c).any()]


def _slug(name: str) -> str:
    """A module name (``features.0.0``) made safe for a file name (``features-0-0``)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "layer"


# --------------------------------------------------------------------------- embeddings


def tsne_subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample of at most ``max_points`` of ``n``."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def tsne_map(emb: np.ndarray, seed: int, perplexity: float, max_iter: int) -> tuple[np.ndarray, float]:
    """scikit-learn's t-SNE of ``emb`` [n, D] to 2-D (PCA start, seeded); returns the map and its KL.

    ``max_iter`` counts the 250 early-exaggeration iterations. The map settles long before
    scikit-learn's default of 1000: on the six full-MNIST embeddings, 500 gave the same 10-NN
    accuracy and trustworthiness in half the time (benchmarks/tsne.py).
    """
    from sklearn.manifold import TSNE

    # perplexity must stay below the number of points (tiny test sets in tests)
    tsne = TSNE(n_components=2, init="pca", random_state=seed, max_iter=max_iter,
                perplexity=min(perplexity, max(1.0, (len(emb) - 1) / 3)))
    return tsne.fit_transform(emb), float(tsne.kl_divergence_)


def embedding_map(emb: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, seed: int,
                  tsne_max_points: int, perplexity: float, tsne_max_iter: int,
                  title: str) -> dict[str, float]:
    """PCA (every point) and t-SNE (a seeded subsample) of ``emb`` [N, D], coloured by class.

    Returns:
        Timings and sizes (``tsne_points``, ``tsne_seconds``, ``pca_explained_variance``).
    """
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed).fit(emb)
    xy_pca = pca.transform(emb)
    idx = tsne_subsample(len(emb), tsne_max_points, seed)
    t0 = time.perf_counter()
    xy_tsne, _ = tsne_map(emb[idx], seed, perplexity, tsne_max_iter)
    tsne_seconds = time.perf_counter() - t0

    fig = plots.figure(figsize=(12, 5.5), dpi=100)
    # tight_layout cannot place a colorbar shared by two panels: lay out by hand.
    fig.subplots_adjust(left=0.02, right=0.9, top=0.86, bottom=0.03, wspace=0.05)
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    panels = [(xy_pca, labels, f"PCA ({len(emb)} points, "
                               f"{pca.explained_variance_ratio_.sum():.0%} of variance)"),
              (xy_tsne, labels[idx], f"t-SNE ({len(idx)} points)")]
    for k, (xy, lab, name) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=lab, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5,
                        s=max(2.0, min(16.0, 4000 / len(xy))), alpha=0.7, linewidths=0)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    cbar = fig.colorbar(sc, cax=fig.add_axes((0.92, 0.1, 0.015, 0.7)), ticks=range(len(classes)))
    cbar.ax.set_yticklabels(classes, fontsize=8)
    plots.wrapped_title(fig, title, fontsize=12)
    plots.save(fig, path, tight=False)
    return {"tsne_points": len(idx), "tsne_seconds": tsne_seconds,
            "pca_explained_variance": float(pca.explained_variance_ratio_.sum())}


# --------------------------------------------------------------------------- the stage


def kernel_title(k: int, name: str, conv: nn.Conv2d, max_channels: int) -> str:
    """``conv2 '3' (Conv2d 6→16, 5×5): 16×6 kernels (output × input channel)``, + what is cut."""
    o, i = conv.out_channels, conv.in_channels
    head = f"conv{k} {name!r} ({describe(conv)}): "
    if i == 1:
        return head + f"{o} kernels" + (f", first {max_channels} shown" if o > max_channels else "")
    cut = f", first {min(o, max_channels)}×{min(i, max_channels)} shown" \
        if max(o, i) > max_channels else ""
    return head + f"{o}×{i} kernels (output × input channel){cut}"


def fmap_title(k: int, name: str, conv: nn.Conv2d, shape: tuple[int, ...], max_channels: int) -> str:
    """``conv1 '0' (Conv2d 1→16, 5×5): output 16×28×28, one test image per class`` + what is cut."""
    c = shape[0]
    return (f"conv{k} {name!r} ({describe(conv)}): output {'×'.join(map(str, shape))}, "
            f"one test image per class" + (f", first {max_channels} of {c} channels shown"
                                           if c > max_channels else ""))


def embedding_title(head_name: str, head: nn.Linear) -> str:
    """What the embedding map shows, in words: the penultimate layer and its width."""
    return (f"penultimate layer, {head.in_features} features (the input of the classifier "
            f"{head_name!r}, {describe(head)}): PCA (left) / t-SNE (right)")


def extract(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, classes: list[str],
            settings: FeatureSettings, reports: Path, tag: str = "") -> list[Path]:
    """Write the kernel, feature-map or weight pictures of ``model`` into ``reports``.

    Args:
        model: A trained network in eval mode.
        x: Normalised test images [N, C, 28, 28] on the model's device (one per class is drawn).
        labels: int64 [N] on the CPU.
        classes: Class names.
        settings: Sizes of the grids.
        reports: Output folder for the PNGs.
        tag: Put before each picture's title (``digits/lenet5``).

    Returns:
        The PNG paths written.
    """
    written: list[Path] = []
    pre = f"{tag}: " if tag else ""
    probe_idx = probe_indices(labels, len(classes))
    probe = x[probe_idx]
    probe_classes = [classes[int(labels[i])] for i in probe_idx]
    convs = conv_layers(model)
    if convs:
        fmaps = capture(model, dict(convs), probe)
        for k, (name, conv) in enumerate(convs, 1):
            stem = f"{k:02d}-{_slug(name)}"
            plots.image_grid(kernel_grid(conv.weight, settings.max_channels),
                             reports / f"kernels-{stem}.png",
                             pre + kernel_title(k, name, conv, settings.max_channels))
            plots.image_grid(feature_map_grid(probe.cpu(), fmaps[name], settings.max_channels,
                                              probe_classes), reports / f"fmaps-{stem}.png",
                             pre + fmap_title(k, name, conv, tuple(fmaps[name].shape[1:]),
                                              settings.max_channels))
            written += [reports / f"kernels-{stem}.png", reports / f"fmaps-{stem}.png"]
    elif (pl := pixel_linear(model, x)) is not None:
        name, layer = pl
        shown = min(layer.out_features, settings.max_units)
        plots.image_grid(weight_images(layer, tuple(x.shape[1:]), settings.max_units),
                         reports / f"weights-{_slug(name)}.png",
                         f"{pre}linear {name!r} ({describe(layer)}): the input weights of "
                         f"{shown} of {layer.out_features} units as {x.shape[-2]}×{x.shape[-1]} images")
        written.append(reports / f"weights-{_slug(name)}.png")
    else:
        log.warning("%s has neither convolutions nor a pixel-reading linear layer: "
                    "no kernel pictures", type(model).__name__)
    return written


def load_embeddings(path: Path, labels: torch.Tensor, head: str, hint: str) -> torch.Tensor:
    """The evaluate stage's ``embeddings.pt`` [N, D], checked against the test labels and the
    model's head layer: a file of another split or model is a one-line error (``hint``: the fix)."""
    if not path.is_file():
        raise MnistlabError(f"{path}: missing (the evaluate stage writes it); {hint}")
    saved = torch_load(path)
    if not isinstance(saved, dict) or not {"embeddings", "labels", "layer"} <= set(saved):
        raise MnistlabError(f"{path}: not an embeddings file (needs embeddings, labels, layer); {hint}")
    emb, saved_labels = saved["embeddings"], saved["labels"]
    if saved["layer"] != head:
        raise MnistlabError(f"{path}: embeddings of layer {saved['layer']!r}, but this model's head "
                            f"is {head!r} (another model); {hint}")
    if not (isinstance(saved_labels, torch.Tensor) and torch.equal(saved_labels, labels)):
        raise MnistlabError(f"{path}: its labels are not this test split's (another split); {hint}")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or len(emb) != len(labels):
        raise MnistlabError(f"{path}: embeddings must be [{len(labels)}, D] (one row per test "
                            f"image); {hint}")
    return emb.float()


def run_features(params: dict[str, Any], dataset: str, arch: str, seed: int,
                 paths: FeaturePaths) -> dict[str, Any]:
    """Kernels, feature maps and the embeddings' 2-D maps for ``models/<ds>/<arch>/seed-<seed>/model.pt``.

    Returns:
        A summary (layers drawn, embedding shape, t-SNE size and time).
    """
    settings = FeatureSettings.from_params(params)
    tag = f"{dataset}/{arch} seed {seed}"
    device = pick_device(settings.device, "features.device")
    tracking.check_reachable()  # before any compute is spent
    run_id = artifacts.read_run_id(paths.model_dir / artifacts.RUN)
    model, record = load_model(paths.model_dir / artifacts.MODEL, device, arch)
    tracking.require_run(run_id, paths.model_dir / artifacts.RUN,
                         stage_name("train", dataset, arch, seed))
    classes = artifacts.load_classes(paths.split)
    images, labels = artifacts.load_split(paths.split, "test")
    head = last_linear(model)[0]
    emb = load_embeddings(paths.features / artifacts.EMBEDDINGS, labels, head,
                          f"re-run {stage_name('evaluate', dataset, arch, seed)}")
    norm = record["normalize"]
    x = to_device(images, labels, norm["mean"], norm["std"], device).x

    # Pictures go to a staging folder, to MLflow from there, and in place last: a failed
    # MLflow call leaves the previous outputs as they were.
    with staged() as stage:
        reports = stage.folder(paths.reports)
        written = extract(model, x, labels, classes, settings, reports, tag)
        info = embedding_map(emb.numpy(), labels.numpy(), classes, reports / "embedding-map.png",
                             seed_of(params), settings.tsne_max_points, settings.tsne_perplexity,
                             settings.tsne_max_iter, f"{tag}: {embedding_title(*last_linear(model))}")
        written.append(reports / "embedding-map.png")
        tracking.log_artifacts(run_id, [reports], "features")
    log.info("%s: %d pictures, embeddings %s, t-SNE of %d points in %.1fs", tag,
             len(written), tuple(emb.shape), info["tsne_points"], info["tsne_seconds"])
    return {"pictures": len(written), "embedding_shape": list(emb.shape), "head": head, **info}

"""features@{dataset}-{arch}: generic extraction over every registered architecture, and the stage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers.artifacts import CLASSES, write_model, write_split
from helpers.checks import assert_png
from helpers.mlflow import open_run
from torch import nn

from mnistlab import tracking
from mnistlab.config import FeatureSettings
from mnistlab.errors import MnistlabError
from mnistlab.models import REGISTRY, build_model
from mnistlab.stages import features
from mnistlab.stages.features import FeaturePaths
from mnistlab.utils import torch_load

SETTINGS = FeatureSettings(device="cpu", batch_size=16, max_channels=6, max_units=25,
                           tsne_max_points=40, tsne_perplexity=30.0)
PARAMS = {"seed": 0, "features": {k: v for k, v in dataclasses.asdict(SETTINGS).items()}}


def digits_batch(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real digits, normalised as [n, 1, 28, 28], labels cycling over all ten classes."""
    from mnistlab.data.digits import digits_as_mnist

    x, y = digits_as_mnist()
    return (x[:n].unsqueeze(1).float() / 255 - 0.1307) / 0.3081, y[:n].clone()


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_extract_works_for_every_registered_arch(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).eval()
    x, y = digits_batch(30)
    emb, head, written = features.extract(model, x, y, CLASSES, SETTINGS, tmp_path)

    convs = features.conv_layers(model)
    head_layer = dict(model.named_modules())[head]
    assert head_layer is features.last_linear(model)[1]
    assert emb.shape == (30, head_layer.in_features) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    # the embedding is exactly what the head sees: applying the head reproduces the logits
    with torch.inference_mode():
        logits = model(x)
    if not isinstance(list(model.modules())[-1], nn.LogSoftmax):
        assert torch.allclose(head_layer(emb), logits, atol=1e-5)

    if convs:
        assert len(written) == 2 * len(convs)
        for k, (_, conv) in enumerate(convs, 1):
            kern = next(p for p in written if p.name.startswith(f"kernels-{k:02d}-"))
            fmap = next(p for p in written if p.name.startswith(f"fmaps-{k:02d}-"))
            w, h = assert_png(kern)
            rows, cols = min(conv.out_channels, 6), min(conv.in_channels, 6)
            assert (w, h) == (2 + cols * 30, 2 + rows * 30)  # 28px cells + 2px padding
            w, h = assert_png(fmap)
            assert (w, h) == (2 + (1 + min(conv.out_channels, 6)) * 30, 2 + 10 * 30)  # a row per class
    else:  # the MLP: its pixel-reading layer's units as 28x28 images
        assert [p.name for p in written] == ["weights-1.png"]
        w, h = assert_png(written[0])
        assert (w, h) == (2 + 5 * 30, 2 + 5 * 30)  # 25 units in a 5x5 grid
    # hooks are removed again
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_kernel_grid_layout():
    grid = features.kernel_grid(torch.randn(8, 3, 5, 5), max_channels=4)
    assert grid.shape == (3, 2 + 4 * 30, 2 + 3 * 30)  # 4 rows (outputs) x 3 columns (inputs)
    assert grid.min() >= 0 and grid.max() <= 1


def test_feature_map_grid_puts_the_input_first():
    imgs = torch.zeros(2, 1, 28, 28)
    imgs[1] = 1.0
    imgs[1, 0, 0, 0] = 0.0  # not constant, so normalisation keeps the contrast
    grid = features.feature_map_grid(imgs, torch.rand(2, 5, 7, 7), max_channels=3)
    assert grid.shape == (3, 2 + 2 * 30, 2 + 4 * 30)
    assert grid[0, 32 + 10, 2 + 10] == 1.0  # row 2, column 1: the bright input image


def test_pixel_linear_only_when_the_layer_reads_pixels():
    x = torch.randn(2, 1, 28, 28)
    assert features.pixel_linear(build_model("mlp"), x) is not None
    assert features.pixel_linear(build_model("lenet5"), x) is None  # has convolutions
    scaled = nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Identity(), nn.Linear(784, 10))
    assert features.pixel_linear(scaled, x) is not None
    negated = nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(784, 10))
    assert features.pixel_linear(negated, x) is None  # sees tanh(pixels), not pixels


def test_last_linear_required():
    with pytest.raises(MnistlabError, match="no nn.Linear"):
        features.last_linear(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_probe_one_image_per_class():
    labels = torch.tensor([3, 1, 3, 0, 1, 2])
    assert features.probe_indices(labels, 5) == [3, 1, 5, 0]  # class 4 absent: skipped


def test_tsne_subsample_is_seeded_and_capped():
    a = features.tsne_subsample(1000, 100, seed=1)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and (np.diff(a) > 0).all()
    assert np.array_equal(a, features.tsne_subsample(1000, 100, seed=1))
    assert not np.array_equal(a, features.tsne_subsample(1000, 100, seed=2))
    assert np.array_equal(features.tsne_subsample(50, 100, seed=1), np.arange(50))


def test_run_features_saves_embeddings_and_logs_pictures(tmp_path, mlflow_store):
    split, model_dir = tmp_path / "split", tmp_path / "models"
    x, y = write_split(split, n=60)
    write_model(model_dir, "cnn_16_32")
    run_id = open_run(model_dir, "digits", "cnn_16_32")
    paths = FeaturePaths(split, model_dir, tmp_path / "features", tmp_path / "reports")

    summary = features.run_features(PARAMS, "digits", "cnn_16_32", paths)

    saved = torch_load(tmp_path / "features" / "embeddings.pt")
    assert saved["embeddings"].shape == (60, 32 * 7 * 7)  # test size x width of the head's input
    assert torch.equal(saved["labels"], y) and saved["classes"] == CLASSES
    assert summary["tsne_points"] == 40  # capped by tsne_max_points
    pngs = sorted(p.name for p in (tmp_path / "reports").glob("*.png"))
    assert pngs == ["embedding-map.png", "fmaps-01-0.png", "fmaps-02-3.png",
                    "kernels-01-0.png", "kernels-02-3.png"]
    for p in pngs:
        assert_png(tmp_path / "reports" / p)
    logged = {a.path for a in tracking.client().list_artifacts(run_id, "features")}
    assert {f"features/{p}" for p in pngs} <= logged


def test_settings_errors_name_the_key():
    bad = {"seed": 0, "features": {**PARAMS["features"], "tsne_max_points": 0}}
    with pytest.raises(MnistlabError, match="features.tsne_max_points must be a positive integer"):
        FeatureSettings.from_params(bad)

"""features@{dataset}-{arch}-{seed}: generic extraction over every registered architecture, and the stage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers.artifacts import CLASSES, write_model, write_split
from helpers.checks import assert_picture
from helpers.mlflow import open_run
from torch import nn

from mnistlab import plots, tracking
from mnistlab.config import FeatureSettings, run_dir
from mnistlab.errors import MnistlabError
from mnistlab.inference import capture
from mnistlab.models import REGISTRY, build_model
from mnistlab.stages import features
from mnistlab.stages.evaluate import EvalPaths, run_evaluation
from mnistlab.stages.features import FeaturePaths
from mnistlab.utils import torch_load, torch_save

SETTINGS = FeatureSettings(device="cpu", max_channels=6, max_units=25, tsne_max_points=40,
                           tsne_perplexity=30.0, tsne_max_iter=300)
EVALUATE = {"evaluate": {"device": "cpu", "batch_size": 16, "channels_last": True, "max_misclassified": 4}}
PARAMS = {"seed": 0, "features": {k: v for k, v in dataclasses.asdict(SETTINGS).items()}}
SEED = 1234  # the training seed (params.yaml's seeds: [1234]); PARAMS' seed is the data seed (t-SNE)


def digits_batch(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real digits, normalised as [n, 1, 28, 28], labels cycling over all ten classes."""
    from mnistlab.data.digits import digits_as_mnist

    x, y = digits_as_mnist()
    return (x[:n].unsqueeze(1).float() / 255 - 0.1307) / 0.3081, y[:n].clone()


def no_clipped_text(caplog) -> bool:
    """``plots.save`` logged no title or label running past a picture's edge."""
    return not [r for r in caplog.records if r.name == "mnistlab.plots" and "runs past" in r.message]


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_extract_works_for_every_registered_arch(arch, device, tmp_path, caplog):
    """On the CPU and, where there is one, on CUDA: the features stage passes the model and the
    test images on the training device (an MLP on CUDA once failed in pixel_linear)."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).eval().to(device)
    x, y = digits_batch(30)
    x = x.to(device)
    written = features.extract(model, x, y, CLASSES, SETTINGS, tmp_path, f"digits/{arch}")

    convs = features.conv_layers(model)
    head, head_layer = features.last_linear(model)
    assert head_layer is dict(model.named_modules())[head]
    # what the evaluate stage records in its pass: the head's input
    emb = capture(model, {head: head_layer}, x, inputs=True, batch_size=16)[head].flatten(1)
    assert emb.shape == (30, head_layer.in_features) and emb.dtype == torch.float32
    assert emb.device.type == "cpu" and torch.isfinite(emb).all()
    # the embedding is exactly what the head sees: applying the head reproduces the logits
    with torch.inference_mode():
        logits = model(x)
        if not isinstance(list(model.modules())[-1], nn.LogSoftmax):
            assert torch.allclose(head_layer(emb.to(device)), logits, atol=1e-5)

    # every picture: >= 400 px each way, titled (in the PNG) with the tag, the layer and its shape
    if convs:
        assert len(written) == 2 * len(convs)
        for k, (name, conv) in enumerate(convs, 1):
            kern = next(p for p in written if p.name.startswith(f"kernels-{k:02d}-"))
            fmap = next(p for p in written if p.name.startswith(f"fmaps-{k:02d}-"))
            layer = (f"digits/{arch}: conv{k} {name!r} (Conv2d {conv.in_channels}→"
                     f"{conv.out_channels}, {conv.kernel_size[0]}×{conv.kernel_size[1]})")
            assert_picture(kern, layer, f"{conv.out_channels}")
            assert_picture(fmap, layer, f"output {conv.out_channels}×", "one test image per class")
    else:  # the MLP: its pixel-reading layer's units as 28x28 images
        assert [p.name for p in written] == ["weights-1.png"]
        assert_picture(written[0], f"digits/{arch}: linear '1' (Linear 784→500)",
                       "25 of 500 units as 28×28 images")
    # the embedding map names the layer in words: the penultimate one, and its width
    features.embedding_map(emb.numpy(), y.numpy(), CLASSES, tmp_path / "embedding-map.png", 0, 30,
                           30.0, 300, f"digits/{arch}: {features.embedding_title(head, head_layer)}")
    assert_picture(tmp_path / "embedding-map.png", f"penultimate layer, {head_layer.in_features} "
                   f"features", f"{head!r}, Linear {head_layer.in_features}→10",
                   "PCA (left) / t-SNE (right)")
    assert no_clipped_text(caplog)
    # hooks are removed again
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_kernel_grid_layout():
    w = torch.randn(8, 3, 5, 5)
    grid = features.kernel_grid(w, max_channels=4)
    assert grid.cells.shape == (12, 30, 30) and grid.ncol == 3 and grid.nrow == 4  # outputs x inputs
    assert grid.row_labels == ["0", "1", "2", "3"] and grid.col_labels == ["0", "1", "2"]
    assert (grid.xlabel, grid.ylabel) == ("input channel", "output channel")
    # cell (row 1, column 2) is kernel (1, 2), each weight a 6x6 block (5x5 → 30x30, nearest)
    assert np.array_equal(grid.cells[1 * 3 + 2][::6, ::6], w[1, 2].numpy())
    assert np.array_equal(grid.cells[5][6:12, 0:6], np.full((6, 6), w[1, 2, 1, 0].item()))


def test_kernel_grid_of_one_input_channel_is_square_not_a_strip():
    # a first layer (1 input): 32 kernels were one 32x482 px column; now 16 shown 4 x 4, labelled
    grid = features.kernel_grid(torch.randn(32, 1, 3, 3), max_channels=16)
    assert grid.cells.shape == (16, 30, 30) and (grid.nrow, grid.ncol) == (4, 4)
    assert grid.cell_labels == [f"k{j}" for j in range(16)] and grid.row_labels is None
    grid = features.kernel_grid(torch.randn(6, 1, 5, 5), max_channels=16)  # lenet5's conv1
    assert (grid.nrow, grid.ncol) == (2, 3) and grid.cell_labels[-1] == "k5"


def test_feature_map_grid_puts_the_input_first():
    imgs = torch.zeros(2, 1, 28, 28)
    imgs[1] = 1.0
    maps = torch.rand(2, 5, 7, 7)
    grid = features.feature_map_grid(imgs, maps, max_channels=3, row_labels=["a", "b"])
    assert grid.cells.shape == (2 * 4, 28, 28) and grid.ncol == 4  # input + 3 maps per row
    assert grid.row_labels == ["a", "b"] and grid.col_labels == ["input", "0", "1", "2"]
    assert (grid.cells[4] == 1.0).all()  # row 2, column 1: the bright input image
    assert np.array_equal(grid.cells[4 + 3][::4, ::4], maps[1, 2].numpy())  # 7x7 → 28x28, nearest


def test_every_grid_is_at_least_400px_and_titled(tmp_path, caplog):
    # the smallest grids there are: one 1x1 kernel, one unit, one probe with one channel
    conv = nn.Conv2d(1, 1, 1)
    plots.image_grid(features.kernel_grid(conv.weight, 16), tmp_path / "k.png",
                     features.kernel_title(1, "c", conv, 16))
    plots.image_grid(features.weight_images(nn.Linear(784, 1), (1, 28, 28), 16), tmp_path / "w.png",
                     "one unit")
    plots.image_grid(features.feature_map_grid(torch.rand(1, 1, 28, 28), torch.rand(1, 1, 3, 3), 16,
                                               ["Ankle boot"]), tmp_path / "f.png",
                     "a long title " * 12)  # wrapped, not cut off
    assert assert_picture(tmp_path / "k.png", "conv1 'c' (Conv2d 1→1, 1×1): 1 kernels") == (400, 400)
    assert_picture(tmp_path / "w.png", "one unit")
    assert_picture(tmp_path / "f.png", "a long title a long title")
    assert no_clipped_text(caplog)


def test_picture_checks_can_fail(tmp_path, caplog):
    fig = plots.figure(figsize=(5, 5), dpi=100)
    fig.add_subplot().plot([0, 1])
    plots.save(fig, tmp_path / "untitled.png")
    with pytest.raises(AssertionError, match="no Title"):
        assert_picture(tmp_path / "untitled.png")
    fig = plots.figure(figsize=(3, 3), dpi=100)
    fig.suptitle("a title far too long for a picture three inches wide, and not wrapped")
    plots.save(fig, tmp_path / "small.png")
    with pytest.raises(AssertionError, match="small.png"):
        assert_picture(tmp_path / "small.png")  # 300 x 300 px
    assert not no_clipped_text(caplog)  # the unwrapped title ran past both edges


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


def test_run_features_maps_evaluates_embeddings_and_logs_pictures(tmp_path, mlflow_store):
    # dvc.yaml's layout: models/<ds>/<arch>/seed-<seed>/, features/..., reports/.../features/
    split, model_dir = tmp_path / "split", run_dir(tmp_path / "models", "digits", "cnn_16_32", SEED)
    out = run_dir(tmp_path / "features", "digits", "cnn_16_32", SEED)
    reports = run_dir(tmp_path / "reports", "digits", "cnn_16_32", SEED) / "features"
    x, y = write_split(split, n=60)
    write_model(model_dir, "cnn_16_32")
    run_id = open_run(model_dir, "digits", "cnn_16_32", SEED)
    paths = FeaturePaths(split, model_dir, out, reports)
    run_evaluation(EVALUATE, "digits", "cnn_16_32", SEED, EvalPaths(
        split, model_dir, tmp_path / "metrics", tmp_path / "reports" / "evaluate", out))
    saved = torch_load(out / "embeddings.pt")
    assert saved["embeddings"].shape == (60, 32 * 7 * 7)  # test size x width of the head's input
    assert torch.equal(saved["labels"], y) and saved["classes"] == CLASSES

    summary = features.run_features(PARAMS, "digits", "cnn_16_32", SEED, paths)

    assert summary["embedding_shape"] == [60, 32 * 7 * 7]
    assert summary["tsne_points"] == 40  # capped by tsne_max_points
    pngs = sorted(p.name for p in reports.glob("*.png"))
    assert pngs == ["embedding-map.png", "fmaps-01-0.png", "fmaps-02-3.png",
                    "kernels-01-0.png", "kernels-02-3.png"]
    for p in pngs:
        assert_picture(reports / p, "digits/cnn_16_32 seed 1234: ")
    assert_picture(reports / "embedding-map.png", "penultimate layer, 1568 features")
    logged = {a.path for a in tracking.client().list_artifacts(run_id, "features")}
    assert {f"features/{p}" for p in pngs} <= logged


def test_run_features_refuses_embeddings_of_another_model_or_split(tmp_path, mlflow_store):
    """The embeddings come from the evaluate stage's file: one of another model (its head layer)
    or of another test split (its labels) is a one-line error naming it and the fix."""
    split, model_dir, out = tmp_path / "split", tmp_path / "model", tmp_path / "features"
    _, y = write_split(split, n=30)
    write_model(model_dir, "mlp")
    open_run(model_dir, "digits", "mlp", SEED)
    paths = FeaturePaths(split, model_dir, out, tmp_path / "reports")
    hint = f"re-run evaluate@digits-mlp-{SEED}"
    file = out / "embeddings.pt"
    with pytest.raises(MnistlabError) as e:
        features.run_features(PARAMS, "digits", "mlp", SEED, paths)
    assert str(e.value) == f"{file}: missing (the evaluate stage writes it); {hint}"
    out.mkdir()
    for bad, what in [({"layer": "1"}, "embeddings of layer '1', but this model's head is '3' (another model)"),
                      ({"labels": y.flip(0)}, "its labels are not this test split's (another split)"),
                      ({"embeddings": torch.zeros(29, 500)}, "embeddings must be [30, D] (one row per test image)")]:
        torch_save({"embeddings": torch.zeros(30, 500), "labels": y, "classes": CLASSES,
                    "layer": "3", **bad}, file)
        with pytest.raises(MnistlabError) as e:
            features.run_features(PARAMS, "digits", "mlp", SEED, paths)
        assert str(e.value) == f"{file}: {what}; {hint}"
    assert not (tmp_path / "reports").exists()  # nothing drawn


def test_settings_errors_name_the_key():
    bad = {"seed": 0, "features": {**PARAMS["features"], "tsne_max_points": 0}}
    with pytest.raises(MnistlabError, match="features.tsne_max_points must be a positive integer"):
        FeatureSettings.from_params(bad)
    bad = {"seed": 0, "features": {**PARAMS["features"], "tsne_max_iter": 249}}
    with pytest.raises(MnistlabError, match="features.tsne_max_iter must be at least 250 .*got 249"):
        FeatureSettings.from_params(bad)


def test_tsne_map_runs_the_iterations_asked():
    """max_iter reaches scikit-learn: 250 is early exaggeration alone (its KL is of the
    exaggerated affinities, far above the settled map's); a few more iterations settle it."""
    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    x[:30] += 6.0  # two clusters
    xy, kl_250 = features.tsne_map(x, 0, 10.0, 250)
    xy2, kl_400 = features.tsne_map(x, 0, 10.0, 400)
    assert xy.shape == xy2.shape == (60, 2)
    assert kl_400 < kl_250 / 5

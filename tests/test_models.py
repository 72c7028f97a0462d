"""Every registered architecture: builds from params.yaml, right shape, finite, gradients, learns.

Parametrised over ``REGISTRY``, so a newly registered arch is covered without
touching this file (and must have a ``hparams.<arch>`` section to pass).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnistlab.config import load_params
from mnistlab.data.digits import digits_as_mnist
from mnistlab.errors import MnistlabError
from mnistlab.hparams import HParams
from mnistlab.inference import scores, to_device
from mnistlab.models import REGISTRY, build_model, count_parameters, model_record, register
from mnistlab.training import make_optimizer

ARCHS = sorted(REGISTRY)


@pytest.fixture(scope="module")
def params(params_file):
    return load_params(params_file)


@pytest.fixture(scope="module")
def digits_batch():
    """64 real digits (uint8 [64,28,28], labels [64]) covering all 10 classes."""
    images, labels = digits_as_mnist()
    return images[:64], labels[:64]


def test_params_and_registry_agree(params):
    assert set(params["archs"]) <= set(REGISTRY), "params.yaml archs lists an unregistered arch"
    assert set(params["hparams"]) == set(REGISTRY), "every arch needs exactly one hparams section"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_shape_finite_and_every_parameter_gets_a_gradient(params, arch, num_classes):
    hp = HParams.from_params(params, arch)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, **hp.args)
    assert count_parameters(model) > 0
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(5) % num_classes).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: {name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{arch}: {name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{arch}: {name} has an all-zero gradient"


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_is_deterministic_and_batch_independent(params, arch):
    """In eval mode (dropout off, BatchNorm on running stats) a sample's scores do not
    depend on the rest of its batch: what evaluate() and batched prediction rely on."""
    hp = HParams.from_params(params, arch)
    torch.manual_seed(0)
    model = build_model(arch, **hp.args).eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.inference_mode():
        whole = model(x)
        halves = torch.cat([model(x[:3]), model(x[3:])])
    torch.testing.assert_close(whole, halves)


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_scores_match_the_default_layout(params, arch, digits_batch):
    """evaluate/features run NHWC in cache-sized batches (params.yaml): the scores are those of
    the default layout in one batch, up to float rounding, with the same predicted classes."""
    hp = HParams.from_params(params, arch)
    torch.manual_seed(0)
    model = build_model(arch, **hp.args).eval()
    images, labels = digits_batch
    norm = {"mean": hp.mean, "std": hp.std}
    want, _ = scores(model, images, labels, norm, torch.device("cpu"), len(images))
    got, y = scores(model, images, labels, norm, torch.device("cpu"), 16, nhwc=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1)) and torch.equal(y, labels.long())


@pytest.mark.parametrize("arch", ARCHS)
def test_rebuilds_from_its_model_record(params, arch):
    """model.pt holds (arch, args, state_dict): enough to rebuild the net without params.yaml."""
    hp = HParams.from_params(params, arch)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **hp.args).eval()
    record = model_record(arch, {"num_classes": 10, **hp.args}, model.state_dict(),
                          {"mean": hp.mean, "std": hp.std}, [str(i) for i in range(10)])
    torch.manual_seed(1)  # a different init, overwritten by the state dict
    rebuilt = build_model(record["arch"], **record["args"]).eval()
    rebuilt.load_state_dict(record["state_dict"], strict=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(model(x), rebuilt(x))


def test_resnet_bn_logit_scale_multiplies_the_logits_and_defaults_to_one(params):
    """logit_scale is a constant on the output, no weights: a model file from before it
    (args without the key) rebuilds as the network it was (scale 1.0)."""
    args = HParams.from_params(params, "resnet_bn").args
    assert args["logit_scale"] == 0.125  # params.yaml's (models.ResNetBN says why)
    x = torch.randn(4, 1, 28, 28)
    out = {}
    for scale in (None, 1.0, 0.125):
        torch.manual_seed(0)
        kw = {} if scale is None else {"logit_scale": scale}
        model = build_model("resnet_bn", width=8, **kw).eval()
        with torch.inference_mode():
            out[scale] = model(x)
    assert torch.equal(out[None], out[1.0])
    torch.testing.assert_close(out[0.125], out[1.0] * 0.125, rtol=0, atol=0)
    for bad in (0.0, -0.5, float("inf"), "0.125"):
        with pytest.raises(MnistlabError, match=r"^arch 'resnet_bn'\.logit_scale: must be a finite "
                           r"number > 0 \(got "):
            build_model("resnet_bn", logit_scale=bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(params, arch, digits_batch):
    """Each arch with its own optimizer and lr from params.yaml (constant schedule)."""
    hp = HParams.from_params(params, arch)
    data = to_device(*digits_batch, hp.mean, hp.std, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(arch, **hp.args)
    opt = make_optimizer(model, hp)

    def loss_now() -> float:
        # Training mode with a fixed seed: the same dropout masks and batch
        # statistics before and after, so only the weights differ.
        model.train()
        torch.manual_seed(123)
        with torch.no_grad():
            return float(F.cross_entropy(model(data.x), data.y))

    before = loss_now()
    torch.manual_seed(7)
    for _ in range(40):
        loss = F.cross_entropy(model(data.x), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_now()
    # Deterministic measurement, so any drop is real; the 0.1% margin rules out a no-op.
    assert after < 0.999 * before, f"{arch}: loss {before:.4f} -> {after:.4f}"


def test_unknown_arch_is_one_line_listing_valid_names():
    with pytest.raises(MnistlabError) as e:
        build_model("vgg16")
    msg = str(e.value)
    assert "\n" not in msg and "'vgg16'" in msg
    for name in REGISTRY:
        assert name in msg


def test_unknown_argument_names_it_and_the_valid_ones():
    with pytest.raises(MnistlabError) as e:
        build_model("mlp", hiddn=10)
    msg = str(e.value)
    assert "\n" not in msg and "hiddn" in msg and "hidden" in msg


def test_a_bad_argument_value_is_one_line_naming_it():
    """Values are checked up front against the builder's typed schema (strict: no coercion)."""
    with pytest.raises(MnistlabError, match=r"^arch 'mlp'\.hidden: must be an integer >= 1 \(got '500'\)$"):
        build_model("mlp", hidden="500")


def test_a_type_error_inside_a_builder_is_not_disguised_as_bad_args(monkeypatch):
    """Bugs keep their traceback: only the arguments are checked up front, never the call."""
    def buggy(**_):
        raise TypeError("a bug inside the builder")

    monkeypatch.setitem(REGISTRY, "mlp", buggy)
    with pytest.raises(TypeError, match="a bug inside"):
        build_model("mlp", hidden=500)


def test_registering_a_name_twice_is_refused():
    def mlp():  # same name as the registered builder
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="twice"):
        register(mlp)
    assert REGISTRY["mlp"] is not mlp


# The five tutorial programs, layer for layer (issue: full-scale data). Each entry is the
# sequence of (layer type, its defining sizes) and the published parameter count: a seed
# name must always mean the seed's network, so any drift in a layer fails here.
SEEDS = {
    "mlp": (397_510, [("Flatten",), ("Linear", 784, 500), ("ReLU",), ("Linear", 500, 10)]),
    "cnn_16_32": (28_938, [
        ("Conv2d", 1, 16, (5, 5), (1, 1), (2, 2)), ("ReLU",), ("MaxPool2d", 2),
        ("Conv2d", 16, 32, (5, 5), (1, 1), (2, 2)), ("ReLU",), ("MaxPool2d", 2),
        ("Flatten",), ("Linear", 1568, 10)]),
    "cnn_32_64": (225_034, [
        ("Conv2d", 1, 32, (3, 3), (1, 1), (0, 0)), ("ReLU",), ("MaxPool2d", 2),
        ("Conv2d", 32, 64, (3, 3), (1, 1), (0, 0)), ("ReLU",), ("MaxPool2d", 2),
        ("Flatten",), ("Linear", 1600, 128), ("ReLU",), ("Linear", 128, 10)]),
    "cnn_4_8": (207_258, [
        ("Conv2d", 1, 4, (5, 5), (1, 1), (2, 2)), ("ReLU",), ("MaxPool2d", 2),
        ("Conv2d", 4, 8, (5, 5), (1, 1), (2, 2)), ("ReLU",), ("MaxPool2d", 2),
        ("Flatten",), ("Linear", 392, 512), ("ReLU",), ("Dropout", 0.5), ("Linear", 512, 10),
        ("LogSoftmax",)]),
    "lenet5": (61_706, [
        ("Conv2d", 1, 6, (5, 5), (1, 1), (2, 2)), ("Sigmoid",), ("AvgPool2d", 2),
        ("Conv2d", 6, 16, (5, 5), (1, 1), (0, 0)), ("Sigmoid",), ("AvgPool2d", 2),
        ("Flatten",), ("Linear", 400, 120), ("Sigmoid",), ("Linear", 120, 84), ("Sigmoid",),
        ("Linear", 84, 10)]),
}


def _describe(m: torch.nn.Module) -> tuple:
    name = type(m).__name__
    if isinstance(m, torch.nn.Conv2d):
        return (name, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
    if isinstance(m, torch.nn.Linear):
        return (name, m.in_features, m.out_features)
    if isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
        return (name, m.kernel_size)
    if isinstance(m, torch.nn.Dropout):
        return (name, m.p)
    return (name,)


@pytest.mark.parametrize("arch", sorted(SEEDS))
def test_seed_networks_are_the_tutorials_layer_for_layer(params, arch):
    """Built from params.yaml's own args, every seed is its tutorial's exact network."""
    count, layers = SEEDS[arch]
    hp = HParams.from_params(params, arch)
    model = build_model(arch, num_classes=10, **hp.args)
    assert [_describe(m) for m in model.children()] == layers
    assert count_parameters(model) == count


def test_every_tutorial_network_is_registered_under_its_seed_name():
    assert set(SEEDS) | {"resnet_bn"} == set(REGISTRY)


def test_a_network_too_big_for_memory_is_one_line_naming_its_args(monkeypatch):
    """The allocator's refusal (``hidden: 100000000`` asks for 313 GB) is the user's setting:
    one line naming the arch, its sizes and the params key; any other RuntimeError of a
    builder is a bug and keeps its traceback. (Patched: really asking for 313 GB could be
    granted by an overcommitting kernel and end in the OOM killer.)"""
    from mnistlab import models

    def too_big(**args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 313600000000 bytes.")

    monkeypatch.setitem(models.REGISTRY, "mlp", too_big)
    with pytest.raises(MnistlabError) as e:
        models.build_model("mlp", num_classes=10, in_channels=1, hidden=100_000_000)
    assert str(e.value) == ("arch 'mlp' (hidden=100000000): the network's weights do not fit in "
                            "memory; make its sizes (hparams.mlp.args in params.yaml) smaller")

    def buggy(**args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setitem(models.REGISTRY, "mlp", buggy)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        models.build_model("mlp", num_classes=10, in_channels=1)

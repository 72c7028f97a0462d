"""A small trained model for the predict, serve and export tests, and images to show it.

The data are the embedded digits brought to MNIST's layout by ``mnistlab.predict.to_mnist``
(their 20x20 box is centred geometrically; MNIST puts the centre of mass at (14, 14)), so
that "an image already in the layout" means the same thing as for MNIST itself. The model
is the MLP, trained for seconds with a little augmentation (shifts of a pixel or so, as
any re-centring of a resized image makes) so that its answers do not hang on one pixel.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers.repo import committed_params
from mnistlab import artifacts, serving, tracking
from mnistlab.config import TrainSettings
from mnistlab.data.digits import digits_as_mnist
from mnistlab.data.sources import DIGIT_CLASSES
from mnistlab.hparams import HParams
from mnistlab.inference import scores, to_device
from mnistlab.models import load_model, model_record, save_model
from mnistlab.predict import to_mnist

CPU = torch.device("cpu")
CLASSES = list(DIGIT_CLASSES)
AUGMENT = {"translate": 1.5, "rotate": 5.0, "scale": 0.1}


def canonical_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits in MNIST's layout: uint8 [N,28,28], int64 [N]."""
    images, labels = digits_as_mnist()
    return torch.stack([torch.from_numpy(to_mnist(Image.fromarray(a.numpy()))) for a in images]), labels


def write_split(split_dir: Path, images: torch.Tensor, labels: torch.Tensor, n_val: int = 96,
                n_test: int = 360, seed: int = 0) -> Path:
    """A split folder as the split stage writes it (shuffled; train, val, test, summary.json)."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    test, val = slice(0, n_test), slice(n_test, n_test + n_val)
    train = slice(n_test + n_val, None)
    artifacts.save_split(split_dir, {name: (images[s], labels[s]) for name, s in
                                     (("train", train), ("val", val), ("test", test))},
                         {"classes": CLASSES, "test": {"count": n_test}})
    return split_dir


def train_model(split_dir: Path, model_pt: Path, arch: str = "mlp", epochs: int = 60,
                augment: dict | None = AUGMENT, seed: int = 1) -> Path:
    """Train ``arch`` on the split (CPU, seconds) and write its ``model.pt`` as the train stage does."""
    from helpers.training import train_fit

    params = committed_params()
    params["hparams"][arch]["epochs"] = epochs
    if augment:
        params["hparams"][arch]["augment"] = augment
    hp = HParams.from_params(params, arch)
    data = [to_device(*artifacts.load_split(split_dir, s), hp.mean, hp.std, CPU)
            for s in ("train", "val")]
    result = train_fit(hp, TrainSettings(device="cpu", min_steps=0), *data, seed=seed,
                       fingerprint="test", checkpoint=model_pt.parent / "last.pt")
    save_model(model_pt, model_record(arch, {"num_classes": len(CLASSES), "in_channels": 1},
                                      result.model.state_dict(), {"mean": hp.mean, "std": hp.std},
                                      CLASSES))
    return model_pt


def evaluate_predictions(model_pt: Path, images: torch.Tensor) -> np.ndarray:
    """The class index the evaluate stage would predict for each of ``images`` (fp32 scores)."""
    net, record = load_model(model_pt, CPU)
    out, _ = scores(net, images, torch.zeros(len(images), dtype=torch.long), record["normalize"],
                    CPU, 1000)
    return out.argmax(1).numpy()


def render(image: torch.Tensor, size: int | None = None, invert: bool = False,
           canvas: tuple[int, int, int, int] | None = None, mode: str = "L") -> Image.Image:
    """One MNIST-layout image as someone else's picture of it.

    Args:
        image: uint8 [28,28], white on black.
        size: Resized (bicubic) to size x size first.
        invert: Dark digit on a light background.
        canvas: ``(width, height, x, y)``: pasted at (x, y) of a larger background.
        mode: Pillow mode of the result (``L``, ``RGB``, ``RGBA``).
    """
    im = Image.fromarray(image.numpy())
    if size:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    if canvas:
        width, height, x, y = canvas
        bg = Image.new("L", (width, height), 0)
        bg.paste(im, (x, y))
        im = bg
    if invert:
        im = Image.fromarray(255 - np.asarray(im))
    return im.convert(mode)


def reopened(im: Image.Image, fmt: str = "PNG") -> Image.Image:
    """``im`` written as ``fmt`` and read back (JPEG: lossy, quality 92)."""
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    buf.seek(0)
    return Image.open(buf)


def log_champion(model_pt: Path, name: str = "mnistlab-digits", dataset: str = "digits",
                 seed: int = 1234) -> str:
    """Log ``model_pt`` as the train stage of training seed ``seed`` does (raw-pixel pyfunc) into
    the current store and register it as ``name@champion``; returns the run id."""
    from mnistlab.stages.compare import register_champion

    net, record = load_model(model_pt, CPU)
    run_id = tracking.start_run(dataset, record["arch"], seed, {"arch": record["arch"]},
                                {"dvc_stage": "test"})
    example = torch.randint(0, 256, (2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    tracking.log_pytorch_model(run_id, net, example.float().numpy(), functools.partial(
        serving.log_model, classes=record["classes"], normalize=record["normalize"]))
    register_champion(name, run_id, "champion", {"arch": record["arch"]})
    return run_id

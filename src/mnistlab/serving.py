"""The trained network as a classifier of raw images: pixels in, class names and probabilities out.

Every network of the registry expects normalised float input (``(pixel/255 - mean)/std``,
each arch its own mean and std) and returns scores. What uses a model outside the
pipeline should not need to know that, so three consumers share one wrapper:

- :class:`RawImageClassifier` (an ``nn.Module``): uint8 or [0, 255] float images
  [N,28,28] or [N,1,28,28] in MNIST's convention → softmax probabilities [N,K].
  ``mnistlab.predict`` runs it on a local ``model.pt``; ``mnistlab.export`` exports it
  to ONNX.
- The MLflow model the train stage logs (:func:`log_model`; this module is its MLflow
  flavor module): one model, two flavors. Its ``pytorch`` flavor is the bare network,
  exactly as ``mlflow.pytorch`` logs it (normalised input → scores, exported with
  ``torch.export``, batch dimension dynamic). Its ``python_function`` flavor — what
  ``mlflow models serve`` and ``mlflow.pyfunc.load_model`` use — is :func:`_load_pyfunc`:
  raw pixels [N,1,28,28] → a DataFrame with ``class`` (the predicted name),
  ``probability`` (its probability) and one probability column per class name. The
  signature describes that pyfunc input (float32 [-1,1,28,28], raw pixels); the class
  names and the normalisation live in the pyfunc flavor's ``model_config`` and in the
  model's metadata (``mnistlab``).

Serving imports this module by name (``loader_module: mnistlab.serving``), so the
serving environment needs mnistlab installed: ``mlflow models serve --env-manager
local`` from this repository's venv. The ``pytorch`` flavor alone needs only torch.

Only what a logged model records lives here, nothing that decides the weights: like
tracking.py, it is left out of the training checkpoint's code fingerprint
(:data:`mnistlab.checkpoint.RECORDING_ONLY`).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from mnistlab.config import RESERVED_CLASS_NAMES
from mnistlab.errors import MnistlabError

METADATA_KEY = "mnistlab"


class RawImageClassifier(nn.Module):
    """Raw images → class probabilities: the normalisation of training and a softmax around ``model``.

    Args:
        model: A network of the registry (normalised [N,1,28,28] float → [N,K] scores or
            log-probabilities; softmax makes both probabilities).
        mean: The ``normalize.mean`` it was trained with.
        std: The ``normalize.std`` it was trained with.

    Input: uint8, or float in [0, 255], shaped [N,28,28] or [N,1,28,28], white digit on
    black as in MNIST. Output: float32 [N,K] probabilities.
    """

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model = model
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = (x.float() / 255.0 - self.mean) / self.std
        return torch.softmax(self.model(x).float(), dim=1)


def check_classes(classes: list[str], outputs: int | None = None, where: str = "model") -> list[str]:
    """Class names usable as DataFrame columns beside ``class``/``probability``; ``outputs`` many.

    Raises:
        MnistlabError: Duplicate or reserved names, or a count that differs from the
            network's output size (``outputs``).
    """
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes) or set(classes) & set(RESERVED_CLASS_NAMES):
        raise MnistlabError(f"{where}: class names must be unique and not {' or '.join(RESERVED_CLASS_NAMES)}")
    if outputs is not None and outputs != len(classes):
        raise MnistlabError(f"{where}: {len(classes)} class names but the network has {outputs} "
                            "outputs (classes do not match the model)")
    return classes


def probabilities_frame(probs: np.ndarray, classes: list[str]):
    """[N,K] probabilities → DataFrame: ``class``, ``probability``, then one column per class."""
    import pandas as pd

    probs = np.asarray(probs, dtype=np.float64)
    best = probs.argmax(axis=1)
    return pd.DataFrame({"class": np.asarray(classes, dtype=object)[best],
                         "probability": probs[np.arange(len(probs)), best],
                         **{c: probs[:, k] for k, c in enumerate(classes)}})


def check_pixels(pixels: np.ndarray) -> None:
    """Refuse what is no grey level: NaN, inf, or a value outside [0, 255].

    The signature checks only dtype and shape, and the network answers anything: a pixel
    of 1e30 was class "4" with probability 1.0, a NaN one class "0" with probability NaN,
    both HTTP 200. Raised as MLflow's INVALID_PARAMETER_VALUE, as its schema check rejects
    a wrong shape, so ``mlflow models serve`` answers HTTP 400 with this message.

    Raises:
        mlflow.exceptions.MlflowException: Naming the offending values and the first image
            holding one.
    """
    finite = np.isfinite(pixels)
    if finite.all():
        bad = (pixels < 0) | (pixels > 255)
        if not bad.any():
            return
        got = f"values from {pixels.min():g} to {pixels.max():g}"
    else:
        bad = ~finite
        got = ", ".join(sorted({"NaN" if np.isnan(v) else str(v) for v in pixels[bad].tolist()}))
    from mlflow.exceptions import MlflowException

    where = f" (first in image {np.argwhere(bad)[0][0]} of {len(pixels)})" if pixels.ndim > 1 else ""
    raise MlflowException.invalid_parameter_value(
        f"pixels must be finite grey levels in 0..255; got {got}{where}")


class RawImagePyfunc:
    """The ``python_function`` flavor's model: ``predict(raw pixels) -> DataFrame``."""

    def __init__(self, classifier: RawImageClassifier, classes: list[str], batch_size: int = 1000):
        self.classifier, self.classes, self.batch_size = classifier, classes, batch_size

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        pixels = np.asarray(model_input, dtype=np.float32)
        check_pixels(pixels)
        x = torch.as_tensor(pixels)
        with torch.inference_mode():
            probs = torch.cat([self.classifier(x[i:i + self.batch_size])
                               for i in range(0, len(x), self.batch_size)]) if len(x) else \
                torch.zeros(0, len(self.classes))
        check_classes(self.classes, probs.shape[1])
        return probabilities_frame(probs.numpy(), self.classes)


# --------------------------------------------------------------------------- the MLflow flavor


def log_model(model: nn.Module, example: np.ndarray, pip_requirements: list[str], *,
              classes: list[str], normalize: dict[str, float]):
    """Log ``model`` as the active run's ``model``: pytorch flavor + raw-pixel pyfunc flavor.

    Called inside the run by :func:`mnistlab.tracking.log_pytorch_model`, as its
    ``log_model=functools.partial(log_model, classes=..., normalize=...)``.

    Args:
        model: The trained network on the CPU in eval mode.
        example: Raw pixels, float32 [B,1,28,28] in 0..255, B >= 2 (``torch.export``
            specialises a batch of 1 to a constant): the input example, and the
            source of the signature's input.
        pip_requirements: Explicit pins (inferring them would import the model in a
            subprocess: seconds per model).
        classes: Class names, one per output.
        normalize: ``{mean, std}`` the network was trained with.

    Returns:
        MLflow's ``ModelInfo``.
    """
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    with torch.inference_mode():
        outputs = model(torch.zeros(1, *example.shape[1:])).shape[1]
    classes = check_classes(classes, outputs)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
        outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                        *[ColSpec("double", c) for c in classes]]))
    with warnings.catch_warnings():
        # torch's pt2 writer warns "No complete tensor found in the group! ... may cause issues
        # when your weights are not on CPU" for a weight stored as part of a larger storage,
        # which it then saves whole: this copy's weights are on the CPU, and MLflow reloads
        # the saved model on the input example before the log counts. Every conv arch's train
        # log carried the line.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group",
                                category=UserWarning)
        return Model.log(None, flavor=sys.modules[__name__], name="model", pytorch_model=model,
                         classes=classes, normalize=dict(normalize), signature=signature,
                         input_example=example.astype(np.float32),
                         pip_requirements=pip_requirements, serialization_format="pt2")


def save_model(path: str, mlflow_model, pytorch_model: nn.Module, classes: list[str],
               normalize: dict[str, float], **kwargs: Any) -> None:
    """The flavor module's ``save_model`` (called by ``mlflow.models.Model.log``).

    ``mlflow.pytorch.save_model`` writes everything (pt2 network, environment files,
    input example, MLmodel); then the ``python_function`` flavor is pointed at
    :func:`_load_pyfunc` with the class names and normalisation as its ``model_config``.
    """
    import mlflow.pytorch
    from mlflow import pyfunc

    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
    conf = mlflow_model.flavors.get(pyfunc.FLAVOR_NAME)
    if conf is None:  # mlflow.pytorch adds it for a single numpy input example
        raise RuntimeError("mlflow.pytorch.save_model added no python_function flavor")
    config = {"classes": list(classes), "mean": float(normalize["mean"]),
              "std": float(normalize["std"])}
    conf.pop("pickle_module_name", None)
    conf[pyfunc.MAIN] = __name__
    conf[pyfunc.MODEL_CONFIG] = config
    mlflow_model.metadata = {**(mlflow_model.metadata or {}), METADATA_KEY: {
        **config, "pyfunc_input": "raw pixels 0..255, float32 [N,1,28,28], white digit on black",
        "pytorch_input": "(pixel/255 - mean)/std, float32 [N,1,28,28]"}}
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> RawImagePyfunc:
    """The pyfunc loader: the model's own ``pytorch`` flavor, wrapped in :class:`RawImageClassifier`."""
    import mlflow.pytorch

    config = model_config or {}
    if not {"classes", "mean", "std"} <= set(config):
        raise MnistlabError(f"{data_path}: model_config lacks classes, mean or std")
    net = mlflow.pytorch.load_model(os.path.dirname(os.path.abspath(data_path)))
    # no .eval(): an exported (pt2) module refuses it, and was exported in eval mode
    return RawImagePyfunc(RawImageClassifier(net, config["mean"], config["std"]),
                          [str(c) for c in config["classes"]])

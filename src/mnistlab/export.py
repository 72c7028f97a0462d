"""ONNX export of a trained model as a raw-image classifier, checked against PyTorch.

::

    python -m mnistlab.export models/<ds>/<arch>/seed-<seed>/model.pt OUT.onnx [--split data/split/<ds>]

The compare stage runs :func:`export_onnx` on each dataset's champion
(``exports/<ds>/champion.onnx``); the command does the same for any ``model.pt``.

What is exported is :class:`mnistlab.serving.RawImageClassifier` around the network,
so an ONNX runtime needs nothing else: input ``pixels``, float32 [N,1,28,28], raw grey
levels 0..255 in MNIST's convention (white digit on black, as ``mnistlab.predict``
prepares images), N dynamic; output ``probabilities``, float32 [N,K]. The class names
are in the model's metadata (``mnistlab.classes``, a JSON list) and in ``OUT.json``
beside it, with the check's results.

The check: ONNX Runtime against PyTorch on the test split (without ``--split``: on 256
seeded random images), the same class for at least 99.9 % of the images and no
probability more than 1e-4 apart; otherwise nothing is written and the error says by
how much it missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnistlab import artifacts
from mnistlab.errors import MnistlabError, exit_after, run_stage
from mnistlab.models import load_model
from mnistlab.serving import RawImageClassifier, check_classes
from mnistlab.utils import atomic_path, write_json

MIN_AGREEMENT = 0.999  # share of images with the same argmax in ONNX Runtime and PyTorch
MAX_DIFF = 1e-4        # largest |probability difference| allowed
INPUT, OUTPUT = "pixels", "probabilities"
# Cache-sized batches: resnet_bn's check on MNIST's 10,000 test images took 10.3 s at 1,000
# (PyTorch NCHW 8.5 s, ONNX Runtime 1.9 s) and 5.0 s at 128 with PyTorch in NHWC (2-core Xeon).
BATCH = 128


def export_onnx(model_pt: Path, out: Path, test_split: Path | None = None) -> dict[str, Any]:
    """Export ``model_pt`` (a train stage's ``model.pt``) to ``out`` and check it; return the report.

    Args:
        model_pt: The model file.
        out: The ``.onnx`` file to write (atomically, only if the check passes);
            the report goes to ``out`` with suffix ``.json``.
        test_split: A split folder (``data/split/<ds>``) whose ``test.pt`` the check runs
            on; None: 256 seeded random images.

    Raises:
        MnistlabError: Unreadable model or split, classes that do not match the network,
            or an export that disagrees with PyTorch.
    """
    model_pt, out = Path(model_pt), Path(out)
    net, record = load_model(model_pt, torch.device("cpu"))
    norm = record["normalize"]
    clf = RawImageClassifier(net, norm["mean"], norm["std"]).eval()
    with torch.inference_mode():
        outputs = clf(torch.zeros(1, 1, artifacts.SIDE, artifacts.SIDE)).shape[1]
    classes = check_classes(record["classes"], outputs, str(model_pt))
    if test_split is not None:
        images, source = artifacts.load_split(Path(test_split), "test")[0], str(test_split)
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (256, artifacts.SIDE, artifacts.SIDE), generator=g,
                               dtype=torch.uint8)
        source = "256 random images (seed 0)"

    program = _export(clf)
    program.model.metadata_props.update({
        "mnistlab.classes": json.dumps(classes), "mnistlab.arch": str(record["arch"]),
        "mnistlab.input": "pixels: float32 [N,1,28,28], grey levels 0..255, white digit on black",
    })
    report = {"model": str(model_pt), "arch": record["arch"], "classes": classes,
              "normalize": {"mean": float(norm["mean"]), "std": float(norm["std"])},
              "input": {"name": INPUT, "dtype": "float32", "shape": ["N", 1, 28, 28],
                        "range": [0, 255]},
              "output": {"name": OUTPUT, "dtype": "float32", "shape": ["N", len(classes)]}}
    with atomic_path(out) as tmp:
        program.save(tmp, external_data=False)
        check = check_onnx(tmp, clf, images)
        report["check"] = {"images": source, **check}
        if check["argmax_agreement"] < MIN_AGREEMENT or check["max_abs_diff"] >= MAX_DIFF:
            raise MnistlabError(
                f"{out}: the ONNX export disagrees with PyTorch on {source}: same class for "
                f"{check['argmax_agreement']:.4%} of {check['n']} images (need {MIN_AGREEMENT:.1%}), "
                f"max |probability difference| {check['max_abs_diff']:.2e} (need < {MAX_DIFF:g})")
    # Only once the .onnx is in place: a failed export leaves no report of it behind.
    write_json(out.with_suffix(".json"), report)
    return report


def _export(clf: RawImageClassifier):
    """``torch.onnx.export`` (the torch.export-based exporter), batch dimension dynamic."""
    example = torch.zeros(2, 1, artifacts.SIDE, artifacts.SIDE)
    # The exporter's optimiser logs every pass at INFO (a stage logs at INFO): keep it quiet.
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
            return torch.onnx.export(clf, (example,), dynamo=True, verbose=False,
                                     input_names=[INPUT], output_names=[OUTPUT],
                                     dynamic_shapes=({0: torch.export.Dim("batch")},))
    except ImportError as e:  # onnx / onnxscript missing: a setup problem, not a bug
        raise MnistlabError(f"ONNX export needs onnx and onnxscript ({e}); run `make setup`") from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def check_onnx(path: Path, clf: RawImageClassifier, images: torch.Tensor) -> dict[str, Any]:
    """ONNX Runtime on ``path`` vs ``clf`` in PyTorch (fp32) on uint8 ``images`` [N,28,28].

    ``clf`` runs in channels_last (converted in place: call this after the export), as the
    evaluate stage does; its scores differ from NCHW's by float rounding only.
    """
    import onnxruntime as ort

    clf.to(memory_format=torch.channels_last)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    same, worst = 0, 0.0
    x = images.unsqueeze(1).float()
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH]
        got = session.run([OUTPUT], {INPUT: batch.numpy()})[0]
        with torch.inference_mode():
            want = clf(batch).numpy()
        same += int((got.argmax(1) == want.argmax(1)).sum())
        worst = max(worst, float(np.abs(got - want).max()))
    return {"n": len(x), "argmax_agreement": same / len(x), "max_abs_diff": worst}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mnistlab.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a train stage's models/<ds>/<arch>/seed-<seed>/model.pt")
    ap.add_argument("out", type=Path, help="the .onnx file to write (its report: the same name, .json)")
    ap.add_argument("--split", type=Path, help="data/split/<ds>: check on its test.pt")
    args = ap.parse_args(argv)

    def run() -> None:
        report = export_onnx(args.model, args.out, args.split)
        print(json.dumps({"onnx": str(args.out), **report["check"]}))

    run_stage(run)


if __name__ == "__main__":
    exit_after(main)

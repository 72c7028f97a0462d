"""Scoring MNIST's 10,000 test images: batch size and memory layout, every registered arch.

    python benchmarks/inference.py                  # ../shared/datasets/mnist's t10k images
    python benchmarks/inference.py --data DIR       # a folder with t10k-images-idx3-ubyte(.gz)

What the evaluate stage (which also records the embeddings the features stage maps) and
compare's ONNX check spend on their forward passes: :func:`mnistlab.inference.scores`, fp32 as they run it, on the device
``evaluate.device`` picks, for batch sizes x {NCHW, NHWC (channels_last)}. Each cell is
the median of 3 passes over the whole test set after one warm-up batch, with the largest
|logit difference| from the NCHW pass at the largest batch (the layout changes the float
rounding, not the scores). The weights are a seeded initialisation: speed does not
depend on their values. Chooses params.yaml's ``evaluate.batch_size`` and
``evaluate.channels_last``.

Writes ``benchmarks/results/inference-<device>.{json,md}``, with the CPU's model and
vector flags.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchlib import cpu, unpack_idx
from torchvision.datasets.mnist import read_image_file

from mnistlab.config import EvaluateSettings, load_params
from mnistlab.hparams import HParams
from mnistlab.inference import scores
from mnistlab.models import REGISTRY, build_model
from mnistlab.utils import pick_device, write_json

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (2000, 1000, 512, 256, 128, 64)


def timed(model: torch.nn.Module, images: torch.Tensor, norm: dict[str, float], device: torch.device,
          batch: int, nhwc: bool, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeats`` scoring passes over ``images``, and the last pass's scores."""
    labels = torch.zeros(len(images), dtype=torch.long)
    scores(model, images[:batch], labels[:batch], norm, device, batch, nhwc)  # warm-up
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, _ = scores(model, images, labels, norm, device, batch, nhwc)  # .cpu(): synchronised
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist")
    ap.add_argument("--archs", default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    params = load_params(args.params)
    settings = EvaluateSettings.from_params(params)
    device = pick_device(settings.device, "evaluate.device")
    with tempfile.TemporaryDirectory() as tmp:
        raw = unpack_idx(args.data, Path(tmp))
        images = read_image_file(str(raw / "t10k-images-idx3-ubyte"))
    archs = sorted(REGISTRY) if args.archs == "all" else args.archs.split(",")
    rows = []
    for arch in archs:
        hp = HParams.from_params(params, arch)
        torch.manual_seed(0)
        model = build_model(arch, **hp.args).to(device).eval()
        norm = {"mean": hp.mean, "std": hp.std}
        ref = None
        for nhwc in (False, True):  # NCHW first: scores() converts the model in place for NHWC
            for batch in BATCHES:
                s, out = timed(model, images, norm, device, batch, nhwc, args.repeats)
                ref = out if ref is None else ref
                rows.append({"arch": arch, "layout": "NHWC" if nhwc else "NCHW", "batch": batch,
                             "seconds": s, "images_per_second": len(images) / s,
                             "max_abs_logit_diff": float((out - ref).abs().max())})
                print(rows[-1], flush=True)

    model_name, simd = cpu()
    name = torch.cuda.get_device_name() if device.type == "cuda" else model_name
    chosen = {"batch": settings.batch_size, "layout": "NHWC" if settings.channels_last else "NCHW"}
    result = {"device": device.type, "device_name": name, "torch": torch.__version__,
              "cpu_flags": " ".join(simd) if device.type == "cpu" else "",
              "threads": torch.get_num_threads(), "images": len(images), "data": str(args.data),
              "params_yaml": chosen, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"inference-{device.type}"
    write_json(stem.with_suffix(".json"), result)

    def cell(arch: str, layout: str, batch: int) -> str:
        r = next(r for r in rows if (r["arch"], r["layout"], r["batch"]) == (arch, layout, batch))
        mark = "**" if (layout, batch) == (chosen["layout"], chosen["batch"]) else ""
        return f"{mark}{r['seconds']:.2f}{mark}"

    lines = [f"Scoring the {len(images):,} MNIST test images (`mnistlab.inference.scores`, fp32) on "
             f"{device.type} ({name}{'; ' + result['cpu_flags'] if result['cpu_flags'] else ''}; "
             f"{result['threads']} threads), torch {torch.__version__}: seconds, median of "
             f"{args.repeats}. Bold: params.yaml's evaluate setting "
             f"({chosen['layout']}, batch {chosen['batch']}).", "",
             "| arch | " + " | ".join(f"{lay} {b}" for lay in ("NCHW", "NHWC") for b in BATCHES)
             + " | max \\|Δ logit\\| |",
             "|---|" + "---:|" * (2 * len(BATCHES) + 1)]
    for arch in archs:
        worst = max(r["max_abs_logit_diff"] for r in rows if r["arch"] == arch)
        lines.append(f"| {arch} | " + " | ".join(cell(arch, lay, b) for lay in ("NCHW", "NHWC")
                                                  for b in BATCHES) + f" | {worst:.1e} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()

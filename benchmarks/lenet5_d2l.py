"""d2l.ai's own LeNet program on full Fashion-MNIST, several seeds: how far apart can its
published single run (test accuracy 0.779) and ours (81.7 %) be by chance alone?

Why (issue #9): ``reports/reproduction.md`` misses the lenet5 target (within 2 pp of
d2l's 0.779) from above. Our train loss and train accuracy match d2l's (0.469 / 0.823),
our test accuracy does not. This runs the tutorial's program itself, not mnistlab: d2l's
``nn.Sequential`` LeNet, its ``init_weights`` (Xavier-uniform weights, torch's default
biases), ``SGD(lr=0.9)``, ``CrossEntropyLoss``, batch 256, 10 epochs, all 60,000 training
images reshuffled every epoch with the last partial batch of 96 kept, the test accuracy
after each epoch (``train_ch6``), fp32. Its loader differs in one way that changes no
number: the images are ``ToTensor``'d once up front (``uint8 / 255``, what ``ToTensor``
computes per image) and fed through the same shuffling ``DataLoader``, so a run takes
minutes, not most of an hour of PIL conversions.

Besides d2l's per-epoch test accuracy, it evaluates the full test set after *every* step of
the last epoch: d2l prints the test accuracy of the weights after the last step only, and
at a constant lr of 0.9 one step moves the weights enough to move that number.

    python benchmarks/lenet5_d2l.py                 # seeds 1-8, two processes of one thread
    python benchmarks/lenet5_d2l.py --seeds 1,2 --jobs 1
    python benchmarks/lenet5_d2l.py --report        # the .md again from the .json

Writes ``benchmarks/results/lenet5-d2l-program-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from benchlib import IDX_NAMES, cpu, idx_file, unpack_idx
from scipy.stats import binomtest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT.parent / "shared" / "datasets" / "fashion-mnist"
PUBLISHED = 0.779  # d2l.ai, chapter "LeNet": loss 0.469, train acc 0.823, test acc 0.779
TOLERANCE = 0.02   # issue #9's target for lenet5: within 2 pp of the published run


def d2l_lenet() -> nn.Sequential:
    """d2l.ai's LeNet, verbatim."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10))


def load(data: Path, split: str) -> TensorDataset:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    prefix = "train" if split == "train" else "t10k"
    with tempfile.TemporaryDirectory(prefix="fashion-") as tmp:
        raw = unpack_idx(data, Path(tmp))
        x = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte")).unsqueeze(1).float().div(255)
        y = read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))
    return TensorDataset(x, y)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    correct = sum((net(xb).argmax(1) == yb).sum().item()
                  for xb, yb in zip(x.split(1000), y.split(1000), strict=True))
    net.train()
    return correct / len(y)


def run(seed: int, data: Path = FASHION, epochs: int = 10, lr: float = 0.9,
        batch_size: int = 256) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, test = load(data, "train"), load(data, "test")
    xt, yt = test.tensors
    train_iter = DataLoader(train, batch_size, shuffle=True)  # d2l: shuffle=True, no drop_last

    net = d2l_lenet()

    def init_weights(m: nn.Module) -> None:  # d2l's train_ch6, verbatim
        if type(m) == nn.Linear or type(m) == nn.Conv2d:  # noqa: E721
            nn.init.xavier_uniform_(m.weight)

    net.apply(init_weights)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss = nn.CrossEntropyLoss()
    per_epoch, last_epoch_steps = [], []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        l_sum = acc_sum = n = 0.0
        net.train()
        for X, y in train_iter:
            optimizer.zero_grad()
            y_hat = net(X)
            ls = loss(y_hat, y)
            ls.backward()
            optimizer.step()
            with torch.no_grad():
                l_sum += ls.item() * len(y)
                acc_sum += (y_hat.argmax(1) == y).sum().item()
                n += len(y)
            if epoch == epochs - 1:
                last_epoch_steps.append(accuracy(net, xt, yt))
        per_epoch.append({"train_loss": l_sum / n, "train_acc": acc_sum / n,
                          "test_acc": accuracy(net, xt, yt)})
    return {"seed": seed, "epochs": per_epoch, "last_epoch_step_test_acc": last_epoch_steps,
            "steps_per_epoch": len(train_iter),
            "last_batch": len(train) - (len(train_iter) - 1) * batch_size,
            "seconds": time.perf_counter() - t0}


def seeds_arg(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def report(runs: list[dict], machine: str) -> str:
    lo, hi = PUBLISHED - TOLERANCE, PUBLISHED + TOLERANCE
    finals = [r["epochs"][-1]["test_acc"] for r in runs]
    steps = [a for r in runs for a in r["last_epoch_step_test_acc"]]
    within = sum(lo <= a <= hi for a in steps)
    lines = [
        "# d2l.ai's LeNet program on full Fashion-MNIST: the spread of its final test accuracy",
        "",
        f"{machine}. Produced by `python benchmarks/lenet5_d2l.py`; regenerate, never edit.",
        "d2l's program (network, init, SGD lr 0.9, batch 256, 10 epochs, all 60,000 training",
        "images, last partial batch kept, fp32), not mnistlab. Published: train loss 0.469,",
        f"train accuracy 0.823, test accuracy {PUBLISHED} (one run); issue #9's band is",
        f"{pct(lo)}-{pct(hi)}.",
        "",
        "| seed | test accuracy after epochs 1-10 (%) | epoch-10 train loss | epoch-10 train acc | final test acc | last epoch, test acc after each of its steps: min / median / max |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in runs:
        e = r["epochs"]
        s = r["last_epoch_step_test_acc"]
        curve = " ".join(f"{100 * x['test_acc']:.1f}" for x in e)
        lines.append(
            f"| {r['seed']} | {curve} | "
            f"{e[-1]['train_loss']:.3f} | {e[-1]['train_acc']:.3f} | {pct(e[-1]['test_acc'])} | "
            f"{pct(min(s))} / {pct(statistics.median(s))} / {pct(max(s))} |")
    sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
    # The last step of every epoch is the partial batch (60,000 = 234 x 256 + 96), and d2l
    # reads the test accuracy right after it: its effect is the last snapshot minus the one
    # before, against the other steps' jumps.
    jumps = [r["last_epoch_step_test_acc"][-1] - r["last_epoch_step_test_acc"][-2] for r in runs]
    others = [b - a for r in runs for a, b in itertools.pairwise(r["last_epoch_step_test_acc"][:-1])]
    down = sum(j < 0 for j in jumps)
    sign_p = binomtest(down, len(jumps), 0.5, alternative="greater").pvalue
    lines += [
        "",
        f"- Final test accuracy (what d2l prints) over {len(runs)} seeds: "
        f"{pct(min(finals))}-{pct(max(finals))}, mean {pct(statistics.mean(finals))}, "
        f"sd {100 * sd:.2f} pp; {sum(lo <= a <= hi for a in finals)} of {len(finals)} "
        f"inside the band.",
        f"- Test accuracy after each step of the last epoch ({len(steps)} snapshots, "
        f"{runs[0]['steps_per_epoch']} per seed): {pct(min(steps))}-{pct(max(steps))}, "
        f"sd {100 * statistics.stdev(steps):.2f} pp; {within} of {len(steps)} "
        f"({100 * within / len(steps):.1f} %) inside the band.",
        f"- The last step, a batch of {runs[0]['last_batch']} images, changed the test accuracy by "
        f"{', '.join(f'{100 * j:+.2f}' for j in jumps)} pp (mean {100 * statistics.mean(jumps):+.2f} pp; "
        f"lower in {down} of {len(jumps)} seeds, one-sided sign test p = {sign_p:.4f}); the "
        f"other steps of the last epoch: mean {100 * statistics.mean(others):+.3f} pp, "
        f"sd {100 * statistics.stdev(others):.2f} pp.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=seeds_arg, default=seeds_arg("1-8"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10, help="d2l's 10; fewer only to try the script")
    ap.add_argument("--data", type=Path, default=FASHION,
                    help="a folder of the four Fashion-MNIST IDX files (.gz or not)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report", action="store_true",
                    help="rewrite the .md from the .json already in --out (no training)")
    args = ap.parse_args()
    stem = args.out / "lenet5-d2l-program-cpu"
    if args.report:
        if not stem.with_suffix(".json").is_file():
            ap.error(f"--report: {stem.with_suffix('.json')} not found (run without --report first)")
        saved = json.loads(stem.with_suffix(".json").read_text())
        text = report(saved["runs"], saved["machine"])
        stem.with_suffix(".md").write_text(text)
        print(text)
        return
    # Checked here, before the workers start: a missing file would otherwise end each of them
    # in a traceback.
    missing = [n for n in IDX_NAMES if idx_file(args.data, n) is None]
    if missing:
        ap.error(f"--data {args.data}: no {', '.join(missing)} (.gz or not)")
    model, flags = cpu()
    machine = (f"{dt.date.today()}, {model} ({', '.join(flags)}), torch {torch.__version__}, "
               f"{args.jobs} process(es) of 1 torch thread")
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = sorted(pool.map(run, args.seeds, [args.data] * len(args.seeds),
                               [args.epochs] * len(args.seeds)), key=lambda r: r["seed"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    text = report(runs, machine)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

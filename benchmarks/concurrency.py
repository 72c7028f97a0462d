"""N training runs at once on one CPU machine: aggregate images/s with ``train.threads: auto``.

Issue #14: with 4-5 pipelines on 2 cores every process started one OpenMP thread per core,
the threads spun against each other and training ran 20-140x slower. Here N = 1, 2, 4
processes train at the same time, each the same fixed workload (default: mlp 5 epochs and
cnn_32_64 1 epoch on full MNIST, 60,000 training images), with

- ``auto``: each process takes its thread slot at start and sets its thread count right
  before training exactly as the train stage does (:class:`mnistlab.threads.Lease`);
- ``all-cores``: torch's default, one thread per core in every process (the old behaviour).

Each process is mnistlab's training function (:func:`mnistlab.training.build` and
:func:`~mnistlab.training.fit`, as the train stage calls them; no MLflow), started as its
own ``python`` with OMP_NUM_THREADS, MKL_NUM_THREADS and MNISTLAB_THREADS removed from its
environment. The N processes load their data, build their model, then wait at a barrier and
train together. Reported per (arch, mode, N): each run's thread count and images/s
(its training loop alone, as train.json's ``train_images_per_second``) and the aggregate,
the images all N trained over the span from the first start to the last end. Target:
aggregate at N = 2 and 4 >= 0.8x the N = 1 figure (no collapse). A group that runs past
``--timeout-factor`` x the time N runs would take at N = 1's aggregate is stopped and
reported as an upper bound (``<=``).

    python benchmarks/concurrency.py            # full MNIST (../shared/datasets/mnist): 6-12 min on 2 cores
    python benchmarks/concurrency.py --quick    # mnist-mini (8,000 images), 1-2 minutes

Writes ``benchmarks/results/concurrency-cpu.{json,md}`` (``--quick``: ``concurrency-cpu-quick``).
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import IDX_NAMES, cpu, unpack_idx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
DEFAULT_ARCHS = "mlp:5,cnn_32_64:1"
MODES = {"auto": "train.threads: auto", "all-cores": "torch default in every run (before #14)"}
TARGET = 0.8
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MNISTLAB_THREADS")


# --------------------------------------------------------------------------- data


def _idx_folder(src: Path, tmp: Path) -> Path:
    """``src`` if it holds uncompressed IDX files, else a folder of them decompressed from ``.gz``."""
    if all((src / n).is_file() for n in IDX_NAMES[:2]):
        return src
    return unpack_idx(src, tmp / "raw")


def prepare_data(data: str, take: int, val: int, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """The training images (the first ``take``, 0: all) and ``val`` validation images as one file.

    ``data``: a folder of the four MNIST files (``.gz`` or not), or ``digits`` (embedded).
    Validation images: the first ``val`` of the official test set, else the training set's last.
    """

    from mnistlab.utils import torch_save

    if data == "digits":
        from mnistlab.data.digits import digits_as_mnist

        x, y = digits_as_mnist()
        vx, vy = x[-val:], y[-val:]
        x, y = x[:-val], y[:-val]
    else:
        from mnistlab.data.idx import IMAGES, read_pair

        raw = _idx_folder(Path(data), tmp)
        x, y = read_pair(raw, "train", 10)
        if (raw / IMAGES["test"]).is_file():
            vx, vy = read_pair(raw, "test", 10)
            vx, vy = vx[:val], vy[:val]
        else:
            vx, vy = x[-val:], y[-val:]
            x, y = x[:-val], y[:-val]
    if take:
        x, y = x[:take], y[:take]
    path = tmp / "data.pt"
    torch_save({"x": x.contiguous(), "y": y.contiguous(), "vx": vx.contiguous(),
                "vy": vy.contiguous()}, path)
    return path, {"data": data, "train_images": len(y), "val_images": len(vy)}


# --------------------------------------------------------------------------- one run


def worker(args: argparse.Namespace) -> None:
    """One training process: slot at start (auto), data + model, barrier, threads, fit, result."""
    from mnistlab import threads  # no torch yet: the slot is taken before the slow imports

    lease = threads.Lease() if args.mode == "auto" else None

    import torch

    from mnistlab.config import TrainSettings, load_params, seeds_of
    from mnistlab.hparams import HParams
    from mnistlab.inference import to_device
    from mnistlab.training import build, fit, steps_per_epoch
    from mnistlab.utils import seed_everything, torch_load, write_json

    params = load_params(args.params)
    seed = seeds_of(params)[0]  # the first training seed, as train@<ds>-<arch>-<seed> uses
    settings = dataclasses.replace(TrainSettings.from_params(params), min_steps=0, device="cpu",
                                   threads="auto")
    hp = dataclasses.replace(HParams.from_params(params, args.arch), epochs=args.epochs)
    d = torch_load(args.data_file)
    cpu = torch.device("cpu")
    seed_everything(seed, settings.deterministic)
    tr = to_device(d["x"], d["y"], hp.mean, hp.std, cpu, settings.channels_last)
    va = to_device(d["vx"], d["vy"], hp.mean, hp.std, cpu, settings.channels_last)
    built = build(hp, settings, num_classes=10, n_train=len(tr), device=cpu, seed=seed)

    Path(args.ready).touch()
    go = Path(args.go)
    while not go.exists():
        time.sleep(0.005)
    n = lease.apply(settings.threads) if lease else torch.get_num_threads()
    t0 = time.time()
    r = fit(built, tr, va, hp=hp, settings=settings, dataset="bench", seed=seed,
            fingerprint="bench", checkpoint=Path(args.result).with_suffix(".ckpt"))
    t1 = time.time()
    if lease:
        lease.release()
    images = hp.epochs * steps_per_epoch(len(tr), hp.batch_size) * min(hp.batch_size, len(tr))
    write_json(args.result, {
        "threads": n, "start": t0, "end": t1, "images": images,
        "train_seconds": r.summary["train_seconds"],
        "images_per_second": r.summary["train_images_per_second"],
        "final_val_accuracy": r.summary["final_val_accuracy"]})


# --------------------------------------------------------------------------- a group of N


def run_group(arch: str, epochs: int, mode: str, n: int, images: int, data_file: Path,
              params: Path, tmp: Path, timeout: float) -> dict[str, Any]:
    """N workers at once, each training ``images`` images; their results and the aggregate.

    ``timeout``: seconds from the barrier; a group still training then is stopped and its
    aggregate reported as a bound, every image of every run in that time (``<=``).
    """
    gid = f"{arch}-{mode}-{n}"
    group = tmp / gid
    group.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env["MNISTLAB_THREAD_SLOTS"] = str(group / "slots")  # these N runs count each other, no one else
    go = group / "go"
    procs, logs = [], []
    for i in range(n):
        log = open(group / f"worker-{i}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--arch", arch, "--epochs", str(epochs),
             "--mode", mode, "--data-file", str(data_file), "--params", str(params),
             "--ready", str(group / f"ready-{i}"), "--go", str(go),
             "--result", str(group / f"result-{i}.json")],
            env=env, stdout=log, stderr=subprocess.STDOUT))

    def stop_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def failed(what: str) -> RuntimeError:
        stop_all()
        tails = "\n".join(f"--- worker {i}:\n" + (group / f"worker-{i}.log").read_text()[-2000:]
                          for i in range(n))
        return RuntimeError(f"{gid}: {what}\n{tails}")

    timed_out = False
    try:
        deadline = time.monotonic() + 600
        while not all((group / f"ready-{i}").exists() for i in range(n)):
            if any(p.poll() is not None for p in procs):
                raise failed("a worker ended before training")
            if time.monotonic() > deadline:
                raise failed("workers not ready after 600 s")
            time.sleep(0.02)
        t_go = time.time()
        go.touch()
        stop = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > stop:
                timed_out = True
                stop_all()
                break
            time.sleep(0.05)
        if not timed_out and any(p.returncode for p in procs):
            raise failed("a worker failed while training")
    finally:
        stop_all()
        for log in logs:
            log.close()
    runs = [json.loads(f.read_text()) for i in range(n)
            if (f := group / f"result-{i}.json").is_file()]
    if timed_out:
        span = timeout
        aggregate = n * images / span  # an upper bound: not even that was done
    else:
        span = max(r["end"] for r in runs) - min(r["start"] for r in runs)
        aggregate = sum(r["images"] for r in runs) / span
    return {"arch": arch, "epochs": epochs, "mode": mode, "n": n, "images_per_run": images,
            "runs": runs, "timed_out": timed_out, "span_seconds": span,
            "barrier_to_first_start": (min(r["start"] for r in runs) - t_go) if runs else None,
            "aggregate_images_per_second": aggregate}


# --------------------------------------------------------------------------- the machine


def cpu_info() -> dict[str, Any]:
    """CPU model and SIMD flags (/proc/cpuinfo), usable cores and torch's threading."""
    import torch

    from mnistlab import threads

    model, simd = cpu()
    limit = threads.cgroup_cpu_limit()
    return {"model": model, "simd": simd, "os_cpu_count": os.cpu_count(),
            "affinity": threads.affinity_cores(), "cgroup_cpu_limit": limit,
            "usable_cores": threads.usable_cores(), "torch": torch.__version__,
            "torch_default_threads": torch.get_num_threads(),
            "parallel_backend": next((ln.split(":", 1)[1].strip() for ln in
                                      torch.__config__.parallel_info().splitlines()
                                      if ln.startswith("ATen parallel backend")), "?")}


# --------------------------------------------------------------------------- report


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def summarize(groups: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """Each group's ratio to its (arch, mode)'s N = 1 aggregate and verdict; whether auto passed."""
    base = {(g["arch"], g["mode"]): g["aggregate_images_per_second"]
            for g in groups if g["n"] == 1 and not g["timed_out"]}
    ok = True
    for g in groups:
        b = base.get((g["arch"], g["mode"]))
        g["ratio_to_n1"] = g["aggregate_images_per_second"] / b if b else None
        if g["n"] == 1 or g["ratio_to_n1"] is None:
            g["verdict"] = ""
        elif g["ratio_to_n1"] >= TARGET and not g["timed_out"]:
            g["verdict"] = "pass"
        else:
            g["verdict"] = "FAIL" if g["mode"] == "auto" else "collapse"
        if g["mode"] == "auto" and g["n"] > 1 and g["verdict"] != "pass":
            ok = False
    return groups, ok


def render(result: dict[str, Any]) -> str:
    c, d = result["cpu"], result["data"]
    limit = "none" if c["cgroup_cpu_limit"] is None else f"{c['cgroup_cpu_limit']:g} CPUs"
    work = ", ".join(f"{a} {e} epoch(s)" for a, e in result["archs"])
    lines = [
        "# Concurrent training runs on CPU: aggregate images/s (issue #14)", "",
        f"CPU: {c['model']} ({', '.join(c['simd']) or 'no AVX'}); {c['usable_cores']} usable "
        f"core(s) (affinity {c['affinity']}, cgroup quota {limit}, os.cpu_count {c['os_cpu_count']}); "
        f"torch {c['torch']}, {c['parallel_backend']}, {c['torch_default_threads']} threads by default.",
        f"Data: {d['data']}, {d['train_images']:,} training images, {d['val_images']:,} validation "
        f"images. Each run: {work} (mnistlab's training function, as the train stage runs it; "
        f"channels_last={result['settings']['channels_last']}, bf16={result['settings']['bf16']}, "
        f"deterministic={result['settings']['deterministic']}).",
        "Modes: " + "; ".join(f"**{m}**: {MODES[m]}" for m in result["modes"]) + ".",
        "Per-run img/s: each run's training loop alone (train.json's train_images_per_second). "
        "Aggregate: the images all N runs trained / (last end - first start), the N runs "
        "released together after loading. `<=`: stopped after the time shown, an upper bound.",
        "",
        "| arch | mode | N | threads per run | per-run img/s | aggregate img/s | vs N = 1 | "
        f">= {TARGET}x |",
        "|---|---|---:|---|---|---:|---:|---|"]
    for g in result["groups"]:
        thr = " / ".join(str(r["threads"]) for r in g["runs"]) or "?"
        per = " / ".join(_fmt(r["images_per_second"]) for r in g["runs"]) or "-"
        agg = _fmt(g["aggregate_images_per_second"])
        if g["timed_out"]:
            agg = f"<= {agg} (stopped after {g['span_seconds']:.0f} s)"
            per = per if g["runs"] else "-"
        ratio = "" if g["ratio_to_n1"] is None else \
            f"{'<= ' if g['timed_out'] else ''}{g['ratio_to_n1']:.2f}x"
        lines.append(f"| {g['arch']} | {g['mode']} | {g['n']} | {thr} | {per} | {agg} | {ratio} "
                     f"| {g['verdict']} |")
    lines += ["", f"**Verdict: {'PASS' if result['pass'] else 'FAIL'}**: with train.threads: auto, "
              f"the aggregate at N > 1 is {'at least' if result['pass'] else 'not always'} "
              f"{TARGET}x the N = 1 figure for every arch.",
              "", f"Command: `{result['command']}`; {result['wall_seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_archs(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, epochs = item.strip().partition(":")
        out.append((name, int(epochs or 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None,
                    help="a folder of the MNIST files, or 'digits' (default: full MNIST, "
                         f"{SHARED / 'mnist'}; --quick: mnist-mini, else digits)")
    ap.add_argument("--quick", action="store_true", help="mnist-mini (8,000 images): 1-2 minutes")
    ap.add_argument("--archs", default=DEFAULT_ARCHS, help=f"arch:epochs,... (default {DEFAULT_ARCHS})")
    ap.add_argument("--ns", default="1,2,4", help="concurrent runs per group (default 1,2,4)")
    ap.add_argument("--modes", default="auto,all-cores", help="auto, all-cores or both")
    ap.add_argument("--take", type=int, default=0, help="train on the first N images only (0: all)")
    ap.add_argument("--val", type=int, default=1000, help="validation images per epoch")
    ap.add_argument("--timeout-factor", type=float, default=3.0,
                    help="stop a group after this x (N x the N = 1 auto span) (default 3)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="file stem (default concurrency-cpu[-quick])")
    # the worker's own arguments (one run; started by main)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--arch", "--mode", "--data-file", "--ready", "--go", "--result"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    from mnistlab.config import TrainSettings, load_params
    from mnistlab.hparams import HParams
    from mnistlab.inference import native_bf16
    from mnistlab.training import steps_per_epoch
    from mnistlab.utils import write_json

    t_all = time.time()
    data = args.data or str(SHARED / "mnist")
    if args.quick and args.data is None:
        data = str(SHARED / "mnist-mini") if (SHARED / "mnist-mini").is_dir() else "digits"
    if data != "digits" and not Path(data).is_dir():
        sys.exit(f"{data}: no such folder (give --data a folder of the MNIST files, or --quick)")
    archs = parse_archs(args.archs)
    ns = [int(n) for n in args.ns.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"--modes: unknown {', '.join(bad)} (valid: {', '.join(MODES)})")
    params = load_params(args.params)
    settings = TrainSettings.from_params(params)
    groups: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mnistlab-concurrency-") as t:
        tmp = Path(t)
        data_file, info = prepare_data(data, args.take, args.val, tmp)
        print(f"data: {info['train_images']:,} training images from {data}", flush=True)
        for arch, epochs in archs:
            hp = HParams.from_params(params, arch)
            images = epochs * steps_per_epoch(info["train_images"], hp.batch_size) \
                * min(hp.batch_size, info["train_images"])
            one: float | None = None  # the N = 1 auto span: the yardstick for timeouts
            for mode in modes:
                for n in ns:
                    timeout = args.timeout_factor * n * one if one else 3600.0
                    timeout = max(timeout, 60.0)
                    g = run_group(arch, epochs, mode, n, images, data_file, args.params, tmp, timeout)
                    if n == 1 and mode == "auto" and not g["timed_out"]:
                        one = g["span_seconds"]
                    groups.append(g)
                    print(f"{arch} {mode} N={n}: threads "
                          f"{[r['threads'] for r in g['runs']]}, aggregate "
                          f"{'<= ' if g['timed_out'] else ''}"
                          f"{g['aggregate_images_per_second']:,.0f} img/s "
                          f"({g['span_seconds']:.1f} s)", flush=True)
    groups, ok = summarize(groups)
    cmd = "python benchmarks/concurrency.py" + ("" if argv is None and len(sys.argv) == 1
                                                else " " + " ".join(argv if argv is not None
                                                                    else sys.argv[1:]))
    result = {"cpu": cpu_info(), "data": info, "archs": archs, "ns": ns, "modes": modes,
              # bf16: what the runs did (the setting, and only where the CPU has native bf16)
              "settings": {"channels_last": settings.channels_last,
                           "bf16": settings.bf16 and native_bf16(torch.device("cpu")),
                           "deterministic": settings.deterministic},
              "target_ratio": TARGET, "pass": ok, "groups": groups, "command": cmd,
              "wall_seconds": time.time() - t_all}
    name = args.name or ("concurrency-cpu-quick" if args.quick else "concurrency-cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{name}.json", result)
    text = render(result)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

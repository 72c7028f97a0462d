"""``make reproduce``: the five tutorials at their exact settings on full data, against their published numbers.

::

    python -m mnistlab.ci.reproduce run      # copies + dvc repro there, then the report
    python -m mnistlab.ci.reproduce report   # the report from the copies' current results

Each ``(dataset, arch)`` of ``ci/reproduce.yaml``'s ``runs`` gets its own copy of the
working tree under ``workdir`` (as the CI gate does: :mod:`mnistlab.ci.copies`),
with params.yaml = the repo's params.yaml, the file's ``overrides`` merged over it,
``datasets: [dataset]`` and ``archs: [arch]``. Nothing of the user's params.yaml,
outputs or MLflow store is touched, and an unchanged tree reruns nothing. One copy per
run, rather than one per dataset, so that ``jobs`` copies keep every core busy until
the end (resnet_bn alone costs more than the four other MNIST tutorials together).

The report (``reports/reproduction.{md,json}``) gives, per run: the published accuracy
and how it was measured, ours on the same slice of the official test set (from the
evaluate stage's ``predictions.csv``, which is in test-file order) and on the full test
set, the delta, a verdict, the training time, images/s and the device. A tutorial is
*reproduced* when ``|ours - published| <= tolerance`` on the same slice; ``resnet_bn``
meets its *target* when its full-test-set accuracy is at least the target. The runs
under ``also`` (the remaining archs on each dataset, with nothing published to meet)
are trained the same way and reported without a verdict, so that the report covers the
whole pipeline over every arch on both datasets. Each copy runs its stages one by one,
timed (:func:`mnistlab.ci.copies.timed_repro`), and the report says where the time of
``dvc repro`` went. The command exits 1 when any run misses, after writing the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistlab.ci import copies
from mnistlab.config import get, load_params, positive, run_dir, seeds_of
from mnistlab.errors import MnistlabError, run_script
from mnistlab.utils import atomic_path, write_json

CONFIG = Path("ci/reproduce.yaml")
REPORT = Path("reports/reproduction")  # .md and .json


@dataclass(frozen=True)
class Run:
    """One reproduction: ``arch`` trained and evaluated on ``dataset`` in its own copy."""

    dataset: str
    arch: str

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.arch}"


def _pairs(path: Path, cfg: dict[str, Any], key: str, required: bool = False) -> list[list[str]]:
    """``cfg[key]``, checked to be a list of ``[dataset, arch]`` pairs (non-empty if ``required``)."""
    value = cfg.get(key, [])
    if not isinstance(value, list) or (required and not value) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in value):
        raise MnistlabError(f"{path}: {key} must list [dataset, arch] pairs")
    return value


def load_config(path: Path) -> dict[str, Any]:
    """``ci/reproduce.yaml``, checked: runs, published numbers and targets."""
    cfg = load_params(path, what="reproduction config", keys=None)
    runs, also = _pairs(path, cfg, "runs", required=True), _pairs(path, cfg, "also")
    for arch, pub in (cfg.get("published") or {}).items():
        for key in ("dataset", "accuracy", "how", "test_subset", "tolerance"):
            if key not in (pub or {}):
                raise MnistlabError(f"{path}: published.{arch}.{key} is missing")
        a, b = pub["test_subset"]
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b):
            raise MnistlabError(f"{path}: published.{arch}.test_subset must be [start, stop)")
    for r in runs:
        if r[1] not in (cfg.get("published") or {}) and r[0] not in (cfg.get("targets") or {}).get(r[1], {}):
            raise MnistlabError(f"{path}: run {r} has neither a published number nor a target")
    if dup := [r for i, r in enumerate(runs + also) if r in (runs + also)[:i]]:
        raise MnistlabError(f"{path}: run {dup[0]} is listed twice (runs and also together)")
    positive("jobs", cfg.get("jobs"), int)
    positive("threads", cfg.get("threads"), int)
    return cfg


def runs_of(cfg: dict[str, Any]) -> list[Run]:
    """Every run, in the order they start: ``runs`` (judged), then ``also`` (timed only)."""
    return [Run(ds, arch) for ds, arch in [*cfg["runs"], *cfg.get("also", [])]]


STAGE_KINDS = ("download", "split", "train", "evaluate", "features", "compare")


def stage_seconds(shard: Path) -> dict[str, float] | None:
    """Seconds per stage kind (``train@mnist-mlp-1234`` -> ``train``) from a copy's ``timings.json``."""
    path = shard / copies.TIMINGS
    if not path.is_file():
        return None
    t = _read_json(path)
    out = dict.fromkeys(STAGE_KINDS, 0.0)
    for row in t["stages"]:
        kind = row["stage"].split("@")[0]
        out[kind] = out.get(kind, 0.0) + row["seconds"]
    out["total"] = t["total_seconds"]
    return out


def prepare(root: Path, cfg: dict[str, Any], workdir: Path) -> list[Path]:
    """One synced copy per run under ``workdir``; returns their folders in run order."""
    params = copies.rebase_sources(copies.deep_merge(load_params(root / "params.yaml"), cfg.get("overrides") or {}),
                            root)
    outputs = [str(v) for v in (params.get("paths") or {}).values()]
    rel_work = str(workdir.resolve().relative_to(root.resolve())) \
        if workdir.resolve().is_relative_to(root.resolve()) else str(workdir)
    note = (f"# Generated by `python -m mnistlab.ci.reproduce`: {root / 'params.yaml'} with the\n"
            f"# overrides of {CONFIG} merged over it. Do not edit; edit those two instead.\n")
    shards = []
    for run in runs_of(cfg):
        shard = workdir / run.name
        copies.sync_tree(root, shard, [rel_work, "dvc.lock", "params.yaml", *outputs])
        copies.write_params(shard / "params.yaml", {**params, "datasets": [run.dataset], "archs": [run.arch]},
                     note)
        copies.write_no_scm(shard)
        shards.append(shard)
    return shards


def subset_accuracy(predictions: Path, start: int, stop: int) -> tuple[float, int]:
    """Accuracy over rows ``[start, stop)`` of an evaluate ``predictions.csv`` (test-file order)."""
    with predictions.open(newline="") as f:
        rows = list(csv.DictReader(f))[start:stop]
    if len(rows) != stop - start:
        raise MnistlabError(f"{predictions}: {len(rows)} test predictions in [{start}, {stop}); "
                            "the published slice needs the full official test set")
    return sum(r["actual"] == r["predicted"] for r in rows) / len(rows), len(rows)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MnistlabError(f"{path}: missing; run `make reproduce` (it trains this run)") from None
    except ValueError:
        raise MnistlabError(f"{path}: not valid JSON") from None


def _last_history_row(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))[-1]


def measure(cfg: dict[str, Any], workdir: Path, run: Run) -> dict[str, Any]:
    """One row of the report from a finished copy's outputs."""
    params = load_params(workdir / run.name / "params.yaml")
    # A copy is one run: its first (normally only) training seed.
    metrics = run_dir(workdir / run.name / str(get(params, "paths.metrics")), run.dataset, run.arch,
                      seeds_of(params)[0])
    train, test = _read_json(metrics / "train.json"), _read_json(metrics / "test.json")
    last = _last_history_row(metrics / "history.csv")
    row: dict[str, Any] = {
        "arch": run.arch, "dataset": run.dataset,
        "test_accuracy_full": test["test_accuracy"], "test_samples": test["test_samples"],
        "epochs": train["epochs"], "tutorial_epochs": get(params, f"hparams.{run.arch}.epochs"),
        "train_seconds": train["train_seconds"],
        "train_images_per_second": train["train_images_per_second"],
        "final_train_loss": float(last["train_loss"]), "final_train_accuracy": float(last["train_accuracy"]),
        "parameters": train["parameters"],
    }
    if (seconds := stage_seconds(workdir / run.name)) is not None:
        row["stage_seconds"] = seconds
    pub = (cfg.get("published") or {}).get(run.arch)
    if [run.dataset, run.arch] not in cfg["runs"]:
        row.update(kind="other", verdict="—")
    elif pub and pub["dataset"] == run.dataset:
        start, stop = pub["test_subset"]
        acc, n = subset_accuracy(metrics / "predictions.csv", start, stop)
        delta = acc - pub["accuracy"]
        row.update(kind="tutorial", published=pub["accuracy"], how=pub["how"],
                   test_subset=[start, stop], ours_same_subset=acc, subset_samples=n,
                   delta=delta, tolerance=pub["tolerance"],
                   verdict="reproduced" if abs(delta) <= pub["tolerance"] + 1e-12 else "MISSED")
    else:
        target = cfg["targets"][run.arch][run.dataset]
        row.update(kind="target", target=target, delta=test["test_accuracy"] - target,
                   verdict="target met" if test["test_accuracy"] >= target else "MISSED")
    notes = cfg.get("notes") or {}  # keyed by run name (mnist-resnet_bn) or by arch
    if (note := notes.get(run.name, notes.get(run.arch))) is not None:
        row["note"] = note
    return row


def device_description(threads: int) -> str:
    """The device the copies trained on, with the CPU features that decide conv speed."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags]
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model} ({', '.join(simd) or 'no AVX2'}), {threads} torch thread(s) per run"


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{100 * v:+.2f} pp" if signed else f"{100 * v:.2f} %"


def _timing_lines(rows: list[dict[str, Any]], jobs: int) -> list[str]:
    """Where ``dvc repro`` spent its time, per run and in all (rows with ``stage_seconds``)."""
    timed = [r for r in rows if "stage_seconds" in r]
    if not timed:
        return []
    lines = ["", "## Where the time of `dvc repro` goes", "",
             "Each copy ran its stages one by one (`dvc repro --single-item`, timed from outside: "
             "DVC's hashing and lock file, the stage process's imports and its work). "
             "`train (in loop)` is the training loop alone, from train.json; the rest of the train "
             "stage is start-up, data loading, the final checkpoint and the MLflow model logging.", "",
             "| dataset | arch | " + " | ".join(STAGE_KINDS) + " | total s | train (in loop) s |",
             "|---|---|" + "---:|" * (len(STAGE_KINDS) + 2)]
    sums = dict.fromkeys([*STAGE_KINDS, "total", "loop"], 0.0)
    for r in timed:
        sec = r["stage_seconds"]
        for k in STAGE_KINDS + ("total",):
            sums[k] += sec[k]
        sums["loop"] += r["train_seconds"]
        lines.append(f"| {r['dataset']} | {r['arch']} | "
                     + " | ".join(f"{sec[k]:.0f}" for k in STAGE_KINDS)
                     + f" | {sec['total']:.0f} | {r['train_seconds']:.0f} |")
    lines.append("| **all** | | " + " | ".join(f"**{sums[k]:.0f}**" for k in STAGE_KINDS)
                 + f" | **{sums['total']:.0f}** | **{sums['loop']:.0f}** |")
    share = sums["loop"] / sums["total"] if sums["total"] else 0.0
    lines += ["", f"{len(timed)} runs, {sums['total'] / 60:.1f} min of stage time in all "
              f"({jobs} at a time, so about {sums['total'] / 60 / jobs:.1f} min of wall time); "
              f"{100 * share:.0f} % of it inside the training loops. Download and split run once "
              "per copy here; one `dvc repro` over all archs runs them once per dataset."]
    return lines


def render(rows: list[dict[str, Any]], device: str, jobs: int) -> str:
    """The Markdown report: the judged runs, the other runs, and where the time went."""
    lines = [
        "# Reproduction: the five tutorials at their exact settings, and resnet_bn",
        "",
        f"Device: {device}; {jobs} runs side by side. Produced by `make reproduce` "
        "(`python -m mnistlab.ci.reproduce run`); regenerate, never edit.",
        "",
        "| arch | dataset | published (how measured) | ours, same test images | ours, full test set "
        "| delta | verdict | epochs | train s | images/s |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    judged = [r for r in rows if r["kind"] != "other"]
    for r in judged:
        if r["kind"] == "tutorial":
            a, b = r["test_subset"]
            pub = f"{_pct(r['published'])} ({r['how']}; test images {a}–{b - 1})"
            same = _pct(r["ours_same_subset"])
            verdict = f"{r['verdict']} (±{_pct(r['tolerance'])[:-2]}pp)"
        else:
            pub = f"target ≥ {_pct(r['target'])} (ours)"
            same = "—"
            verdict = r["verdict"]
        if r.get("note"):
            verdict += f" — {r['note']}"
        lines.append(
            f"| {r['arch']} | {r['dataset']} | {pub} | {same} | {_pct(r['test_accuracy_full'])} | "
            f"{_pct(r['delta'], signed=True)} | {verdict} | {r['epochs']} | "
            f"{r['train_seconds']:.0f} | {r['train_images_per_second']:.0f} |")
    missed = [r for r in judged if r["verdict"] == "MISSED"]
    lines += ["", "Delta: ours minus published on the same test images (tutorials), or ours on "
              "the full test set minus the target (resnet_bn). Training uses 54,000 images: the "
              "pipeline holds out a stratified 10 % of the official training set for validation.",
              "", f"**{len(judged) - len(missed)} of {len(judged)} met.**"
              + "".join(f"\n- MISSED: {r['dataset']}/{r['arch']}" for r in missed)]
    others = [r for r in rows if r["kind"] == "other"]
    if others:
        lines += ["", "## The other archs on each dataset (nothing published to compare with)", "",
                  "| arch | dataset | full test set | epochs | train s | images/s |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['arch']} | {r['dataset']} | {_pct(r['test_accuracy_full'])} | {r['epochs']} | "
                  f"{r['train_seconds']:.0f} | {r['train_images_per_second']:.0f} |" for r in others]
    lines += _timing_lines(rows, jobs)
    return "\n".join(lines) + "\n"


def report(root: Path, cfg: dict[str, Any], workdir: Path) -> tuple[bool, list[dict[str, Any]]]:
    """Write ``reports/reproduction.{md,json}``; return (all met, rows)."""
    rows = [measure(cfg, workdir, run) for run in runs_of(cfg)]
    threads = positive("threads", cfg["threads"], int)
    device = device_description(threads)
    text = render(rows, device, cfg["jobs"])
    out = root / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    write_json(out.with_suffix(".json"), {"device": device, "jobs": cfg["jobs"], "rows": rows})
    print(text, end="")
    return all(r["verdict"] != "MISSED" for r in rows), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnistlab.ci.reproduce",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("run", "report"),
                    help="run: copies + dvc repro + report; report: the report alone")
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--config", type=Path, default=None, help=f"default: {CONFIG}")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    cfg = load_config(args.config or root / CONFIG)
    workdir = root / str(cfg.get("workdir", "build/reproduce"))
    if args.command == "run":
        shards = prepare(root, cfg, workdir)
        copies.run_shards(shards, cfg["jobs"], cfg["threads"], "the reproduction", timed=True)
    ok, _ = report(root, cfg, workdir)
    if not ok:
        print("error: a reproduction missed its published number or target (see the table above)",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    run_script(main)

"""Pipeline overheads, measured: no-op ``dvc repro``, stage start-up, MLflow logging share.

Run after a complete ``make run`` (so there is a pipeline to be a no-op on and
per-epoch timings in ``metrics/*/*/history.csv``):

    python benchmarks/overheads.py

Writes ``benchmarks/results/overheads.json`` and ``.md``.

- no-op repro: wall time of ``dvc repro`` when nothing changed (median of 3).
- start-up: wall time of ``python stages/<stage>.py --help`` — the imports a
  stage pays before doing any work (median of 3).
- MLflow: each train stage records in ``train.json`` the seconds it spent
  sending per-epoch metrics (``tracking_seconds``; rows are batched so that this
  stays under 2 % of the time, see ``experiment.EpochLogger``); its share of the
  stage's epoch time is reported per (dataset, arch). The cost of one request
  is also timed here against a fresh store of the same kind.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["download", "split", "train", "evaluate", "features", "compare"]


def wall(cmd: list[str], repeat: int = 3, **kw) -> float:
    times = []
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, **kw)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def mlflow_call_seconds(n: int = 30) -> float:
    """Median seconds of one per-epoch ``log_metrics`` call (7 metrics) on a fresh sqlite store."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        from mnistlab import tracking

        run_id = tracking.start_run("bench", "bench", 0, {"a": 1}, {})
        row = {"train_loss": 0.1, "train_accuracy": 0.9, "val_loss": 0.1, "val_accuracy": 0.9,
               "lr": 0.1, "epoch_seconds": 1.0, "train_seconds": 0.9}
        times = []
        for epoch in range(1, n + 1):
            t = time.perf_counter()
            tracking.log_metrics(run_id, row, step=epoch)
            times.append(time.perf_counter() - t)
        tracking.set_terminated(run_id)
        del os.environ["MLFLOW_TRACKING_URI"]
    return statistics.median(times)


def main() -> None:
    from mnistlab.utils import write_json

    noop = wall([str(BIN / "dvc"), "repro"])
    startup = {s: wall([str(BIN / "python"), f"stages/{s}.py", "--help"])
               for s in STAGES if (ROOT / "stages" / f"{s}.py").is_file()}
    per_call = mlflow_call_seconds()
    shares = {}
    for hist in sorted((ROOT / "metrics").glob("*/*/history.csv")):
        with open(hist) as f:
            epoch_s = sum(float(r["epoch_seconds"]) for r in csv.DictReader(f))
        logged = json.loads((hist.parent / "train.json").read_text()).get("tracking_seconds")
        if logged is not None:
            shares[f"{hist.parent.parent.name}/{hist.parent.name}"] = logged / (epoch_s + logged)
    result = {"noop_repro_seconds": noop, "stage_startup_seconds": startup,
              "mlflow_log_call_seconds": per_call, "mlflow_share_of_epoch": shares,
              "mlflow_share_max": max(shares.values()) if shares else None}
    out = ROOT / "benchmarks" / "results"
    write_json(out / "overheads.json", result)
    lines = ["| measure | value | target |", "|---|---:|---|",
             f"| no-op `dvc repro` | {noop:.2f} s | < 2 s |"]
    lines += [f"| start-up `stages/{s}.py` | {t:.2f} s | |" for s, t in startup.items()]
    lines.append(f"| one per-epoch MLflow `log_batch` | {per_call * 1000:.1f} ms | |")
    if shares:
        worst = max(shares, key=shares.get)
        lines.append(f"| MLflow per-epoch logging, share of training, worst ({worst}) "
                     f"| {shares[worst]:.2%} | < 2 % |")
        lines.append(f"| MLflow per-epoch logging, share of training, median "
                     f"| {statistics.median(shares.values()):.2%} | < 2 % |")
    (out / "overheads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

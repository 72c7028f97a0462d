"""Pipeline time of ``make run`` on a fresh clone: the digits quickstart, every arch (issue #15).

    python benchmarks/quickstart.py                 # parallel (make run), then one stage at a time
    python benchmarks/quickstart.py --modes parallel --repeats 2

For each mode, a fresh ``git clone`` of this repository's HEAD at ``build/quickstart/<mode>-<i>/``
(so nothing of the working tree's outputs, DVC cache or mlflow.db is reused; ``.venv`` is a
link to this one, set up already: setup is timed apart, by ``make setup``), then what ``make run``
runs there, timed from outside:

- ``parallel``: ``python -m mnistlab.repro`` (the chains on one worker per core, then compare);
- ``serial``: ``python -m mnistlab.repro --jobs 1``, i.e. plain ``dvc repro``.

Target (issue #15): the whole digits pipeline in <= 5 min on the 2-core CPU. Also recorded,
so that a fast run cannot hide a broken one: each arch's test accuracy (none at chance, 10 %)
and whether ``dvc status`` is clean afterwards. Run it on a quiet machine: every core is used.
Writes ``benchmarks/results/quickstart-cpu.{json,md}`` (``--name`` for another machine's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchlib import cpu

from mnistlab import repro
from mnistlab.config import load_params, run_dir
from mnistlab.threads import usable_cores
from mnistlab.utils import write_json

ROOT = Path(__file__).resolve().parents[1]
MODES = {"parallel": [], "serial": ["--jobs", "1"]}
TARGET_S = 300.0


def fresh_clone(dest: Path) -> Path:
    """``git clone`` of HEAD at ``dest`` with ``.venv`` linked to this repo's (replacing ``dest``)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def run_once(work: Path, mode: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for var in ("OMP_NUM_THREADS", "MNISTLAB_THREADS", "MLFLOW_TRACKING_URI"):  # as on a fresh shell
        env.pop(var, None)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mnistlab.repro", *MODES[mode]], cwd=work, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / "repro.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{mode}: exit {p.returncode}; see {work / 'repro.log'}")
    status = subprocess.run([repro.dvc(), "status", "--json"],
                            cwd=work, env=env, capture_output=True, text=True)
    params = load_params(work / "params.yaml", keys=None)
    accuracy, threads = {}, {}
    for arch in params["archs"]:
        m = run_dir(work / "metrics", "digits", arch, params["seeds"][0])
        accuracy[arch] = json.loads((m / "test.json").read_text())["test_accuracy"]
        threads[arch] = json.loads((m / "train.json").read_text()).get("threads")
    return {"mode": mode, "wall_seconds": round(wall, 1), "test_accuracy": accuracy,
            "threads": threads, "dvc_status_clean": status.returncode == 0 and json.loads(status.stdout or "{}") == {},
            "chain_lines": [line for line in p.stdout.splitlines() if line.startswith("[")]}


def markdown(result: dict) -> str:
    model, flags = result["cpu"]
    lines = [
        "# `make run` on a fresh clone: the digits quickstart, every arch",
        "",
        f"{result['date']}, CPU {model} ({' '.join(flags)}; {result['cores']} usable cores), "
        f"torch threads per stage as each mode chose them; `.venv` set up beforehand. "
        f"Produced by `{result.get('command', 'python benchmarks/quickstart.py')}`; regenerate, never edit.",
        "",
        f"Target: <= {TARGET_S:.0f} s of pipeline time.",
        "",
        "| run | mode | wall s | target | dvc status clean | threads per train stage | "
        + " | ".join(result["runs"][0]["test_accuracy"]) + " |",
        "|---|---|---:|---|---|---|" + "---:|" * len(result["runs"][0]["test_accuracy"]),
    ]
    for i, r in enumerate(result["runs"], 1):
        lines.append(
            f"| {i} | {r['mode']} | {r['wall_seconds']:.1f} | "
            f"{'met' if r['wall_seconds'] <= TARGET_S else 'NOT met'} | {'yes' if r['dvc_status_clean'] else 'NO'} | "
            f"{', '.join(sorted({str(t) for t in r['threads'].values()}))} | "
            + " | ".join(f"{a:.2%}" for a in r["test_accuracy"].values()) + " |")
    for i, r in enumerate(result["runs"], 1):
        if r["chain_lines"]:
            lines += ["", f"Run {i} ({r['mode']}), as `make run` printed it:", "", "```",
                      *r["chain_lines"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="parallel,serial", help="comma-separated: parallel, serial")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "quickstart")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    # CPUs differ between machines (AVX2 only, or AVX512-BF16: 3-4x apart on convolutions), so a
    # second machine's results go beside the first's, not over them
    ap.add_argument("--name", default="quickstart-cpu", help="result files: OUT/NAME.{json,md}")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")

    runs = []
    for i in range(args.repeats):
        for mode in modes:
            work = fresh_clone(args.workdir / f"{mode}-{i + 1}")
            runs.append(run_once(work, mode))
            print(f"{mode} run {i + 1}: {runs[-1]['wall_seconds']} s", flush=True)
    result = {"date": date.today().isoformat(), "cpu": cpu(), "cores": usable_cores(),
              "python": platform.python_version(), "commit": subprocess.run(
                  ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
              "target_seconds": TARGET_S, "runs": runs,
              "command": " ".join(["python benchmarks/quickstart.py", *sys.argv[1:]])}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", result)
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["wall_seconds"] <= TARGET_S and r["dvc_status_clean"] for r in runs
                    if r["mode"] == "parallel") else 1


if __name__ == "__main__":
    sys.exit(main())

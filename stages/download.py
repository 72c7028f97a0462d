"""Stage download@{dataset}: fetch, verify and validate a dataset's raw IDX files.

    python stages/download.py --dataset mnist --out data/raw/mnist

Reads params: sources.<dataset>, download.
"""

import argparse
from pathlib import Path

from mnistlab import data
from mnistlab.config import load_params
from mnistlab.errors import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    params = load_params(args.params)
    source = data.resolve_source(params, args.dataset)
    counts = data.fetch(source, args.out, data.DownloadSettings.from_params(params))
    print(f"{args.dataset}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" samples verified in {args.out}")


if __name__ == "__main__":
    run_stage(main)

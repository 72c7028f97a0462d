"""Stage download@{dataset}: fetch, verify and validate a dataset's raw IDX files.

    python stages/download.py --dataset mnist --out data/raw/mnist

Reads params: sources.<dataset>, download.
"""

import argparse
from pathlib import Path

from mnistlab.config import DownloadSettings, load_params
from mnistlab.data.download import fetch, unverified
from mnistlab.data.sources import resolve_source
from mnistlab.errors import run_script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    params = load_params(args.params)
    source = resolve_source(params, args.dataset)
    counts = fetch(source, args.out, DownloadSettings.from_params(params))
    loose = unverified(args.out)
    print(f"{args.dataset}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + (f" samples in {args.out}, NOT verified ({len(loose)} of its files have no digest "
             f"in {args.params})" if loose else f" samples verified in {args.out}"))


if __name__ == "__main__":
    run_script(main)

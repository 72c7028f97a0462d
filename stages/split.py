"""Stage split@{dataset}: stratified train/val(/test) split into tensor files.

    python stages/split.py --dataset digits --raw data/raw/digits --out data/split/digits

Reads params: seed, split, sources.<dataset> (for the class names).
"""

import argparse
from pathlib import Path

from mnistlab.config import load_params, seed_of
from mnistlab.data.sources import resolve_source
from mnistlab.data.split import split, split_settings
from mnistlab.errors import run_script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--raw", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    params = load_params(args.params)
    source = resolve_source(params, args.dataset)
    val, test = split_settings(params)
    summary = split(args.raw, args.out, list(source.classes), val, test, seed_of(params), args.dataset)
    print(f"{args.dataset}: " + ", ".join(f"{s} {summary[s]['count']}" for s in ("train", "val", "test"))
          + f" ({summary['test_source']} test set) in {args.out}")


if __name__ == "__main__":
    run_script(main)

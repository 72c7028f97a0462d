"""Stage evaluate@{dataset}-{arch}: test metrics, confusion data and misclassified images.

    python stages/evaluate.py --dataset digits --arch mlp --split data/split/digits \
        --model-dir models/digits/mlp --metrics-dir metrics/digits/mlp \
        --reports reports/digits/mlp/evaluate
"""

import argparse
import json
from pathlib import Path

from mnistlab.config import load_params
from mnistlab.errors import run_stage
from mnistlab.evaluation import EvalPaths, run_evaluation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--split", required=True, type=Path)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--metrics-dir", required=True, type=Path)
    ap.add_argument("--reports", required=True, type=Path)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    paths = EvalPaths(args.split, args.model_dir, args.metrics_dir, args.reports)
    metrics = run_evaluation(load_params(args.params), args.dataset, args.arch, paths)
    print(json.dumps({"dataset": args.dataset, "arch": args.arch, **metrics}))


if __name__ == "__main__":
    run_stage(main)

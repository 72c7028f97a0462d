"""Stage features@{dataset}-{arch}: kernels, feature maps and embeddings of a trained model.

    python stages/features.py --dataset digits --arch mlp --split data/split/digits \
        --model-dir models/digits/mlp --out features/digits/mlp \
        --reports reports/digits/mlp/features
"""

import argparse
import json
from pathlib import Path

from mnistlab.config import load_params
from mnistlab.errors import run_stage
from mnistlab.features import FeaturePaths, run_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--split", required=True, type=Path)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--reports", required=True, type=Path)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    paths = FeaturePaths(args.split, args.model_dir, args.out, args.reports)
    summary = run_features(load_params(args.params), args.dataset, args.arch, paths)
    print(json.dumps({"dataset": args.dataset, "arch": args.arch, **summary}))


if __name__ == "__main__":
    run_stage(main)

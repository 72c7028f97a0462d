"""Stage compare: leaderboard over every dataset x arch, validation curves, champion per dataset.

    python stages/compare.py --metrics metrics --models models --out reports \
        --curves reports/curves
"""

import argparse
from pathlib import Path

from mnistlab.compare import ComparePaths, run_compare, to_markdown
from mnistlab.config import load_params
from mnistlab.errors import run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--metrics", required=True, type=Path)
    ap.add_argument("--models", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--curves", required=True, type=Path)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    board = run_compare(load_params(args.params),
                        ComparePaths(args.metrics, args.models, args.out, args.curves))
    # The last thing `make run` prints: the leaderboard itself.
    print(to_markdown(board), end="")


if __name__ == "__main__":
    run_stage(main)

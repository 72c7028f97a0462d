"""Stage compare: leaderboard over every dataset x arch, validation curves, champion per dataset.

    python stages/compare.py --metrics metrics --models models --out reports \
        --curves reports/curves --split data/split --exports exports \
        --pairwise reports/pairwise
"""

from mnistlab.stages import cli
from mnistlab.stages.compare import ComparePaths, report

if __name__ == "__main__":
    # The last thing `make run` prints: the leaderboard, then where to look next.
    cli(report, ComparePaths, __doc__, items=(), show=str)

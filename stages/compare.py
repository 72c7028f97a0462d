"""Stage compare: leaderboard over every dataset x arch, validation curves, champion per dataset.

    python stages/compare.py --metrics metrics --models models --out reports \
        --curves reports/curves --split data/split --exports exports \
        --pairwise reports/pairwise
"""

from mnistlab.stages import cli
from mnistlab.stages.compare import ComparePaths, run_compare, to_markdown

if __name__ == "__main__":
    # The last thing `make run` prints: the leaderboard itself.
    cli(run_compare, ComparePaths, __doc__, items=(), show=to_markdown)

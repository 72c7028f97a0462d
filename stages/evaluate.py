"""Stage evaluate@{dataset}-{arch}: test metrics, confusion data and misclassified images.

    python stages/evaluate.py --dataset digits --arch mlp --split data/split/digits \
        --model-dir models/digits/mlp --metrics-dir metrics/digits/mlp \
        --reports reports/digits/mlp/evaluate
"""

from mnistlab.stages import cli
from mnistlab.stages.evaluate import EvalPaths, run_evaluation

if __name__ == "__main__":
    cli(run_evaluation, EvalPaths, __doc__)

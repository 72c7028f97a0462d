"""Stage evaluate@{dataset}-{arch}-{seed}: test metrics, confusion data, misclassified images, embeddings.

    python stages/evaluate.py --dataset digits --arch mlp --seed 1234 --split data/split/digits \
        --model-dir models/digits/mlp/seed-1234 --metrics-dir metrics/digits/mlp/seed-1234 \
        --reports reports/digits/mlp/seed-1234/evaluate --features features/digits/mlp/seed-1234
"""

from mnistlab.stages import cli
from mnistlab.stages.evaluate import EvalPaths, run_evaluation

if __name__ == "__main__":
    cli(run_evaluation, EvalPaths, __doc__)

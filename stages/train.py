"""Stage train@{dataset}-{arch}-{seed}: train one architecture on one dataset with one seed, tracked in MLflow.

    python stages/train.py --dataset digits --arch mlp --seed 1234 --split data/split/digits \
        --model-dir models/digits/mlp/seed-1234 --metrics-dir metrics/digits/mlp/seed-1234 \
        --checkpoint checkpoints/digits/mlp/seed-1234/last.pt
"""

from mnistlab.stages import cli
from mnistlab.stages.train import TrainPaths, train

if __name__ == "__main__":
    cli(train, TrainPaths, __doc__)

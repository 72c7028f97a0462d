"""Stage train@{dataset}-{arch}: train one architecture on one dataset, tracked in MLflow.

    python stages/train.py --dataset digits --arch mlp --split data/split/digits \
        --model-dir models/digits/mlp --metrics-dir metrics/digits/mlp \
        --checkpoint checkpoints/digits/mlp/last.pt
"""

from mnistlab.stages import cli
from mnistlab.stages.train import TrainPaths, train

if __name__ == "__main__":
    cli(train, TrainPaths, __doc__)

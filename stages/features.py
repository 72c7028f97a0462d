"""Stage features@{dataset}-{arch}-{seed}: kernels, feature maps, and 2-D maps of evaluate's embeddings.

    python stages/features.py --dataset digits --arch mlp --seed 1234 --split data/split/digits \
        --model-dir models/digits/mlp/seed-1234 --features features/digits/mlp/seed-1234 \
        --reports reports/digits/mlp/seed-1234/features
"""

from mnistlab.stages import cli
from mnistlab.stages.features import FeaturePaths, run_features

if __name__ == "__main__":
    cli(run_features, FeaturePaths, __doc__)

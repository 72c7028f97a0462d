"""Stage features@{dataset}-{arch}: kernels, feature maps, embeddings and their 2-D maps.

    python stages/features.py --dataset digits --arch mlp --split data/split/digits \
        --model-dir models/digits/mlp --out features/digits/mlp \
        --reports reports/digits/mlp/features
"""

from mnistlab.stages import cli
from mnistlab.stages.features import FeaturePaths, run_features

if __name__ == "__main__":
    cli(run_features, FeaturePaths, __doc__)

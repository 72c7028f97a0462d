"""mnistlab: reproducible training and comparison of small classifiers on the MNIST family."""

from mnistlab.errors import MnistlabError

__all__ = ["MnistlabError"]
__version__ = "0.1.0"

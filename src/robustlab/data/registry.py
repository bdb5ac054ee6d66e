"""The data-set registry and its front door, ``load_dataset``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from robustlab.data.base import ImageDataset
from robustlab.errors import DataError
from robustlab.registry import Registry, check_kwargs

#: name -> builder ``fn(split, root, **options) -> ImageDataset``
DATASETS: Registry[Callable[..., ImageDataset]] = Registry("dataset")

SPLITS = ("train", "test")


def load_dataset(
    name: str, split: str = "train", root: str | None = None, **options: Any
) -> ImageDataset:
    """Load a registered data set into memory.

    Args:
        name: a name from ``robustlab list datasets`` (``mnist5k``, ``cifar10``, ...).
        split: ``"train"`` or ``"test"``.
        root: file or directory for data sets read from disk; built-in ones ignore it.
        **options: builder-specific options (``synthetic``: ``size``, ``channels``, ...).

    Example:
        >>> train = load_dataset("synthetic", "train", size=16, num_classes=4)
        >>> train.x.shape[1:]
        torch.Size([1, 16, 16])
    """
    builder = DATASETS.get(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    check_kwargs(builder, options, f"dataset {name!r}")
    return builder(split=split, root=root, **options)

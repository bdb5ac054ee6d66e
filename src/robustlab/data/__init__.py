"""Data: built-in sets, file formats and an on-device batch loader.

Every data set loads into an :class:`ImageDataset` held in memory; the
:class:`BatchLoader` keeps it on the target device and augments whole batches.
"""

from robustlab.data import builtin, formats  # noqa: F401  (register the data sets)
from robustlab.data.base import ImageDataset, channel_stats, to_float
from robustlab.data.formats import read_idx
from robustlab.data.loader import BatchLoader, augment_batch
from robustlab.data.registry import DATASETS, load_dataset
from robustlab.data.safe_pickle import RestrictedUnpickler, safe_load

__all__ = [
    "DATASETS",
    "BatchLoader",
    "ImageDataset",
    "RestrictedUnpickler",
    "augment_batch",
    "channel_stats",
    "load_dataset",
    "read_idx",
    "safe_load",
    "to_float",
]

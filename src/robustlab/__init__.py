"""robustlab: adversarial robustness for PyTorch — attack, train, certify, evaluate.

The curated public API::

    import robustlab as rl
    model = rl.create_model("small_cnn", num_classes=10, in_channels=1, input_size=28)
    data = rl.load_dataset("mnist5k", "test")
    rl.clean_accuracy(rl.load("runs/demo-mnist"), data)
"""

from __future__ import annotations

__version__ = "0.1.0"

from robustlab import data, evaluate, models, nn, train
from robustlab.config import TrainConfig, load_config
from robustlab.data import ImageDataset, load_dataset
from robustlab.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    RobustlabError,
    UnknownNameError,
)
from robustlab.evaluate import clean_accuracy
from robustlab.io import load
from robustlab.models import Normalize, create_model
from robustlab.train import Recipe, Trainer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ImageDataset",
    "Normalize",
    "Recipe",
    "RobustlabError",
    "TrainConfig",
    "Trainer",
    "UnknownNameError",
    "__version__",
    "clean_accuracy",
    "create_model",
    "data",
    "evaluate",
    "load",
    "load_config",
    "load_dataset",
    "models",
    "nn",
    "train",
]

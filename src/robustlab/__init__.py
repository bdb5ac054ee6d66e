"""robustlab: adversarial robustness for PyTorch — attack, train, certify, evaluate.

The curated public API::

    import robustlab as rl
    model = rl.load("runs/demo-mnist")
    test = rl.load_dataset("mnist5k", "test")
    x_adv = rl.attacks.PGD(model, eps=0.1, steps=40)(test.float_images()[:64], test.y[:64])
    report = rl.evaluate(model, test, attacks=["standard"], eps=[0.1, 0.2], n=500)
"""

from __future__ import annotations

__version__ = "0.1.0"

from robustlab import attacks, certify, data, models, nn, train
from robustlab.config import TrainConfig, load_config
from robustlab.data import ImageDataset, load_dataset
from robustlab.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    RobustlabError,
    UnknownNameError,
)
from robustlab.evaluate import clean_accuracy, evaluate
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
    "attacks",
    "certify",
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

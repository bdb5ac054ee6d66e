"""Training: a method-agnostic trainer and the recipes (methods) it runs."""

from robustlab.train.distributed import DistContext, init_distributed
from robustlab.train.optim import build_optimizer, lr_at
from robustlab.train.recipes import RECIPES, Recipe, create_recipe
from robustlab.train.trainer import Trainer, seed_everything, train

__all__ = [
    "RECIPES",
    "DistContext",
    "Recipe",
    "Trainer",
    "build_optimizer",
    "create_recipe",
    "init_distributed",
    "lr_at",
    "seed_everything",
    "train",
]

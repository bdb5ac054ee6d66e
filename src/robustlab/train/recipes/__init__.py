"""Training methods, one per file, each registered by name in ``RECIPES``."""

from robustlab.train.recipes import (  # noqa: F401  (register)
    advprop,
    ard,
    defensive,
    distill,
    fast,
    fgsm,
    hints,
    lmt,
    nfgsm,
    pgd,
    rslad,
    standard,
    trades,
)
from robustlab.train.recipes.base import RECIPES, AdversarialRecipe, Recipe, create_recipe

__all__ = ["RECIPES", "AdversarialRecipe", "Recipe", "create_recipe"]

"""Training methods, one per file, each registered by name in ``RECIPES``."""

from robustlab.train.recipes import pgd, standard  # noqa: F401  (register)
from robustlab.train.recipes.base import RECIPES, Recipe, create_recipe

__all__ = ["RECIPES", "Recipe", "create_recipe"]

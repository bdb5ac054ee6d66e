"""Standard (non-robust) training: cross-entropy on clean inputs."""

from __future__ import annotations

import torch
from torch import nn

from robustlab.train.recipes.base import RECIPES, Recipe


@RECIPES.register("standard")
class Standard(Recipe):
    """Empirical risk minimisation: cross-entropy on clean inputs (the baseline)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x)
        return {"loss": self.cross_entropy(logits, y), "logits": logits}

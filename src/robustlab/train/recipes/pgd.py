"""PGD adversarial training (Madry, Makelov, Schmidt, Tsipras & Vladu, ICLR 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, AdversarialRecipe


@RECIPES.register("pgd")
class PGDTraining(AdversarialRecipe):
    """Train on the PGD adversarial example of every batch: min E[max_{||d|| <= eps} CE(x + d)].

    Each step runs PGD (``steps`` iterations of ``step_size`` from a uniform random start)
    on the model in eval mode (batch norm frozen, as in the SAT paper's attacker), then
    minimises the cross-entropy of the adversarial batch.

    Args:
        eps, norm, eps_ramp_epochs: see :class:`AdversarialRecipe`.
        steps: PGD iterations (MNIST: 40, CIFAR-10: 7 in the paper).
        step_size: at the full eps; default ``2.5 * eps / steps``. Scaled with eps
            during the ramp.
        **common: :class:`~robustlab.train.recipes.base.Recipe` options (SAT, label smoothing).

    Logged ``train_acc`` is the accuracy on the adversarial training batches.
    Cost per step: ``steps`` forward+input-backward passes, then one training pass.
    """

    def __init__(self, *, steps: int = 10, step_size: float | None = None, **common: Any) -> None:
        super().__init__(**common)
        if steps < 1:
            raise ConfigError(f"pgd recipe: steps must be >= 1, got {steps}")
        self.steps = steps
        self.step_size = 2.5 * self.eps / steps if step_size is None else float(step_size)
        if step_size is not None and not float(step_size) > 0:
            raise ConfigError(f"pgd recipe: step_size must be > 0, got {step_size}")

    def make_adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.pgd_example(model, x, y, steps=self.steps, step_size=self.step_size)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x_adv = self.make_adversarial(model, x, y)
        return self.train_on(model, x_adv, y)


@RECIPES.register("sat")
class SmoothAdversarialTraining(PGDTraining):
    """Smooth Adversarial Training (Xie, Tan, Gong, Yuille & Le, 2020): PGD training with
    every ReLU swapped for a smooth activation (default ``parametric_softplus``, alpha 10).

    Only the default differs from ``pgd``: SAT is the ``activation`` option that every
    recipe has (``fast``, ``trades``, ``advprop``... take it too).
    """

    def __init__(self, *, activation: str = "parametric_softplus", **options: Any) -> None:
        super().__init__(activation=activation, **options)

"""FGSM adversarial training (Goodfellow, Shlens & Szegedy, ICLR 2015)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.attacks import FGSM
from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, TRAINING_PRECISION, AdversarialRecipe


@RECIPES.register("fgsm")
class FGSMTraining(AdversarialRecipe):
    """Loss ``a * CE(x) + (1 - a) * CE(x + eps * sign(grad_x CE(x)))`` with ``a = 0.5``.

    The FGSM example is made from the clean point (no random start), as in the paper;
    clean and adversarial halves go through the network in one pass.

    Args:
        eps, norm, eps_ramp_epochs: see :class:`AdversarialRecipe`.
        clean_weight: ``a`` (0.5 in the paper).
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.
    """

    def __init__(self, *, clean_weight: float = 0.5, **common: Any) -> None:
        super().__init__(**common)
        if not 0 <= clean_weight <= 1:
            raise ConfigError(f"fgsm recipe: clean_weight must be in [0, 1], got {clean_weight}")
        self.clean_weight = clean_weight

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = self.current_eps()
        with self.attacking(model):
            fgsm = FGSM(self.unwrap(model), eps=eps, norm=self.norm, precision=TRAINING_PRECISION)
            x_adv = fgsm(x, y) if eps > 0 else x
        b = x.shape[0]
        with self.optimizing(model):
            logits = model(torch.cat([x, x_adv]))
            clean, adv = logits[:b], logits[b:]
            a = self.clean_weight
            loss = a * self.cross_entropy(clean, y) + (1 - a) * self.cross_entropy(adv, y)
        return {
            "loss": loss,
            "logits": adv,
            "clean_acc": (clean.argmax(1) == y).float().mean(),
            "eps": torch.tensor(eps),
        }

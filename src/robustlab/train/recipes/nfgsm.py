"""N-FGSM single-step adversarial training (de Jorge et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.attacks import FGSM
from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, TRAINING_PRECISION, AdversarialRecipe


@RECIPES.register("nfgsm")
class NFGSMTraining(AdversarialRecipe):
    """N-FGSM (de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez & Dokania, NeurIPS 2022).

    Stronger noise and no projection: ``x_n = x + U(-k eps, k eps)``,
    ``x_adv = x_n + alpha sign(grad CE(x_n))`` clipped to [0, 1] only, with ``k = 2``
    and ``alpha = eps`` (the paper's defaults). The training point may lie up to
    ``(k + 1) eps`` from ``x``: that is the method, which avoids catastrophic
    overfitting at single-step cost without a guard.

    Args:
        eps, eps_ramp_epochs: see :class:`AdversarialRecipe` (L-inf only).
        noise: ``k``.
        step_size: alpha at the full eps (default ``eps``).
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.
    """

    def __init__(
        self, *, noise: float = 2.0, step_size: float | None = None, **common: Any
    ) -> None:
        super().__init__(**common)
        if self.norm != "linf" or noise < 0:
            raise ConfigError("nfgsm recipe: L-inf only, with noise >= 0")
        self.noise = float(noise)
        self.step_size = self.eps if step_size is None else float(step_size)
        if step_size is not None and not float(step_size) > 0:
            raise ConfigError(f"nfgsm recipe: step_size must be > 0, got {step_size}")

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = self.current_eps()
        if eps > 0:
            k_eps = self.noise * eps
            x_noise = (x + (torch.rand_like(x) * 2 - 1) * k_eps).clamp(0, 1)
            # FGSM from the noisy point; its eps is the step and only [0, 1] clips it
            attack = FGSM(self.unwrap(model), eps=self.step_size * self.ramp(), norm="linf",
                          precision=TRAINING_PRECISION)  # fmt: skip
            with self.attacking(model):
                x = attack(x_noise, y)
        return self.train_on(model, x, y)

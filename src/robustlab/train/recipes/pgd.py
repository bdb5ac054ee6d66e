"""PGD adversarial training (Madry, Makelov, Schmidt, Tsipras & Vladu, ICLR 2018)."""

from __future__ import annotations

import torch
from torch import nn

from robustlab.attacks import PGD
from robustlab.train.recipes.base import RECIPES, Recipe


@RECIPES.register("pgd")
class PGDTraining(Recipe):
    """Train on the PGD adversarial example of every batch: min E[max_{||d|| <= eps} CE(x + d)].

    Each step runs PGD (``steps`` iterations of ``step_size`` from a uniform random start)
    on the model in eval mode, then minimises the cross-entropy of the adversarial batch.
    ``eps_ramp_epochs`` grows eps linearly from 0 over the first epochs: without it a
    small MNIST network can stay at chance for several epochs (measured in issue 4's
    calibration).

    Args:
        eps: budget in pixel units (MNIST: 0.3, CIFAR-10: 8/255 in the paper).
        steps: PGD iterations (MNIST: 40, CIFAR-10: 7 in the paper).
        step_size: default ``2.5 * eps / steps``.
        norm: ``"linf"`` or ``"l2"``.
        eps_ramp_epochs: epochs over which eps grows linearly from 0 (0: no ramp).
        label_smoothing: see :class:`Recipe`.

    Logged ``train_acc`` is the accuracy on the adversarial training batches.
    """

    def __init__(
        self,
        *,
        eps: float = 0.3,
        steps: int = 10,
        step_size: float | None = None,
        norm: str = "linf",
        eps_ramp_epochs: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(label_smoothing=label_smoothing)
        if eps < 0 or steps < 1 or eps_ramp_epochs < 0:
            raise ValueError("pgd recipe: need eps >= 0, steps >= 1, eps_ramp_epochs >= 0")
        self.eps, self.steps, self.step_size, self.norm = eps, steps, step_size, norm
        self.eps_ramp_epochs = eps_ramp_epochs

    def current_eps(self) -> float:
        if self.eps_ramp_epochs <= 0:
            return self.eps
        return self.eps * min(1.0, self.progress / self.eps_ramp_epochs)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = self.current_eps()
        if eps > 0:
            step = self.step_size * eps / self.eps if self.step_size is not None else None
            attack = PGD(
                self.unwrap(model), eps=eps, steps=self.steps, step_size=step, norm=self.norm
            )
            x = attack(x, y)
        logits = model(x)
        return {"loss": self.cross_entropy(logits, y), "logits": logits, "eps": torch.tensor(eps)}

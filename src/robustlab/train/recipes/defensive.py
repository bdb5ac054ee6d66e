"""Defensive distillation (Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a defense
to adversarial perturbations against deep neural networks", IEEE S&P 2016), kept as the
standard example of a defense that masks gradients: Carlini & Wagner ("Defensive
distillation is not robust to adversarial examples", 2016; "Towards evaluating the
robustness of neural networks", 2017) broke it with attacks on the logits."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, Recipe
from robustlab.train.recipes.distill import Teacher


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (half precision would round logits of ~T times the
    usual size); float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@RECIPES.register("defensive_distillation")
class DefensiveDistillation(Recipe):
    """Train at temperature T, deploy at temperature 1.

    Two runs make the defense. Without a ``teacher`` this recipe trains the *initial
    network*: cross-entropy of ``softmax(z / T)`` against the labels. With the initial
    network as ``teacher`` it trains the *distilled network*: cross-entropy of
    ``softmax(z_s / T)`` against the teacher's ``softmax(z_t / T)`` (the soft labels
    replace the labels; no T^2 factor and no hard-label term, as in the paper). Both
    are saved as they are, so they run at T = 1: their logits are about T times
    larger than a normally trained network's, the softmax saturates in float32, and
    the cross-entropy's input gradient underflows to zero on most points.

    That is the point of keeping it: ``robustlab eval`` should show cross-entropy
    attacks (FGSM, PGD, APGD-CE) failing, margin attacks (CW, APGD-T's DLR loss)
    succeeding, and the validity checks saying why. It is not a defense to deploy.

    Args:
        teacher: ``None`` for the initial network; the initial network's run directory
            (or module) for the distilled one. It must have been trained at the same
            temperature: its ``softmax(z / T)`` are the soft labels.
        temperature: T (paper: 100 on MNIST and CIFAR-10).
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.

    Example (YAML, second run)::

        recipe:
          name: defensive_distillation
          options: {teacher: runs/dd-initial, temperature: 100}
    """

    def __init__(
        self, *, teacher: str | nn.Module | None = None, temperature: float = 100.0, **common: Any
    ) -> None:
        super().__init__(**common)
        if not float(temperature) > 0:
            raise ConfigError(
                f"defensive_distillation recipe: temperature must be > 0, got {temperature}"
            )
        self.temperature = float(temperature)
        self.teacher = None if teacher is None else Teacher(teacher)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature
        out: dict[str, torch.Tensor] = {}
        if self.teacher is None:
            with self.optimizing(model):
                logits = model(x)
                loss = self.cross_entropy(_wide(logits) / t, y)
        else:
            teacher_logits = self.teacher(x)
            soft_labels = F.softmax(_wide(teacher_logits) / t, 1)
            with self.optimizing(model):
                logits = model(x)
                loss = -(soft_labels * F.log_softmax(_wide(logits) / t, 1)).sum(1).mean()
            out["teacher_acc"] = (teacher_logits.argmax(1) == y).float().mean()
        return {"loss": loss, "logits": logits, **out}

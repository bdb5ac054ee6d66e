"""Adversarially Robust Distillation (Goldblum, Fowl, Feizi & Goldstein, "Adversarially
robust distillation", AAAI 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, AdversarialRecipe
from robustlab.train.recipes.distill import Teacher, distillation_kl


@RECIPES.register("ard")
class AdversariallyRobustDistillation(AdversarialRecipe):
    """``alpha * T^2 * KL(T(x)/T || S(x + delta)/T) + (1 - alpha) * CE(S(x), y)``.

    ``delta`` is PGD on the student's own cross-entropy (uniform random start, signed
    steps, projected; the model in eval mode), and the student's output on it is pulled
    towards the frozen teacher's soft labels on the *clean* image: the teacher is asked
    what the point should look like, never attacked.

    Defaults are the official code's (CIFAR-10): temperature 30, alpha 1 (no hard-label
    term), PGD-10 with step ``eps / 4`` (2/255 at 8/255). Two departures, each a constant
    or a convention: the KL is summed over classes and averaged over the batch (the paper's
    per-sample KL; the official ``nn.KLDivLoss()`` averages over classes too, which divides
    the loss by the number of classes, a learning-rate factor), and the attack runs with
    the student in eval mode like every recipe here (the official code attacks in train
    mode). When ``alpha`` is 1 the clean pass, which only feeds the zero-weight hard
    term, is skipped.

    Args:
        teacher: a run directory or a module (frozen; see
            :class:`~robustlab.train.recipes.distill.Teacher`). It should be robust: ARD
            transfers the teacher's robustness, not only its accuracy.
        temperature: T (paper: 30 on CIFAR-10).
        alpha: weight of the distillation term (paper: 1).
        steps, step_size: the student's PGD (default 10 steps of ``eps / 4``, scaled with
            the eps ramp).
        eps, norm, eps_ramp_epochs: see :class:`AdversarialRecipe`.
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.

    Logged: ``kl`` (T^2 included), ``teacher_acc`` (clean batch), ``eps``.
    Cost per step: ``steps`` attack passes, one teacher forward, one or two training passes.
    """

    def __init__(
        self,
        *,
        teacher: str | nn.Module,
        temperature: float = 30.0,
        alpha: float = 1.0,
        steps: int = 10,
        step_size: float | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not float(temperature) > 0:
            raise ConfigError(f"ard recipe: temperature must be > 0, got {temperature}")
        if not 0 <= float(alpha) <= 1:
            raise ConfigError(f"ard recipe: alpha must be in [0, 1], got {alpha}")
        if steps < 1 or (step_size is not None and not float(step_size) > 0):
            raise ConfigError(
                f"ard recipe: need steps >= 1, step_size > 0; got {steps}, {step_size}"
            )
        self.teacher = Teacher(teacher)
        self.temperature, self.alpha, self.steps = float(temperature), float(alpha), steps
        self.step_size = self.eps / 4 if step_size is None else float(step_size)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x_adv = self.pgd_example(model, x, y, steps=self.steps, step_size=self.step_size)
        teacher_logits = self.teacher(x)
        with self.optimizing(model):
            adv = model(x_adv)
            soft = distillation_kl(adv, teacher_logits, self.temperature)
            loss = self.alpha * soft
            if self.alpha < 1:
                loss = loss + (1 - self.alpha) * self.cross_entropy(model(x), y)
        return {
            "loss": loss,
            "logits": adv,
            "kl": soft.detach(),
            "teacher_acc": (teacher_logits.argmax(1) == y).float().mean(),
            "eps": torch.tensor(self.current_eps()),
        }

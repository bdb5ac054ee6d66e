"""Robust Soft Label Adversarial Distillation (Zi, Zhao, Ma & Jiang, "Revisiting
adversarial robustness distillation: robust soft labels make student better", ICCV 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, AdversarialRecipe
from robustlab.train.recipes.distill import Teacher
from robustlab.train.recipes.trades import kl_clean_adv


@RECIPES.register("rslad")
class RSLAD(AdversarialRecipe):
    """``w * KL(T(x) || S(x')) + (1 - w) * KL(T(x) || S(x))`` with ``w = 5/6``.

    The robust teacher's soft labels on the clean image replace the hard labels in both
    terms (no cross-entropy at all), and the adversarial example ``x'`` maximises the
    same divergence, ``KL(T(x) || S(x'))``, from TRADES' start ``x + 0.001 N(0, I)`` with
    signed steps (the official code's ``KLDivLoss(log S(x'), T(x))``; the paper writes
    its arguments the other way round). Temperature 1 throughout.

    Defaults are the paper's (CIFAR-10): PGD-10 with step ``eps / 4`` (2/255 at 8/255),
    weights 5/6 and 1/6. The KL is summed over classes and averaged over the batch; the
    official code's ``torch.mean`` over classes as well divides it by the number of
    classes (a learning-rate factor its README warns about).

    Args:
        teacher: a run directory or a module (frozen; see
            :class:`~robustlab.train.recipes.distill.Teacher`); a robust one.
        adv_weight: ``w``, the adversarial term's weight (5/6).
        steps, step_size: the inner maximisation (10 steps of ``eps / 4``).
        eps, norm, eps_ramp_epochs: see :class:`AdversarialRecipe`.
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.

    Logged: ``kl_adv``, ``kl_clean``, ``teacher_acc`` (clean batch), ``eps``.
    Cost per step: one teacher forward, ``steps`` attack passes, two training passes.
    """

    def __init__(
        self,
        *,
        teacher: str | nn.Module,
        adv_weight: float = 5 / 6,
        steps: int = 10,
        step_size: float | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not 0 <= float(adv_weight) <= 1:
            raise ConfigError(f"rslad recipe: adv_weight must be in [0, 1], got {adv_weight}")
        if steps < 1 or (step_size is not None and not float(step_size) > 0):
            raise ConfigError(
                f"rslad recipe: need steps >= 1, step_size > 0; got {steps}, {step_size}"
            )
        self.teacher = Teacher(teacher)
        self.adv_weight, self.steps = float(adv_weight), steps
        self.step_size = self.eps / 4 if step_size is None else float(step_size)

    def make_adversarial(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        """The inner maximisation of ``KL(T(x) || S(x'))`` through the library's PGD."""

        def kl_to_teacher(logits: torch.Tensor, y: torch.Tensor, target: object) -> torch.Tensor:
            if logits.shape[0] != teacher_logits.shape[0]:  # label_free PGD keeps the batch
                raise RuntimeError("RSLAD's KL loss was given a subset of the batch")
            return kl_clean_adv(teacher_logits, logits)

        return self.pgd_example(  # the attack runs the student in eval mode
            model, x, y, steps=self.steps, step_size=self.step_size,
            loss=kl_to_teacher, label_free=True, random_start=0.001,
        )  # fmt: skip

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_logits = self.teacher(x)
        x_adv = self.make_adversarial(model, x, y, teacher_logits)
        with self.optimizing(model):
            adv, clean = model(x_adv), model(x)
            kl_adv = kl_clean_adv(teacher_logits, adv).mean()
            kl_clean = kl_clean_adv(teacher_logits, clean).mean()
            loss = self.adv_weight * kl_adv + (1 - self.adv_weight) * kl_clean
        return {
            "loss": loss,
            "logits": adv,
            "kl_adv": kl_adv.detach(),
            "kl_clean": kl_clean.detach(),
            "teacher_acc": (teacher_logits.argmax(1) == y).float().mean(),
            "eps": torch.tensor(self.current_eps()),
        }

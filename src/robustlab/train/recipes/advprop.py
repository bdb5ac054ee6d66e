"""AdvProp (Xie, Tan, Gong, Wang, Yuille & Le, CVPR 2020): adversarial examples as a
separate distribution, normalised by auxiliary batch norms, to improve clean accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robustlab.attacks import PGD
from robustlab.errors import ConfigError
from robustlab.nn.aux_bn import aux_bn_state, convert_aux_bn, split_bn, strip_aux_bn, use_bn
from robustlab.train.recipes.base import RECIPES, TRAINING_PRECISION, AdversarialRecipe

AUX_FILE = "aux_bn.safetensors"


@RECIPES.register("advprop")
class AdvProp(AdversarialRecipe):
    """Clean batch through the main norms, PGD batch through auxiliary norms, shared weights.

    Per step: (1) PGD examples made through auxiliary norm ``i`` (batch statistics,
    running statistics not updated), targeted at a random wrong class from a uniform
    random start as in the paper, or untargeted; (2) loss ``CE(main(x)) +
    sum_i CE(aux_i(x_adv_i))``, equal weights, in ONE pass over the concatenated batch
    whose rows are routed to their norms (:func:`~robustlab.nn.split_bn`), so DDP sees
    one forward per backward. Inference uses the main norms only: :meth:`export` strips
    the auxiliary ones, which are saved separately (``aux_bn.safetensors``).

    ``eps`` may be a list: fine-grained AdvProp, one auxiliary norm per attack strength.

    Args:
        eps: budget, or a list of budgets (one auxiliary norm each).
        steps: PGD iterations (the paper: ``255 eps + 1`` iterations of step ``1/255``).
        step_size: at the largest eps, scaled with each level; default ``1.25 eps / steps``.
        targeted: ``"random"`` (the paper) or ``False`` (untargeted).
        attack_bn: ``"batch"`` (auxiliary norms with batch statistics during the attack,
            as the paper) or ``"eval"`` (their running statistics).
        norm, eps_ramp_epochs: see :class:`AdversarialRecipe`.
        **common: :class:`~robustlab.train.recipes.base.Recipe` options (SAT...).

    Logged ``train_acc`` is the clean accuracy (main norms); ``adv_acc`` that of the
    adversarial batch through the auxiliary norms.
    """

    def __init__(
        self,
        *,
        eps: float | Sequence[float] = 0.3,
        steps: int = 5,
        step_size: float | None = None,
        targeted: bool | str = "random",
        attack_bn: str = "batch",
        **common: Any,
    ) -> None:
        levels = [float(e) for e in (eps if isinstance(eps, Sequence) else [eps])]
        if not levels:
            raise ConfigError("advprop recipe: eps must be a number or a non-empty list")
        super().__init__(eps=max(levels), **common)
        if steps < 1:
            raise ConfigError(f"advprop recipe: steps must be >= 1, got {steps}")
        if targeted not in ("random", False):
            raise ConfigError(f"advprop recipe: targeted must be random or false, not {targeted!r}")
        if attack_bn not in ("batch", "eval"):
            raise ConfigError(f"advprop recipe: attack_bn must be batch or eval, not {attack_bn!r}")
        self.levels, self.steps, self.targeted, self.attack_bn = levels, steps, targeted, attack_bn
        self.step_size = step_size  # None: 1.25 * eps / steps for each level

    def prepare(self, model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
        return convert_aux_bn(super().prepare(model, example), num_aux=len(self.levels))

    def make_adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, i: int):
        eps = self.levels[i] * self.ramp()
        if eps == 0:
            return x
        step = (
            1.25 * eps / self.steps if self.step_size is None else self.step_size * eps / self.eps
        )
        net = self.unwrap(model)
        attack = PGD(
            net, eps=eps, steps=self.steps, step_size=step, norm=self.norm,
            targeted=self.targeted, model_mode="train" if self.attack_bn == "batch" else "eval",
            precision=TRAINING_PRECISION,
        )  # fmt: skip
        with use_bn(net, "aux", i, freeze_stats=True), self.attacking(model):
            return attack(x, y)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        advs = [self.make_adversarial(model, x, y, i) for i in range(len(self.levels))]
        b = x.shape[0]
        with split_bn(self.unwrap(model), [b] * (len(advs) + 1)), self.optimizing(model):
            logits = model(torch.cat([x, *advs]))
            parts = logits.split(b)
            loss = sum(self.cross_entropy(p, y) for p in parts)
        adv_acc = torch.stack([(p.argmax(1) == y).float().mean() for p in parts[1:]]).mean()
        return {
            "loss": loss,
            "logits": parts[0],
            "adv_acc": adv_acc,
            "eps": torch.tensor(self.current_eps()),
        }

    def export(self, model: nn.Module) -> nn.Module:
        return super().export(strip_aux_bn(model))

    def export_extras(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        return {AUX_FILE: aux_bn_state(model)}

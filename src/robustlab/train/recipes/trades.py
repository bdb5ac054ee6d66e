"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, ICML 2019)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import ConfigError
from robustlab.nn.adapt import preserve_modes
from robustlab.train.recipes.base import RECIPES, AdversarialRecipe


def kl_clean_adv(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(softmax(clean) || softmax(adv))``, in at least float32 (half and
    bfloat16 logits are promoted; float64 stays float64)."""
    dtype = torch.promote_types(logits_adv.dtype, torch.float32)
    log_p = F.log_softmax(logits_clean.to(dtype), 1)
    log_q = F.log_softmax(logits_adv.to(dtype), 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


@RECIPES.register("trades")
class TRADESTraining(AdversarialRecipe):
    """``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` maximising the KL in the ball.

    The inner maximisation is the paper's: start at ``x + 0.001 * N(0, I)``, take
    ``steps`` signed (L-inf) or normalised (L2) gradient steps on the KL against the
    fixed clean prediction, with the model in eval mode, projecting onto the ball. The
    outer loss back-propagates through both the clean and the adversarial logits
    (one pass over the concatenated batch).

    Args:
        eps, norm, eps_ramp_epochs: see :class:`AdversarialRecipe`.
        beta: trade-off (6 in the paper; 1/lambda there).
        steps: inner iterations (paper: 40 on MNIST, 10 on CIFAR-10).
        step_size: at the full eps; default ``2.5 * eps / steps``.
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.
    """

    def __init__(
        self,
        *,
        beta: float = 6.0,
        steps: int = 10,
        step_size: float | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if beta < 0 or steps < 1:
            raise ConfigError(f"trades recipe: need beta >= 0 and steps >= 1, got {beta}, {steps}")
        self.beta, self.steps = float(beta), steps
        self.step_size = 2.5 * self.eps / steps if step_size is None else float(step_size)
        if step_size is not None and not float(step_size) > 0:
            raise ConfigError(f"trades recipe: step_size must be > 0, got {step_size}")

    def make_adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The inner maximisation, through the library's PGD with a label-free loss."""
        net = self.unwrap(model)
        if self.current_eps() == 0:
            return x
        with self.attacking(model), preserve_modes(net, training=False), torch.no_grad():
            clean = net(x)  # the fixed target distribution, as the PGD will see it (eval mode)

        def kl_to_clean(logits: torch.Tensor, y: torch.Tensor, target: object) -> torch.Tensor:
            if logits.shape[0] != clean.shape[0]:  # label_free PGD never takes a subset
                raise RuntimeError("TRADES' KL loss was given a subset of the batch")
            return kl_clean_adv(clean, logits)

        return self.pgd_example(
            model, x, y, steps=self.steps, step_size=self.step_size,
            loss=kl_to_clean, label_free=True, random_start=0.001,
        )  # fmt: skip

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x_adv = self.make_adversarial(model, x, y)
        b = x.shape[0]
        with self.optimizing(model):
            logits = model(torch.cat([x, x_adv]))
            clean, adv = logits[:b], logits[b:]
            natural = self.cross_entropy(clean, y)
            robust = kl_clean_adv(clean, adv).mean()
            loss = natural + self.beta * robust
        return {
            "loss": loss,
            "logits": adv,
            "clean_acc": (clean.argmax(1) == y).float().mean(),
            "kl": robust.detach(),
            "eps": torch.tensor(self.current_eps()),
        }

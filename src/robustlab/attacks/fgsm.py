"""FGSM: the fast gradient sign method (Goodfellow, Shlens & Szegedy, ICLR 2015)."""

from __future__ import annotations

from typing import Any

from torch import nn

from robustlab.attacks.base import ATTACKS, Attack, LossFn, check_loss, normalize_step


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """One step of size eps along the loss gradient's sign (L-inf) or direction (L2).

    Threat model: ``||x_adv - x|| <= eps`` in the chosen norm, pixels in [0, 1].
    Cost: one forward and one backward pass.

    Args:
        model: classifier on [0, 1] pixels returning logits.
        eps: step size = budget, pixel units.
        norm: ``"linf"`` (x + eps * sign(grad)) or ``"l2"`` (x + eps * grad / ||grad||).
        loss: ``ce``, ``margin`` or ``dlr``.
        **kwargs: see :class:`~robustlab.attacks.base.Attack` (targeted, output_fn, ...).

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W).

    Example:
        >>> x_adv = FGSM(model, eps=0.1)(x, y)
    """

    name = "fgsm"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        norm: str = "linf",
        loss: str | LossFn = "ce",
        **kwargs: Any,
    ):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self.loss = check_loss(loss)

    def _perturb(self, x, y, target, need_success):
        _, grad, _ = self.loss_and_grad(x, y, target, self.loss)
        return (x + self.eps * normalize_step(grad, self.norm)).clamp(0.0, 1.0), None

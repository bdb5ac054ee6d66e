"""Carlini & Wagner's L2 attack (IEEE S&P 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import ATTACKS, Attack, _view


@ATTACKS.register("cw")
class CW(Attack):
    """Minimise ``||delta||_2^2 + c * max(margin, -kappa)`` in tanh space, binary search on c.

    The image is ``x_adv = (tanh(w) + 1) / 2`` so it always lies in [0, 1]; Adam
    optimises w. The margin is ``z_y - max_{i != y} z_i`` (untargeted) or
    ``max_{i != t} z_i - z_t`` (targeted). After each of ``search_steps`` rounds, a
    sample's c shrinks (bisection) if it reached the confidence ``kappa`` and grows (x10
    until bracketed) if not. Each sample keeps its smallest perturbation that reached
    ``kappa`` and, as a fallback, the smallest that fooled the model at all (with
    ``kappa > 0`` a point can be misclassified without the margin ever reaching
    ``kappa``: it is still returned, never silently dropped).

    With ``eps`` the smallest such point inside the L2 ball is returned; if there is
    none, the smallest fooling point is projected onto the ball (success judged there).
    Without ``eps`` the attack is minimum-norm.

    Args:
        model: classifier on [0, 1] pixels returning logits.
        eps: optional L2 budget (pixel units).
        c: initial trade-off constant.
        kappa: confidence margin.
        steps: Adam steps per search round.
        search_steps: binary-search rounds on c.
        lr: Adam learning rate.
        **kwargs: see :class:`~robustlab.attacks.base.Attack` (norm is L2).

    Example:
        >>> x_adv = CW(model, steps=100, search_steps=5)(x, y)
    """

    name = "cw"
    minimum_norm = True

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = None,
        c: float = 1.0,
        kappa: float = 0.0,
        steps: int = 100,
        search_steps: int = 5,
        lr: float = 0.01,
        norm: str = "l2",
        **kwargs: Any,
    ) -> None:
        if norm != "l2":
            raise ValueError("cw is an L2 attack")
        super().__init__(model, eps=eps, norm="l2", **kwargs)
        if steps < 1 or search_steps < 1 or c <= 0:
            raise ValueError("need steps >= 1, search_steps >= 1 and c > 0")
        self.c, self.kappa, self.steps, self.search_steps, self.lr = (
            c,
            kappa,
            steps,
            search_steps,
            lr,
        )

    def _margin(
        self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        cls = target if target is not None else y
        own = logits.gather(1, cls[:, None])[:, 0]
        other = logits.scatter(1, cls[:, None], float("-inf")).amax(1)
        return (other - own) if target is not None else (own - other)

    def _perturb(self, x, y, target, need_success):
        b = x.shape[0]
        dev = x.device
        w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        c = torch.full((b,), self.c, device=dev)
        lo = torch.zeros(b, device=dev)
        hi = torch.full((b,), float("inf"), device=dev)
        # The smallest perturbation found that reaches the confidence kappa (what the
        # search on c steers by) and, apart, the smallest that fools the model at all: with
        # kappa > 0 a point may be misclassified without ever reaching kappa, or only
        # within eps without kappa. Neither is dropped (no silent success).
        confident, fooling = _Smallest(x), _Smallest(x)
        for _ in range(self.search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            confident_round = torch.zeros(b, dtype=torch.bool, device=dev)
            for _ in range(self.steps):
                with torch.enable_grad():
                    x_adv = (torch.tanh(w) + 1) / 2
                    logits = self.logits(x_adv)
                    dist = (x_adv - x).flatten(1).pow(2).sum(1)
                    m = self._margin(logits, y, target)
                    loss = (dist + c * m.clamp_min(-self.kappa)).sum()
                    # gradient for w only: nothing accumulates on the model's parameters
                    (w.grad,) = torch.autograd.grad(loss, w)
                opt.step()
                with torch.no_grad():
                    norms, point = dist.sqrt(), x_adv.detach()
                    reached = m < 0 if self.kappa == 0 else m <= -self.kappa
                    confident.offer(point, norms, reached)
                    fooled = self.is_success(logits.detach(), y, target)
                    fooling.offer(point, norms, self.confirmed(point, y, target, fooled))
                    confident_round |= reached
            hi = torch.where(confident_round, torch.minimum(hi, c), hi)
            lo = torch.where(confident_round, lo, torch.maximum(lo, c))
            c = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)
        found = torch.isfinite(confident.norm) | torch.isfinite(fooling.norm)
        if self.eps is None:  # minimum norm: the confident point, else the fooling one
            pick = torch.isfinite(confident.norm)
            return torch.where(_view(pick, x), confident.x, fooling.x), found
        # with a budget: a confident point inside the ball, else the smallest fooling point
        # (every confident point fools, so it is no larger), which the base projects onto
        # the ball if it lies outside
        pick = confident.norm <= self.eps + 1e-6
        return torch.where(_view(pick, x), confident.x, fooling.x), None


class _Smallest:
    """Per sample, the smallest-norm point offered under a condition (inf: none yet)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.clone()
        self.norm = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)

    def offer(self, point: torch.Tensor, norms: torch.Tensor, ok: torch.Tensor) -> None:
        better = ok & (norms < self.norm)
        self.x[better], self.norm[better] = point[better], norms[better].to(self.norm.dtype)

"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

Score-based: it reads only the model's outputs, never its gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import ATTACKS, Attack, _view, lp_norm

# The paper halves p at these iterations (for a budget of 10,000 queries; rescaled otherwise).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def _pseudo_gaussian(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Centred pattern of nested rectangles with weights 1/(r+1)^2, unit L2 norm."""
    ry = (torch.arange(h, device=device) - (h - 1) / 2).abs()
    rx = (torch.arange(w, device=device) - (w - 1) / 2).abs()
    ring = torch.maximum(ry[:, None], rx[None, :]).floor()
    pattern = 1.0 / (ring + 1.0) ** 2
    return pattern / pattern.norm()


def _square_pattern(s: int, device: torch.device, transpose: bool) -> torch.Tensor:
    """The L2 update of the paper: two pseudo-Gaussian halves of opposite sign, unit norm."""
    top = _pseudo_gaussian(s // 2, s, device) if s >= 2 else torch.ones(0, s, device=device)
    bottom = -_pseudo_gaussian(s - s // 2, s, device)
    pattern = torch.cat([top, bottom], 0)
    pattern = pattern / pattern.norm()
    return pattern.t() if transpose else pattern


@ATTACKS.register("square")
class Square(Attack):
    """Random search over square-shaped updates; only reads the model's scores.

    Each iteration proposes, for every sample not yet fooled, a change confined to a
    random square window whose side shrinks with the schedule of ``p`` (the fraction of
    pixels changed): L-inf sets the window to ``x +- eps`` with a random sign per
    channel; L2 moves the perturbation mass of a second window into the first one with
    a two-signed pseudo-Gaussian pattern, keeping ``||delta||_2 = eps``. A proposal is
    kept when it lowers the margin loss ``z_y - max_{i != y} z_i``. Each evaluated
    proposal costs one query of one sample; ``queries`` counts them per sample.

    No gradient is ever computed: the model runs under ``torch.no_grad()``.

    Args:
        model: classifier on [0, 1] pixels returning logits.
        eps: budget, pixel units.
        norm: ``"linf"`` or ``"l2"``.
        n_queries: query budget per sample (the initial point costs one).
        p_init: initial fraction of pixels in the square (0.8 for L-inf as in
            AutoAttack's evaluation setting; 0.8 for L2).
        **kwargs: see :class:`~robustlab.attacks.base.Attack`.

    Attributes:
        queries: after a call, the queries spent per sample (B,).

    Example:
        >>> attack = Square(model, eps=0.3, n_queries=1000, seed=0)
        >>> result = attack.run(x, y); attack.queries.float().mean()
    """

    name = "square"
    uses_gradients = False

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        norm: str = "linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if n_queries < 1 or not 0 < p_init <= 1:
            raise ValueError(f"need n_queries >= 1 and 0 < p_init <= 1, got {n_queries}, {p_init}")
        self.n_queries, self.p_init = n_queries, p_init
        self.queries = torch.zeros(0, dtype=torch.long)

    def _p(self, it: int) -> float:
        it = int(it / self.n_queries * 10000)
        return self.p_init / 2 ** sum(it > h for h in _HALVINGS)

    def _margin_loss(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None):
        loss, logits = self.loss_value(x, y, target, "margin")
        fooled = self.confirmed(x, y, target, self.is_success(logits, y, target))
        return -loss, fooled  # minimise; < 0 once fooled

    def _rand(self, *shape: int, device: torch.device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=device)

    def _randint(self, high: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
        return (self._rand(n, device=device) * high).floor().long()

    def _sign(self, *shape: int, device: torch.device) -> torch.Tensor:
        return self._rand(*shape, device=device).lt(0.5).float() * 2 - 1

    def _window(self, n: int, h: int, w: int, s: int, device: torch.device) -> torch.Tensor:
        """Boolean masks (n, 1, h, w) of random s x s windows, one per sample."""
        top = self._randint(h - s + 1, n, device)
        left = self._randint(w - s + 1, n, device)
        rows = torch.arange(h, device=device)[None, :]
        cols = torch.arange(w, device=device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

    @torch.no_grad()
    def _perturb(self, x, y, target, need_success):
        if x.ndim != 4:
            raise ValueError(f"square needs images (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        dev = x.device
        if self.norm == "linf":
            x_best = (x + self.eps * self._sign(b, c, 1, w, device=dev)).clamp(
                0.0, 1.0
            )  # vertical stripes
        else:
            x_best = (x + self._l2_init(b, c, h, w, dev)).clamp(0.0, 1.0)
        loss, fooled = self._margin_loss(x_best, y, target)
        queries = torch.ones(b, dtype=torch.long, device=dev)
        for it in range(self.n_queries - 1):
            idx = (~fooled).nonzero()[:, 0]
            if idx.numel() == 0:
                break
            side = round(math.sqrt(self._p(it) * h * w))
            s = max(1, min(side, h - 1 if h > 1 else 1, w))
            xi, xb = x[idx], x_best[idx]
            if self.norm == "linf":
                mask = self._window(len(idx), h, w, s, dev)
                values = (xi + self.eps * self._sign(len(idx), c, 1, 1, device=dev)).clamp(0.0, 1.0)
                x_new = torch.where(mask, values, xb)
            else:
                x_new = self._l2_step(xi, xb, s)
            t = target[idx] if target is not None else None
            new_loss, new_fooled = self._margin_loss(x_new, y[idx], t)
            queries[idx] += 1
            better = new_loss < loss[idx]
            x_best[idx[better]] = x_new[better]
            loss[idx[better]] = new_loss[better]
            fooled[idx[better]] = new_fooled[better]
        self.queries = queries
        return x_best, fooled

    def _l2_init(self, b: int, c: int, h: int, w: int, dev: torch.device) -> torch.Tensor:
        """Tiles of pseudo-Gaussian bumps with random signs, rescaled to norm eps."""
        s = max(1, h // 5)
        delta = torch.zeros(b, c, h, w, device=dev)
        bump = _pseudo_gaussian(s, s, dev)
        for top in range(0, h - s + 1, s):
            for left in range(0, w - s + 1, s):
                delta[:, :, top : top + s, left : left + s] = bump * self._sign(
                    b, c, 1, 1, device=dev
                )
        return delta * _view(self.eps / (lp_norm(delta, "l2") + 1e-12), delta)

    def _l2_step(self, x: torch.Tensor, x_best: torch.Tensor, s: int) -> torch.Tensor:
        n, c, h, w = x.shape
        dev = x.device
        delta = x_best - x
        win1, win2 = self._window(n, h, w, s, dev), self._window(n, h, w, s, dev)
        both = (win1 | win2).float()
        # Mass available to the new window: what the two windows hold now, plus any slack
        # left below eps (clipping to [0, 1] can leave the perturbation shorter than eps).
        inside = lp_norm(delta * both, "l2")
        slack = (self.eps**2 - lp_norm(delta, "l2") ** 2).clamp_min(0.0)
        budget = torch.sqrt(inside**2 + slack)
        transpose = bool(self._rand(1, device=dev).item() < 0.5)
        pattern = _square_pattern(s, dev, transpose)
        # Place the pattern in window 1 of each sample (with a random sign per channel),
        # add the window's current direction, rescale to the available mass.
        top = win1.any(3)[:, 0].float().argmax(1)  # first row of window 1, per sample
        left = win1.any(2)[:, 0].float().argmax(1)
        rr = torch.arange(h, device=dev)[None, :] - top[:, None]  # (n, h) row inside the window
        cc = torch.arange(w, device=dev)[None, :] - left[:, None]
        placed = pattern[rr.clamp(0, s - 1)[:, :, None], cc.clamp(0, s - 1)[:, None, :]]
        placed = (placed * win1[:, 0].float())[:, None]
        new = placed * self._sign(n, c, 1, 1, device=dev)
        old = delta * win1.float()
        old = old / _view(lp_norm(old, "l2") + 1e-12, old)
        new = new + old
        new = new * _view(budget / (lp_norm(new, "l2") + 1e-12), new)
        delta = delta * (1.0 - both) + new
        return (x + delta).clamp(0.0, 1.0)

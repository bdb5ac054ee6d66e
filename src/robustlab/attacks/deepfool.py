"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016): minimal perturbations."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import ATTACKS, Attack, _view


@ATTACKS.register("deepfool")
class DeepFool(Attack):
    """Linearise the classifier and step to the nearest decision boundary, repeatedly.

    At each iteration, for the ``candidates`` classes k ranked highest by the clean
    logits (other than the current prediction p): ``w_k = grad(f_k - f_p)``,
    ``f'_k = f_k - f_p``; pick ``l = argmin |f'_k| / ||w_k||_*`` (dual norm: L2 for L2,
    L1 for L-inf) and add the step that reaches that linearised boundary. Stops per
    sample when the label flips; the result is ``x + (1 + overshoot) * sum(steps)``.
    A point the model already misclassifies is returned as it is (its own adversarial
    example).

    With ``eps`` the result is projected onto the eps-ball (success is judged there);
    without it, the attack returns the minimal perturbation it found (unbounded).

    Cost per iteration: one forward and one backward pass on ``candidates`` copies of
    the still-unflipped samples (one batched backward for all candidate gradients).

    Args:
        model: classifier on [0, 1] pixels returning logits.
        eps: optional budget (pixel units); ``None`` for the minimum-norm attack.
        norm: ``"l2"`` (the paper's default) or ``"linf"``.
        steps: maximum iterations (50 in the paper).
        overshoot: 0.02 in the paper.
        candidates: number of classes considered (10 in the paper).
        **kwargs: see :class:`~robustlab.attacks.base.Attack` (untargeted only).

    Example:
        >>> x_adv = DeepFool(model)(x, y)                      # minimal L2 perturbations
        >>> (x_adv - x).flatten(1).norm(dim=1).median()
    """

    name = "deepfool"
    minimum_norm = True

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = None,
        norm: str = "l2",
        steps: int = 50,
        overshoot: float = 0.02,
        candidates: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if self.targeted:
            raise ValueError("deepfool is untargeted")
        if steps < 1 or candidates < 2:
            raise ValueError(f"need steps >= 1 and candidates >= 2, got {steps}, {candidates}")
        self.steps, self.overshoot, self.candidates = steps, overshoot, candidates

    def _perturb(self, x, y, target, need_success):
        with torch.no_grad():
            logits0 = self.logits(x)
        k = min(self.candidates, logits0.shape[1])
        classes = logits0.argsort(1, descending=True)[:, :k]  # (b, k): candidate classes
        start = logits0.argmax(1)  # DeepFool flips the current prediction
        r_total = torch.zeros_like(x)
        # a point already misclassified is its own adversarial example: flipping its
        # (wrong) prediction could walk back to the true class
        active = start == y
        x_adv = x.clone()
        for _ in range(self.steps):
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            n = idx.numel()
            xi = x_adv[idx].detach().repeat_interleave(k, 0).requires_grad_(True)  # (n*k, ...)
            with torch.enable_grad():
                logits = self.logits(xi)
                own = start[idx].repeat_interleave(k)
                cand = classes[idx].reshape(-1)
                diff = logits.gather(1, cand[:, None])[:, 0] - logits.gather(1, own[:, None])[:, 0]
                (w,) = torch.autograd.grad(diff.sum(), xi)
            diff = diff.detach().view(n, k)
            w = w.view(n, k, *x.shape[1:])
            pred = logits.detach().view(n, k, -1)[:, 0].argmax(1)
            flipped = pred != start[idx]
            active[idx[flipped]] = False
            dual = "l2" if self.norm == "l2" else "l1"
            wn = w.flatten(2).norm(p=2 if dual == "l2" else 1, dim=2)  # (n, k)
            ratio = diff.abs() / (wn + 1e-8)
            ratio[classes[idx] == start[idx][:, None]] = float("inf")  # skip the own class
            best = ratio.argmin(1)
            wl = w[torch.arange(n), best]
            fl = diff[torch.arange(n), best].abs()
            wl_norm = wn[torch.arange(n), best]
            if self.norm == "l2":
                step = _view((fl + 1e-4) / (wl_norm**2 + 1e-8), wl) * wl
            else:
                step = _view((fl + 1e-4) / (wl_norm + 1e-8), wl) * wl.sign()
            keep = ~flipped
            r_total[idx[keep]] += step[keep]
            x_adv[idx[keep]] = (x[idx[keep]] + (1 + self.overshoot) * r_total[idx[keep]]).clamp(
                0.0, 1.0
            )
        return x_adv, None

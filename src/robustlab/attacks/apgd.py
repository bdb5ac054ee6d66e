"""APGD and APGD-T (Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import (
    ATTACKS,
    Attack,
    LossFn,
    _view,
    check_loss,
    lp_norm,
    normalize_step,
    project,
    still_robust,
)


@ATTACKS.register("apgd")
class APGD(Attack):
    """Auto-PGD: PGD with momentum and a step size that adapts at checkpoints.

    The algorithm (Croce & Hein 2020, Alg. 1): start at a random point of the
    eps-sphere with step ``eta = 2 eps``; each iteration takes a projected gradient
    step ``z`` and moves to ``x + 0.75 (z - x) + 0.25 (x - x_prev)`` (no momentum on the
    first step). Checkpoints come after ``0.22 N`` iterations, then at periods shrinking
    by ``0.03 N`` down to ``0.06 N``. At a checkpoint a sample's step is halved, and it
    restarts from its best point, when the loss increased in fewer than ``rho = 0.75``
    of the steps since the last checkpoint, or when the step was not halved last time
    and the best loss has not improved since. Every sample keeps its first adversarial
    point (if any) and otherwise its highest-loss point.

    Threat model: ``||x_adv - x|| <= eps`` (L-inf or L2), pixels in [0, 1].
    Cost: ``steps + 1`` forward+backward passes per restart, on the samples not yet fooled.

    Args:
        model: classifier on [0, 1] pixels returning logits.
        eps: budget, pixel units.
        steps: iterations N.
        norm: ``"linf"`` or ``"l2"``.
        loss: ``ce`` or ``dlr`` (also ``margin``); targeted calls use the targeted form.
        restarts: runs on the samples still robust.
        rho: checkpoint threshold on the fraction of loss-increasing steps.
        early_stop: stop computing gradients for a sample once it is fooled. This does
            not change the result (a fooled sample returns the first adversarial point
            found), only the cost.
        **kwargs: see :class:`~robustlab.attacks.base.Attack`.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W).

    Example:
        >>> result = APGD(model, eps=8 / 255, loss="dlr").run(x, y)
    """

    name = "apgd"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        steps: int = 100,
        norm: str = "linf",
        loss: str | LossFn = "ce",
        restarts: int = 1,
        rho: float = 0.75,
        early_stop: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self.early_stop = early_stop
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
        check_loss(loss)
        self.steps, self.loss, self.restarts, self.rho = steps, loss, restarts, rho

    # One run of Algorithm 1 on a batch; returns (x_out, fooled, first_step), first_step
    # being the iterations taken before each point first fooled the model (-1: never).
    def _apgd(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, b = self.steps, x.shape[0]
        period, min_period, decrement = (
            max(int(0.22 * n), 1),
            max(int(0.06 * n), 1),
            max(int(0.03 * n), 1),
        )
        g = self.generator
        if self.norm == "linf":
            t = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1
            x_adv = x + self.eps * t / _view(t.flatten(1).abs().amax(1), x)
        else:
            t = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
            x_adv = x + self.eps * t / _view(lp_norm(t, "l2") + 1e-12, x)
        x_adv = x_adv.clamp(0.0, 1.0)
        eta = torch.full((b,), 2.0 * self.eps, device=x.device, dtype=x.dtype)

        loss, grad, logits = self.loss_and_grad(x_adv, y, target, self.loss)
        fooled = self.confirmed(x_adv, y, target, self.is_success(logits, y, target))
        first = torch.where(fooled, 0, -1)
        x_adv_best = torch.where(_view(fooled, x), x_adv, x)
        x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
        loss_best_at_check = loss_best.clone()
        # As in the authors' code, the stall rule cannot fire at the first checkpoint.
        halved_at_check = torch.ones(b, dtype=torch.bool, device=x.device)
        increases = torch.zeros(b, device=x.device)
        prev_loss, x_prev, since_check = loss, x_adv, 0

        for i in range(n):
            with torch.no_grad():
                z = project(
                    x_adv + _view(eta, x) * normalize_step(grad, self.norm), x, self.eps, self.norm
                )
                momentum = 0.75 if i > 0 else 1.0
                x_new = x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev)
                x_prev, x_adv = x_adv, project(x_new, x, self.eps, self.norm)
            if self.early_stop:  # gradients only where still needed; fooled rows keep stale values
                act = (~fooled).nonzero()[:, 0]
                if act.numel() == 0:
                    break
                t = target[act] if target is not None else None
                loss_a, grad_a, logits_a = self.loss_and_grad(x_adv[act], y[act], t, self.loss)
                loss, grad = prev_loss.clone(), grad.clone()
                loss[act], grad[act] = loss_a, grad_a
                newly = torch.zeros_like(fooled)
                newly[act] = self.confirmed(x_adv[act], y[act], t,
                                            self.is_success(logits_a, y[act], t))  # fmt: skip
                newly &= ~fooled
            else:
                loss, grad, logits = self.loss_and_grad(x_adv, y, target, self.loss)
                newly = self.confirmed(x_adv, y, target,
                                       self.is_success(logits, y, target) & ~fooled)  # fmt: skip
            x_adv_best[newly] = x_adv[newly]
            first[newly] = i + 1
            fooled |= newly
            increases += (loss > prev_loss).float()
            prev_loss = loss
            better = loss > loss_best
            x_best[better], loss_best[better], grad_best[better] = (
                x_adv[better],
                loss[better],
                grad[better],
            )
            since_check += 1
            if since_check == period:
                oscillating = increases < self.rho * period
                stalled = ~halved_at_check & (loss_best <= loss_best_at_check)
                halve = oscillating | stalled
                eta[halve] /= 2.0
                x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
                halved_at_check, loss_best_at_check = halve, loss_best.clone()
                increases.zero_()
                since_check, period = 0, max(period - decrement, min_period)
        return torch.where(_view(fooled, x), x_adv_best, x_best), fooled, first

    def _perturb(self, x, y, target, need_success):
        out = x.clone()
        success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        first_step = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for run, idx in enumerate(still_robust(success, self.restarts)):
            t = target[idx] if target is not None else None
            x_run, fooled, first = self._apgd(x[idx], y[idx], t)
            out[idx] = x_run
            success[idx] = fooled
            first_step[idx[fooled]] = run * self.steps + first[fooled]
        return out, success, first_step


@ATTACKS.register("apgd-t")
class APGDT(APGD):
    """Targeted APGD of AutoAttack: targeted DLR loss towards each of the top classes in turn.

    For target ranks 2, 3, ..., ``n_target_classes + 1`` of the clean logits, APGD with
    the targeted DLR loss runs on the samples not yet misclassified. Success means
    misclassification (any wrong class), as robust accuracy needs.

    Example:
        >>> result = APGDT(model, eps=8 / 255, n_target_classes=9).run(x, y)
    """

    name = "apgd-t"

    def __init__(
        self,
        model: nn.Module,
        *,
        n_target_classes: int = 9,
        loss: str | LossFn = "dlr",
        **kwargs: Any,
    ) -> None:
        """Options as :class:`APGD` (targeted DLR loss by default) plus ``n_target_classes``."""
        if kwargs.get("targeted"):
            raise ValueError("apgd-t chooses its own targets; do not pass targeted=")
        super().__init__(model, loss=loss, **kwargs)
        self.n_target_classes = n_target_classes

    def _perturb(self, x, y, target, need_success):
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # fp32 targets
            order = self.logits(x).argsort(1, descending=True)
        k = order.shape[1]
        out = x.clone()
        success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        first_step = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        runs = 0  # APGD runs so far (targets x restarts), each of self.steps iterations
        for rank in range(1, min(self.n_target_classes + 1, k)):
            for idx in still_robust(success, self.restarts):
                x_run, fooled, first = self._apgd(x[idx], y[idx], order[idx, rank])
                out[idx[fooled]] = x_run[fooled]
                success[idx] = fooled
                first_step[idx[fooled]] = runs * self.steps + first[fooled]
                runs += 1
        return out, success, first_step

    def is_success(
        self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        """Any wrong class counts: the targets only steer the search."""
        return logits.argmax(1) != y

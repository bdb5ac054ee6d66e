"""PGD (Madry et al., ICLR 2018) and BIM / I-FGSM (Kurakin, Goodfellow & Bengio, 2017)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustlab.attacks.base import (
    ATTACKS,
    Attack,
    AttackError,
    LossFn,
    check_loss,
    normalize_step,
    project,
    random_start,
    still_robust,
)


@ATTACKS.register("pgd")
class PGD(Attack):
    """Projected gradient ascent on the loss inside the eps-ball, with restarts.

    Each step moves by ``step_size`` along the sign of the gradient (L-inf) or its
    direction (L2), then projects back onto the eps-ball and [0, 1]. With
    ``restarts > 1``, each restart runs only on the samples not yet fooled and every
    sample keeps its best result (fooled if any restart fooled it, else the highest loss).

    Threat model: ``||x_adv - x|| <= eps``, pixels in [0, 1].
    Cost: ``steps`` forward+backward passes per restart (plus one forward per restart
    when success is needed: ``run`` or ``restarts > 1``).

    Args:
        model: classifier on [0, 1] pixels returning logits.
        eps: budget, pixel units.
        steps: iterations per restart.
        step_size: step length; default ``2.5 * eps / steps`` (Madry et al.'s rule).
        norm: ``"linf"`` or ``"l2"``.
        random_start: ``True``: start from a uniform random point of the ball; ``False``:
            from the clean point; a float ``s``: from ``x + s * N(0, I)`` projected onto
            the ball (TRADES' start, s = 0.001).
        restarts: independent runs; the best per sample is kept.
        loss: ``ce``, ``margin`` (CW) or ``dlr``, or a function ``(logits, y, target) ->
            (B,)`` to maximise (see :func:`~robustlab.attacks.base.attack_loss`).
        label_free: the loss is not about misclassification (TRADES' KL between the clean
            and the adversarial prediction): no iterate is judged, the last one is
            returned as it is, and :meth:`run` (which reports success) is refused. Needs
            ``restarts=1`` and ``early_stop=False``; the loss function always sees the
            whole batch, in the caller's order.
        early_stop: freeze each sample at its first adversarial iterate and drop it from
            the remaining forward/backward passes (what robust evaluation wants: far
            cheaper on weak models; off by default, where the highest-loss point is wanted).
        **kwargs: see :class:`~robustlab.attacks.base.Attack` (targeted, output_fn, eot...).

    Shapes: x (B, C, H, W) in [0, 1], y (B,) -> x_adv (B, C, H, W).

    Example:
        >>> attack = PGD(model, eps=0.3, steps=40, step_size=0.01)
        >>> x_adv = attack(x, y)
        >>> robust_acc = 1 - attack.run(x, y).success.float().mean()
    """

    name = "pgd"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        steps: int = 10,
        step_size: float | None = None,
        norm: str = "linf",
        random_start: bool | float = True,
        restarts: int = 1,
        loss: str | LossFn = "ce",
        early_stop: bool = False,
        label_free: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if not isinstance(random_start, bool) and not (
            isinstance(random_start, float) and math.isfinite(random_start) and random_start > 0
        ):
            raise AttackError(
                f"random_start must be True, False or a noise scale > 0 (a float), "
                f"got {random_start!r}"
            )
        if label_free and (restarts != 1 or early_stop):
            raise AttackError(
                "label_free (a loss that is not about misclassification) needs restarts=1 and "
                "early_stop=False: both judge iterates by success"
            )
        self.label_free = label_free
        self.early_stop = early_stop
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
        check_loss(loss)
        self.steps, self.restarts, self.loss = steps, restarts, loss
        self.step_size = 2.5 * self.eps / steps if step_size is None else float(step_size)
        if step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise AttackError(f"step_size must be a finite number > 0, got {step_size}")
        self.random_start = random_start

    def _ascend(
        self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One run from a (random) start: the final points and, per sample, the gradient
        steps taken before its iterate first fooled the model (-1: no checked iterate did;
        the last iterate is judged by the caller).

        No silent success: the logits of every iterate are computed for its gradient
        anyway, so a sample whose path crossed an adversarial point but whose last iterate
        is not adversarial gets the first adversarial iterate back (one forward pass of the
        last iterate decides, over the whole batch so that batch norm in train mode sees
        the batch the steps saw). With ``early_stop`` each sample stops there.
        """
        x_adv = self._start(x)
        first = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        if self.label_free:  # nothing to judge: plain ascent, the last iterate
            for _ in range(self.steps):
                _, grad, _ = self.loss_and_grad(x_adv, y, target, self.loss)
                x_adv = project(x_adv + self.step_size * normalize_step(grad, self.norm), x,
                                self.eps, self.norm)  # fmt: skip
            return x_adv, first
        if not self.early_stop:
            x_found = None
            for t in range(self.steps):
                _, grad, logits = self.loss_and_grad(x_adv, y, target, self.loss)
                fooled = self.is_success(logits, y, target) & (first < 0)
                newly = self.confirmed(x_adv, y, target, fooled)
                if newly.any():
                    x_found = x_adv.clone() if x_found is None else x_found
                    x_found[newly], first[newly] = x_adv[newly], t
                step = x_adv + self.step_size * normalize_step(grad, self.norm)
                x_adv = project(step, x, self.eps, self.norm)
            if x_found is not None:  # found earlier: keep the last iterate only if it fools too
                with torch.no_grad():  # the whole batch, as in the steps (batch norm in train mode)
                    found = first >= 0
                    fooled = self.is_success(self.logits(x_adv), y, target) & found
                    lost = found & ~self.confirmed(x_adv, y, target, fooled)
                x_adv[lost] = x_found[lost]
            return x_adv, first
        active = torch.arange(x.shape[0], device=x.device)
        for step_index in range(self.steps):
            t = target[active] if target is not None else None
            xa, x0 = x_adv[active], x[active]
            _, grad, logits = self.loss_and_grad(xa, y[active], t, self.loss)
            # fooled samples stay where they are
            keep = ~self.confirmed(xa, y[active], t, self.is_success(logits, y[active], t))
            first[active[~keep]] = step_index
            step = project(
                xa + self.step_size * normalize_step(grad, self.norm), x0, self.eps, self.norm
            )
            x_adv = x_adv.index_copy(0, active[keep], step[keep])
            active = active[keep]
            if active.numel() == 0:
                break
        return x_adv, first

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_start is False:
            return x
        if self.random_start is True:
            return random_start(x, self.eps, self.norm, self.generator)
        noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return project(x + self.random_start * noise, x, self.eps, self.norm)

    def _perturb(self, x, y, target, need_success):
        if need_success and self.label_free:
            raise AttackError(
                "this PGD maximises a label-free loss (label_free=True): it has no notion of "
                "success, so run() is refused; call the attack for the points"
            )
        if self.restarts == 1 and not need_success:
            return self._ascend(x, y, target)[0], None
        best = x.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        first_step = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for restart, idx in enumerate(still_robust(success, self.restarts)):
            t = target[idx] if target is not None else None
            x_adv, first = self._ascend(x[idx], y[idx], t)
            loss, logits = self.loss_value(x_adv, y[idx], t, self.loss)
            fooled = self.confirmed(x_adv, y[idx], t, self.is_success(logits, y[idx], t))
            first = torch.where(fooled & (first < 0), self.steps, first)  # the last iterate
            first_step[idx[fooled]] = restart * self.steps + first[fooled]
            better = fooled | (loss > best_loss[idx])
            best[idx[better]] = x_adv[better]
            best_loss[idx[better]] = loss[better]
            success[idx] = fooled
        return best, success, first_step


@ATTACKS.register("bim")
class BIM(PGD):
    """Basic iterative method / I-FGSM (Kurakin et al. 2017): PGD from the clean point.

    Defaults follow the paper: step ``1/255`` and ``min(255 eps + 4, 1.25 * 255 eps)``
    steps when ``steps`` is not given.

    Example:
        >>> x_adv = BIM(model, eps=8 / 255)(x, y)
    """

    name = "bim"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        steps: int | None = None,
        step_size: float = 1 / 255,
        norm: str = "linf",
        loss: str | LossFn = "ce",
        **kwargs: Any,
    ) -> None:
        if steps is None:
            steps = max(1, int(min(255 * eps + 4, 1.25 * 255 * eps)))
        super().__init__(
            model,
            eps=eps,
            steps=steps,
            step_size=step_size,
            norm=norm,
            random_start=False,
            loss=loss,
            **kwargs,
        )

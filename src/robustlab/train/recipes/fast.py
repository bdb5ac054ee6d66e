"""Fast adversarial training: FGSM from a random start (Wong, Rice & Kolter, ICLR 2020),
with the paper's guard against catastrophic overfitting."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from robustlab.attacks import PGD
from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, TRAINING_PRECISION, AdversarialRecipe

log = logging.getLogger(__name__)


class OverfittingGuard:
    """Catastrophic-overfitting guard: PGD accuracy on held-out images after every epoch.

    As in Wong et al.'s code, the accuracy is compared with the previous check: a fall
    of more than ``drop`` (0.2) is a collapse (catastrophic overfitting drops PGD
    accuracy to near zero within an epoch, while an eps ramp lowers it gradually). On a
    collapse the weights of the last good epoch are restored and training stops. The
    check runs at the budget the recipe is training at (``eps`` passed to :meth:`check`).
    """

    def __init__(self, *, norm: str, steps: int, drop: float) -> None:
        self.norm, self.steps, self.drop = norm, steps, drop
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.last_acc, self.last_epoch = -1.0, 0
        self.last_state: dict[str, torch.Tensor] = {}
        self.restored_epoch = 0

    def check(self, model: nn.Module, epoch: int, eps: float) -> dict[str, float]:
        """Run the check after ``epoch`` (0-based); returns metrics, restores on collapse."""
        if self.x is None or self.y is None or eps <= 0:
            return {}
        attack = PGD(model, eps=eps, norm=self.norm, steps=self.steps, seed=0,
                     precision=TRAINING_PRECISION)  # fmt: skip
        acc = 1.0 - float(attack.run(self.x, self.y).success.float().mean())
        metrics = {"guard_pgd_acc": acc, "guard_eps": eps}
        if self.last_acc >= 0 and acc < self.last_acc - self.drop:
            model.load_state_dict(self.last_state)
            self.restored_epoch = self.last_epoch
            log.warning(
                "catastrophic overfitting after epoch %d: held-out PGD-%d accuracy fell from "
                "%.3f to %.3f; restored the weights of epoch %d and stopped",
                epoch + 1, self.steps, self.last_acc, acc, self.last_epoch,
            )  # fmt: skip
            return metrics | {"guard_restored_epoch": float(self.last_epoch), "stop": 1.0}
        self.last_acc, self.last_epoch = acc, epoch + 1
        self.last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_acc": self.last_acc,
            "last_epoch": self.last_epoch,
            "restored_epoch": self.restored_epoch,
            "last_state": self.last_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_acc, self.last_epoch = state["last_acc"], state["last_epoch"]
        self.restored_epoch = state["restored_epoch"]
        self.last_state = dict(state["last_state"])


@RECIPES.register("fast")
class FastTraining(AdversarialRecipe):
    """FGSM with a uniform random start and a step of ``1.25 eps`` (Wong et al. 2020).

    ``delta ~ U(-eps, eps)``, ``delta <- clip_eps(delta + alpha sign(grad))``; train on
    ``x + delta``. The guard (Wong et al.'s early stopping) runs PGD on ``guard_size``
    training images held out from training after each epoch; when that accuracy
    collapses it restores the last good epoch's weights, stops, and logs it.

    Args:
        eps, norm, eps_ramp_epochs: see :class:`AdversarialRecipe`.
        step_size: alpha at the full eps (default ``1.25 * eps``); a large one (e.g.
            ``2 eps``) provokes catastrophic overfitting.
        guard: run the guard.
        guard_size: held-out training images for the guard.
        guard_steps: PGD iterations of the guard's check.
        guard_drop: accuracy drop from the previous check that counts as a collapse.
        **common: :class:`~robustlab.train.recipes.base.Recipe` options.

    Cost per step: one forward+input-backward pass, then one training pass.
    """

    def __init__(
        self,
        *,
        step_size: float | None = None,
        guard: bool = True,
        guard_size: int = 256,
        guard_steps: int = 10,
        guard_drop: float = 0.2,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if guard and (guard_size < 1 or guard_steps < 1 or not 0 < guard_drop <= 1):
            raise ConfigError("fast recipe: need guard_size >= 1, guard_steps >= 1, 0 < drop <= 1")
        self.step_size = 1.25 * self.eps if step_size is None else float(step_size)
        if step_size is not None and not float(step_size) > 0:
            raise ConfigError(f"fast recipe: step_size must be > 0, got {step_size}")
        self.holdout_size = guard_size if guard else 0
        self.guard = (
            OverfittingGuard(norm=self.norm, steps=guard_steps, drop=guard_drop) if guard else None
        )

    def set_holdout(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.guard is not None:
            self.guard.x, self.guard.y = x, y

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.pgd_example(model, x, y, steps=1, step_size=self.step_size, random_start=True)
        return self.train_on(model, x, y)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if self.guard is None:
            return {}
        self.progress = epoch + 1.0  # the budget reached at the end of this epoch
        metrics = self.guard.check(model, epoch, self.current_eps())
        if metrics.pop("stop", 0.0):
            self.stop_training = True
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"guard": self.guard.state_dict()} if self.guard is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.guard is not None and "guard" in state:
            self.guard.load_state_dict(state["guard"])

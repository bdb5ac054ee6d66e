"""Lipschitz-Margin Training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustlab.certify.training import LipschitzTracker
from robustlab.errors import ConfigError
from robustlab.train.recipes.base import RECIPES, AdversarialRecipe


@RECIPES.register("lmt")
class LMTTraining(AdversarialRecipe):
    """Cross-entropy on logits whose non-true classes are raised by the certified margin.

    Each step estimates the network's L2 Lipschitz bound L differentiably (one power
    iteration per weighted layer, persistent vectors, :class:`LipschitzTracker`) and
    trains on ``z_i + sqrt(2) c L`` for every ``i != y``: a correct prediction with a
    margin above ``sqrt(2) c L`` is certified at radius ``c``. With ``last_layer`` the
    addition is the tighter ``c L_sub ||w_y - w_i||`` (L_sub: the network before its last
    linear layer). ``c`` grows linearly from 0 over ``c_ramp_epochs``.

    Composes with adversarial training: with ``eps > 0`` the margin loss is taken on
    the PGD example of each batch (``steps`` iterations on the cross-entropy, within the
    ``norm`` ball), and with the SAT activations through the common ``activation``
    option. On mnist5k an MLP with MaxMin activations trains well at c = 1 where
    small_cnn's max-pooled convolutions collapse (BENCHMARKS.md, "Certification").

    Args:
        c: target radius (L2, pixel units); the paper's MNIST runs used c in 1..1000
            with their own scaling; here c is the radius itself.
        c_ramp_epochs: epochs over which c grows linearly from 0.
        last_layer: use the last-layer form (needs a model ending in ``nn.Linear``).
        eps, norm, eps_ramp_epochs: adversarial training budget (default 0: none),
            norm (default ``"l2"``) and ramp; see :class:`AdversarialRecipe`.
        steps: PGD iterations when ``eps > 0`` (step size ``2.5 eps / steps``).
        **common: :class:`~robustlab.train.recipes.base.Recipe` options (SAT...).
    """

    def __init__(
        self,
        *,
        c: float = 1.0,
        c_ramp_epochs: float = 0.0,
        last_layer: bool = True,
        eps: float = 0.0,
        norm: str = "l2",
        steps: int = 10,
        **common: Any,
    ) -> None:
        super().__init__(eps=eps, norm=norm, **common)
        if c < 0 or c_ramp_epochs < 0:
            raise ConfigError(f"lmt recipe: need c >= 0 and c_ramp_epochs >= 0, not {c}")
        if steps < 1:
            raise ConfigError(f"lmt recipe: steps must be >= 1, got {steps}")
        self.c, self.c_ramp_epochs, self.last_layer = float(c), float(c_ramp_epochs), last_layer
        self.steps = steps
        self.tracker: LipschitzTracker | None = None
        self._pending: dict[str, torch.Tensor] | None = None

    def current_c(self) -> float:
        if self.c_ramp_epochs <= 0:
            return self.c
        return self.c * min(1.0, self.progress / self.c_ramp_epochs)

    def _tracker(self, model: nn.Module, x: torch.Tensor) -> LipschitzTracker:
        if self.tracker is None:
            upto = "features" if self.last_layer else "output"
            self.tracker = LipschitzTracker(self.unwrap(model), tuple(x.shape[1:]), upto=upto)
            if self._pending is not None:
                self.tracker.load_state_dict(self._pending)
        return self.tracker

    def make_adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The PGD example of the batch (``x`` itself when ``eps`` is 0)."""
        return self.pgd_example(
            model, x, y, steps=self.steps, step_size=2.5 * self.eps / self.steps
        )

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        tracker = self._tracker(model, x)
        x = self.make_adversarial(model, x, y)
        with self.optimizing(model):
            logits = model(x)
            lip = tracker()
            c = self.current_c()
            if self.last_layer:
                w = tracker.last.weight  # type: ignore[union-attr]
                gap = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)  # ||w_y - w_i||
                shift = c * lip * gap
            else:
                shift = math.sqrt(2) * c * lip * torch.ones_like(logits)
            shift = shift.scatter(1, y[:, None], 0.0)
            loss = self.cross_entropy(logits + shift, y)
        out = {"loss": loss, "logits": logits, "lipschitz": lip.detach(), "c": torch.tensor(c)}
        if self.eps > 0:
            out["eps"] = torch.tensor(self.current_eps())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": dict(self.tracker.state_dict())} if self.tracker is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "vectors" in state:
            self._pending = dict(state["vectors"])
            if self.tracker is not None:
                self.tracker.load_state_dict(self._pending)

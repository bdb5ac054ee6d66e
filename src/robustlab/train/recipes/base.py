"""The recipe interface: what a training method tells a method-agnostic trainer.

A recipe owns everything specific to a method (how adversarial examples are made,
which loss, which model surgery); the trainer owns the loop, the optimiser, devices,
data parallelism, mixed precision, checkpoints and logging. Adding a method is one
new file that subclasses :class:`Recipe` and registers it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks import PGD
from robustlab.errors import ConfigError
from robustlab.nn.activations import SmoothGradReLU, make_activation
from robustlab.nn.swap import smooth_gradients, swap_activations
from robustlab.registry import Registry, check_options, check_types, init_hints, init_options

#: name -> Recipe subclass
RECIPES: Registry[Callable[..., Recipe]] = Registry("recipe")

#: the arithmetic of the attacks training runs (see ``Attack(precision=...)``): fp32, as
#: in every training result in BENCHMARKS.md; bf16 attacks (faster on CPUs with bf16
#: units) are measured for evaluation only, not for what they do to the trained model
TRAINING_PRECISION = "fp32"


class Recipe:
    """Base class of training methods.

    The trainer calls, in order: :meth:`prepare` once on the fresh model; per step,
    it sets :attr:`progress` and calls :meth:`loss`; after each epoch,
    :meth:`on_epoch_end`; at the end, :meth:`export` to get the plain inference model
    that is saved and evaluated.

    Smooth Adversarial Training (Xie, Tan, Gong, Yuille & Le, 2020) is an option of every
    recipe rather than a recipe of its own: ``activation`` swaps the model's ReLUs for a
    smooth function (SAT proper); ``smooth_grad`` keeps ReLU forward but back-propagates
    the parametric-softplus gradient, for the attacker (inner maximisation), the
    optimiser (outer minimisation) or both: the paper's ablation. Recipes make their
    adversarial examples inside :meth:`attacking` and their training pass inside
    :meth:`optimizing`, which is all the ablation needs.

    Args:
        label_smoothing: label smoothing of :meth:`cross_entropy` (from the trainer config).
        activation: swap every ReLU-family activation for this one (``"silu"``,
            ``"gelu"``, ``"softplus"``, ``"parametric_softplus"``, ``"elu"``,
            ``"smooth_relu"``...); ``None`` keeps the model's.
        smooth_grad: ``None``, ``"attacker"``, ``"optimizer"`` or ``"both"``: where ReLU's
            backward uses the gradient of ``parametric_softplus(smooth_grad_alpha)``.
        smooth_grad_alpha: alpha of that softplus (10 in the SAT paper).

    Attributes:
        progress: training progress in epochs (2.5 = half-way through the third epoch),
            for schedules inside a recipe (epsilon ramps, margin ramps).
        stop_training: a recipe sets this to end training early (e.g. a guard against
            catastrophic overfitting); the trainer stops after the current epoch.
        holdout_size: training images the recipe asks the trainer to hold out (never
            trained on) and hand over through :meth:`set_holdout` (0: none).
    """

    holdout_size: int = 0

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        activation: str | None = None,
        smooth_grad: str | None = None,
        smooth_grad_alpha: float = 10.0,
    ) -> None:
        if smooth_grad not in (None, "attacker", "optimizer", "both"):
            raise ConfigError(
                f"smooth_grad must be attacker, optimizer, both or null, got {smooth_grad!r}"
            )
        if smooth_grad is not None and activation not in (None, "relu"):
            raise ConfigError(
                "smooth_grad is ReLU forward with a smooth backward; it cannot be combined "
                f"with activation={activation!r}"
            )
        if activation is not None:
            make_activation(activation)  # unknown names fail at construction
        self.label_smoothing = label_smoothing
        self.activation = activation
        self.smooth_grad = smooth_grad
        self.smooth_grad_alpha = float(smooth_grad_alpha)
        self.progress = 0.0
        self.stop_training = False

    def prepare(self, model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
        """Model surgery before training: the SAT activation swap (subclasses add theirs).

        ``example`` (a small input batch) lets the swap be verified by running the model.
        """
        self._example = example  # export's swap back to ReLU is verified on it too
        if self.activation is not None:
            model = swap_activations(model, self.activation, example=example)
        if self.smooth_grad is not None:
            alpha = self.smooth_grad_alpha
            model = swap_activations(model, lambda: SmoothGradReLU(alpha), example=example)
        return model

    def attacking(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context for the inner maximisation (smooth ReLU gradients when asked)."""
        if self.smooth_grad is None:
            return contextlib.nullcontext()
        return smooth_gradients(self.unwrap(model), self.smooth_grad in ("attacker", "both"))

    def optimizing(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context for the training pass (smooth ReLU gradients when asked)."""
        if self.smooth_grad is None:
            return contextlib.nullcontext()
        return smooth_gradients(self.unwrap(model), self.smooth_grad in ("optimizer", "both"))

    def set_holdout(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Receive the held-out images asked for by :attr:`holdout_size` (pixels in [0, 1])."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step's loss.

        Args:
            model: the model in train mode (wrapped in DDP when data-parallel: call
                :meth:`unwrap` for passes that must not synchronise, such as attacks).
            x: pixels in [0, 1], (B, C, H, W).
            y: labels, (B,).

        Returns:
            A dict with ``loss`` (scalar to minimise) and ``logits`` (B, K) of the inputs
            the step trained on (adversarial ones for adversarial training), for the
            logged training accuracy; other scalar entries are logged as averages.
        """
        raise NotImplementedError

    def export(self, model: nn.Module) -> nn.Module:
        """The plain inference model to save (ReLU back in place of the smooth-gradient ReLU)."""
        if self.smooth_grad is not None:
            example = getattr(self, "_example", None)
            if example is not None:
                example = example.to(next(model.parameters()).device)
            model = swap_activations(model, "relu", example=example)
        return model

    def export_extras(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Extra tensor files to save next to the model: ``{file name: tensors}`` (default none).

        For state that must not be part of the inference model (AdvProp's auxiliary norms).
        """
        return {}

    def export_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Model description (``create_model`` arguments) that rebuilds :meth:`export`'s model.

        Recipes whose export changes the architecture (e.g. swapped activations) return
        the updated description; the default records the SAT activation.
        """
        if self.activation is None:
            return spec
        return {**spec, "kwargs": {**spec.get("kwargs", {}), "act": self.activation}}

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Hook after each epoch; returns extra metrics to log (default: none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Recipe state to checkpoint (tensors and JSON-able values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when resuming."""

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The model inside a DistributedDataParallel wrapper (or the model itself)."""
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def create_recipe(name: str, *, label_smoothing: float = 0.0, **options: Any) -> Recipe:
    """Instantiate a registered recipe, checking its options.

    Example:
        >>> recipe = create_recipe("standard", label_smoothing=0.1)
    """
    cls = RECIPES.get(name)
    check_options(recipe_options(cls), options, f"recipe {name!r}")
    required = [
        p.name for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in options
    ]  # fmt: skip
    if required:
        raise ConfigError(
            f"recipe {name!r} needs the option{'s' if len(required) > 1 else ''} "
            f"{', '.join(required)} (recipe.options in the config)"
        )
    options = check_types(init_hints(cls, Recipe), options, f"recipe {name!r}")
    return cls(label_smoothing=label_smoothing, **options)


def recipe_options(cls: type) -> list[str]:
    """Option names a recipe class accepts: its own and, through ``**common``, its bases'."""
    return [n for n in init_options(cls, Recipe) if n != "label_smoothing"]


class AdversarialRecipe(Recipe):
    """Base of recipes that train against a perturbation budget ``eps`` (pixel units).

    Args:
        eps: the budget (MNIST: 0.3, CIFAR-10: 8/255 in the papers).
        norm: ``"linf"`` or ``"l2"``.
        eps_ramp_epochs: epochs over which eps grows linearly from 0 (0: none). Small
            MNIST networks can stay at chance for several epochs without it.
        **common: :class:`Recipe` options (label smoothing, SAT).
    """

    def __init__(
        self,
        *,
        eps: float = 0.3,
        norm: str = "linf",
        eps_ramp_epochs: float = 0.0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not eps >= 0 or not eps_ramp_epochs >= 0:
            raise ConfigError(f"need eps, eps_ramp_epochs >= 0, not {eps}, {eps_ramp_epochs}")
        if norm not in ("linf", "l2"):
            raise ConfigError(f"norm must be 'linf' or 'l2', got {norm!r}")
        self.eps, self.norm, self.eps_ramp_epochs = float(eps), norm, float(eps_ramp_epochs)

    def ramp(self) -> float:
        """Fraction of the full budget in use now (1 after the ramp)."""
        if self.eps_ramp_epochs <= 0:
            return 1.0
        return min(1.0, self.progress / self.eps_ramp_epochs)

    def current_eps(self) -> float:
        return self.eps * self.ramp()

    def pgd_example(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        steps: int,
        step_size: float,
        **options: Any,
    ) -> torch.Tensor:
        """PGD at the current eps inside :meth:`attacking` (``x`` itself while eps is 0).

        ``step_size`` is the step at the full eps; it is scaled with the ramp.
        """
        eps = self.current_eps()
        if eps == 0:
            return x
        options.setdefault("precision", TRAINING_PRECISION)
        attack = PGD(
            self.unwrap(model), eps=eps, steps=steps, step_size=step_size * self.ramp(),
            norm=self.norm, **options,
        )  # fmt: skip
        with self.attacking(model):
            return attack(x, y)

    def train_on(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The outer minimisation on the adversarial batch: cross-entropy, logged eps."""
        with self.optimizing(model):
            logits = model(x_adv)
            loss = self.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits, "eps": torch.tensor(self.current_eps())}

"""The recipe interface: what a training method tells a method-agnostic trainer.

A recipe owns everything specific to a method (how adversarial examples are made,
which loss, which model surgery); the trainer owns the loop, the optimiser, devices,
data parallelism, mixed precision, checkpoints and logging. Adding a method is one
new file that subclasses :class:`Recipe` and registers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.registry import Registry, check_kwargs

#: name -> Recipe subclass
RECIPES: Registry[Callable[..., Recipe]] = Registry("recipe")


class Recipe:
    """Base class of training methods.

    The trainer calls, in order: :meth:`prepare` once on the fresh model; per step,
    it sets :attr:`progress` and calls :meth:`loss`; after each epoch,
    :meth:`on_epoch_end`; at the end, :meth:`export` to get the plain inference model
    that is saved and evaluated.

    Args:
        label_smoothing: label smoothing of :meth:`cross_entropy` (from the trainer config).

    Attributes:
        progress: training progress in epochs (2.5 = half-way through the third epoch),
            for schedules inside a recipe (epsilon ramps, margin ramps).
        stop_training: a recipe sets this to end training early (e.g. a guard against
            catastrophic overfitting); the trainer stops after the current epoch.
    """

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing
        self.progress = 0.0
        self.stop_training = False

    def prepare(self, model: nn.Module) -> nn.Module:
        """Model surgery before training (default: none)."""
        return model

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
        """The plain inference model to save (default: the model itself)."""
        return model

    def export_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Model description (``create_model`` arguments) that rebuilds :meth:`export`'s model.

        Recipes whose export changes the architecture (e.g. swapped activations) return
        the updated description; the default is unchanged.
        """
        return spec

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
    check_kwargs(cls, options, f"recipe {name!r}")
    return cls(label_smoothing=label_smoothing, **options)

"""Activation functions by name, so every zoo model takes ``act=`` as an argument.

Smooth Adversarial Training (a later recipe) swaps these; keeping them as modules,
one instance per use, is what makes a model's activations replaceable.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from robustlab.registry import Registry

#: name -> zero-argument factory returning a fresh activation module
ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")

ACTIVATIONS.register("relu")(lambda: nn.ReLU(inplace=False))
ACTIVATIONS.register("leaky_relu")(lambda: nn.LeakyReLU(0.1))
ACTIVATIONS.register("softplus")(lambda: nn.Softplus())
ACTIVATIONS.register("silu")(lambda: nn.SiLU())
ACTIVATIONS.register("gelu")(lambda: nn.GELU())
ACTIVATIONS.register("elu")(lambda: nn.ELU())
ACTIVATIONS.register("tanh")(lambda: nn.Tanh())
ACTIVATIONS.register("sigmoid")(lambda: nn.Sigmoid())

ActSpec = str | Callable[[], nn.Module]


def make_activation(act: ActSpec) -> nn.Module:
    """A new activation module from a registered name or a zero-argument factory."""
    if callable(act):
        return act()
    return ACTIVATIONS.get(act)()

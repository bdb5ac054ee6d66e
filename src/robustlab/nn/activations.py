"""Activation functions by name, so every zoo model takes ``act=`` as an argument.

Smooth Adversarial Training (Xie, Tan, Gong, Yuille & Le, 2020) replaces ReLU by smooth
activations; keeping activations as modules, one instance per use, is what makes a
model's activations replaceable (:func:`robustlab.nn.swap_activations`).

A name may carry options: ``"parametric_softplus:alpha=5"``, ``"leaky_relu:slope=0.2"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.errors import ConfigError
from robustlab.registry import Registry, check_kwargs

#: name -> factory returning a fresh activation module (keyword options allowed)
ACTIVATIONS: Registry[Callable[..., nn.Module]] = Registry("activation")


class ParametricSoftplus(nn.Module):
    """``log(1 + exp(alpha x)) / alpha``: softplus sharpened towards ReLU (SAT, Xie et al. 2020).

    Its derivative is ``sigmoid(alpha x)``; ``alpha -> inf`` gives ReLU. The SAT paper
    uses ``alpha = 10``.
    """

    def __init__(self, alpha: float = 10.0) -> None:
        super().__init__()
        if alpha <= 0:
            raise ConfigError(f"parametric_softplus needs alpha > 0, got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x, beta=self.alpha, threshold=20.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class SmoothReLU(nn.Module):
    """SAT's smooth ReLU: ``x - log(1 + beta x) / beta`` for ``x >= 0``, else 0.

    Continuous with a continuous derivative ``beta x / (1 + beta x)`` (0 at the origin,
    tending to 1). ``beta`` is learned as ``s**2`` with ``s`` initialised to ``sqrt_beta``
    (20 in the official code, i.e. beta = 400).
    """

    def __init__(self, sqrt_beta: float = 20.0, learnable: bool = True) -> None:
        super().__init__()
        s = torch.tensor(float(sqrt_beta))
        if learnable:
            self.sqrt_beta = nn.Parameter(s)
        else:
            self.register_buffer("sqrt_beta", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.sqrt_beta.square().clamp_min(1e-6)
        pos = x.clamp_min(0)
        return pos - torch.log1p(beta * pos) / beta


class _ReLUSmoothGrad(torch.autograd.Function):
    """ReLU forward; backward, ParametricSoftplus(alpha)'s derivative ``sigmoid(alpha x)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(ctx.alpha * x), None


class SmoothGradReLU(nn.Module):
    """ReLU whose backward pass can use the parametric-softplus gradient instead.

    The forward value is always ReLU's. With :attr:`smooth` set, gradients are those of
    ``ParametricSoftplus(alpha)``: SAT's ablation that separates "a better gradient for
    the attacker" from "a better gradient for the optimiser" (:func:`smooth_gradients`
    toggles it for the attack and the weight update separately).
    """

    def __init__(self, alpha: float = 10.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.smooth = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth and torch.is_grad_enabled():
            return _ReLUSmoothGrad.apply(x, self.alpha)
        return F.relu(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class MaxMin(nn.Module):
    """GroupSort with groups of two (Anil, Lucas & Grosse, ICML 2019): channel pairs
    ``(a, b)`` become ``(max(a, b), min(a, b))``.

    Pairs are channel ``i`` and ``i + C/2`` (dimension 1; C must be even). On each input
    region the map is a permutation, so it is 1-Lipschitz in L2 and preserves gradient
    norms, where ReLU halves them: a product of per-layer bounds can then be nearly
    tight, which is what Lipschitz-margin training needs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % 2:
            shape = tuple(x.shape)
            raise ConfigError(f"maxmin needs an even number of channels, got shape {shape}")
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


ACTIVATIONS.register("relu")(lambda: nn.ReLU(inplace=False))
ACTIVATIONS.register("leaky_relu")(lambda slope=0.1: nn.LeakyReLU(slope))
ACTIVATIONS.register("softplus")(lambda: nn.Softplus())
ACTIVATIONS.register("parametric_softplus")(ParametricSoftplus)
ACTIVATIONS.register("smooth_relu")(SmoothReLU)
ACTIVATIONS.register("silu")(lambda: nn.SiLU())
ACTIVATIONS.register("gelu")(lambda: nn.GELU())
ACTIVATIONS.register("elu")(lambda: nn.ELU())
ACTIVATIONS.register("tanh")(lambda: nn.Tanh())
ACTIVATIONS.register("sigmoid")(lambda: nn.Sigmoid())
ACTIVATIONS.register("maxmin")(MaxMin)

ActSpec = str | Callable[[], nn.Module]


def parse_activation(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,key=value"`` into the name and its (numeric or bool) options."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"activation {spec!r}: options are written key=value, got {item!r}")
        value = value.strip()
        if value.lower() in ("true", "false"):
            options[key.strip()] = value.lower() == "true"
        else:
            try:
                options[key.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"activation {spec!r}: {key}={value} is not a number") from None
    return name.strip(), options


def make_activation(act: ActSpec) -> nn.Module:
    """A new activation module from a registered name (options allowed) or a factory.

    Example:
        >>> make_activation("parametric_softplus:alpha=5")
        ParametricSoftplus(alpha=5.0)
    """
    if isinstance(act, nn.Module):
        raise ConfigError(
            f"pass an activation name or a factory (lambda: {type(act).__name__}()), not a "
            f"module instance ({type(act).__name__}): each layer needs its own module"
        )
    if callable(act):
        return act()
    name, options = parse_activation(act)
    factory = ACTIVATIONS.get(name)
    check_kwargs(factory, options, f"activation {name!r}")
    return factory(**options)

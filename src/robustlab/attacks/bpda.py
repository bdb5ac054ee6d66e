"""BPDA: Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner, ICML 2018)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class BPDA(nn.Module):
    """Run a non-differentiable transform forward; differentiate through an approximation.

    ``forward(x)`` returns exactly ``transform(x)``. Its gradient is that of ``approx``
    (default: the identity, i.e. straight-through), so gradient attacks see useful
    gradients through quantisation, JPEG, median filters and the like. Put it in front
    of the classifier; every gradient attack then works unchanged.

    Args:
        transform: the preprocessing, any function of a batch (run without gradients).
        approx: a differentiable stand-in with ``approx(x) ~ transform(x)``
            (default: identity).

    Example:
        >>> squeeze = lambda x: torch.round(x * 7) / 7            # 3-bit depth
        >>> defended = nn.Sequential(BPDA(squeeze), classifier)
        >>> x_adv = PGD(defended, eps=0.3)(x, y)                  # adaptive attack
    """

    def __init__(
        self,
        transform: Callable[[torch.Tensor], torch.Tensor],
        approx: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.transform, self.approx = transform, approx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.transform(x)
        surrogate = x if self.approx is None else self.approx(x)
        if out.shape != surrogate.shape:
            raise ValueError(
                f"BPDA: transform gives shape {tuple(out.shape)} but the approximation "
                f"{tuple(surrogate.shape)}; pass an approx with the transform's output shape"
            )
        # value of `out`, gradient of `surrogate`
        return surrogate + (out - surrogate).detach()

"""Feature squeezing: bit-depth reduction and median smoothing.

Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
Networks", NDSS 2018. Both squeezers shrink the input space an attacker can use; Xu et
al. use them as a *detector* (:class:`~robustlab.defenses.detector.SqueezeDetector`),
Guo et al. (ICLR 2018) and others as a preprocessing defense. Athalye, Carlini & Wagner
(ICML 2018) show that bit-depth reduction falls to BPDA, which is why
:class:`BitDepth` declares itself non-differentiable and offers a smooth surrogate.

This module also holds :func:`check_pixels`, the input check every defense in
robustlab.defenses runs first.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from robustlab.defenses.base import DEFENSES, Defense, DefenseInputError, check_pixels
from robustlab.errors import ConfigError


@DEFENSES.register("bitdepth")
class BitDepth(Defense):
    """Bit-depth reduction: each pixel rounded to one of ``2**bits`` evenly spaced levels.

    ``transform(x) = round(x * L) / L`` with ``L = 2**bits - 1`` (Xu et al. 2018, Sec. IV-A;
    ``torch.round`` rounds halves to even, as ``numpy.rint`` in their code). Xu et al.
    squeeze MNIST to 1 bit. The rounding has zero gradient almost everywhere, so the
    defense is declared non-differentiable: a naive gradient attack sees nothing and
    an adaptive one uses BPDA (Athalye et al. 2018) through :meth:`surrogate`.

    Surrogate: a soft staircase, the sum of one sigmoid per rounding threshold,
    ``q(x) = (1/L) * sum_j sigmoid((x*L - j - 1/2) / temperature)``, ``j = 0..L-1``
    (``temperature`` in units of the quantisation step). It tends to the forward as the
    temperature goes to 0; at ``temperature = 0.1`` it differs from the forward by at most
    ``0.5001 / L`` (the value 1/2 exactly at a threshold) and by ``0.14 / L`` on average
    over uniform pixels (the identity: ``0.25 / L``); its gradient is ``2.5`` at a threshold
    and about ``0.13`` at a level, never zero. Only thresholds within
    ``ceil(10 * temperature) + 1`` steps of ``x`` are summed (the rest are 0 or 1 to 5e-5).

    Args:
        bits: bits per pixel, 1..8.
        temperature: softness of the surrogate's steps (> 0), in quantisation steps.

    Shapes: (B, C, H, W) in [0, 1] -> (B, C, H, W) in [0, 1], same dtype and device.

    Example:
        >>> squeeze = create_defense("bitdepth:bits=1")
        >>> squeeze(torch.tensor([0.2, 0.5, 0.7]).view(1, 1, 1, 3)).flatten()
        tensor([0., 0., 1.])
    """

    name = "bitdepth"
    randomized = False
    differentiable = False

    def __init__(self, bits: int = 5, temperature: float = 0.1) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConfigError(f"bitdepth: bits must be an integer in 1..8, got {bits!r}")
        if not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0
        ):
            raise ConfigError(
                f"bitdepth: temperature must be a finite number > 0, got {temperature!r}"
            )
        self.bits = bits
        self.temperature = float(temperature)

    @property
    def levels(self) -> int:
        """``L = 2**bits - 1``: the largest level index (``L + 1`` levels)."""
        return 2**self.bits - 1

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        check_pixels(x, self.name)
        L = self.levels
        return torch.round(x * L) / L

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        L, T = self.levels, self.temperature
        t = x * L
        nearest = torch.round(t).detach()
        window = math.ceil(10 * T) + 1
        # thresholds j + 1/2 with j < nearest - window lie well below t: each counts 1
        out = torch.clamp(nearest - window, 0, L)
        for m in range(-window, window):
            j = nearest + m
            step = torch.sigmoid((t - j - 0.5) / T)
            out = out + torch.where((j >= 0) & (j <= L - 1), step, torch.zeros_like(step))
        return out / L

    def options(self) -> dict[str, Any]:
        return {"bits": self.bits, "temperature": self.temperature}


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by half-sample symmetric reflection
    (scipy's ``mode='reflect'``, numpy's ``'symmetric'``: ``d c b a | a b c d | d c b a``)."""
    i = torch.arange(-before, n + after, device=device)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= n, 2 * n - 1 - i, i)


@DEFENSES.register("median")
class MedianSmoothing(Defense):
    """Median smoothing over a ``size x size`` window, per channel (Xu et al. 2018, Sec. IV-B).

    Xu et al. use 2x2 and 3x3 windows (MNIST: 2x2) through ``scipy.ndimage.median_filter``
    with ``mode='reflect'``; this transform equals that filter exactly (tested):

    - borders: half-sample symmetric reflection (``d c b a | a b c d | d c b a``);
    - window anchor (scipy's ``origin=0``): the window covers rows and columns
      ``i - size // 2 .. i + (size - 1) // 2``; for an even size it reaches one pixel
      further *up and left* (a 2x2 window holds pixels ``(i-1..i, j-1..j)``);
    - even windows (an even number of values) take the *upper* of the two middle
      values (scipy's rank ``size*size // 2``), not ``torch.median``'s lower one.

    The median selects one input value per output, so PyTorch differentiates it, but
    the gradient is sparse (one pixel per window). The defense is declared differentiable
    and its :meth:`surrogate` is the identity: inside :func:`bpda_mode` the attack gets
    the straight-through gradient instead of the sparse one.

    Args:
        size: window side, >= 2 (1 would be the identity); images must be at least this big.

    Shapes: (B, C, H, W) in [0, 1] -> (B, C, H, W) in [0, 1], same dtype and device.

    Example:
        >>> smooth = create_defense("median:size=2")
        >>> x_smooth = smooth(x)
    """

    name = "median"
    randomized = False
    differentiable = True

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ConfigError(f"median: size must be an integer >= 2, got {size!r}")
        self.size = size

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        check_pixels(x, self.name)
        k = self.size
        B, C, H, W = x.shape
        if min(H, W) < k:
            raise DefenseInputError(
                f"median: a {k}x{k} window needs images of at least {k}x{k}, got {H}x{W}"
            )
        before, after = k // 2, (k - 1) // 2
        padded = x.index_select(2, _reflect_index(H, before, after, x.device))
        padded = padded.index_select(3, _reflect_index(W, before, after, x.device))
        windows = padded.unfold(2, k, 1).unfold(3, k, 1).reshape(B, C, H, W, k * k)
        return windows.kthvalue(k * k // 2 + 1, dim=-1).values

    def options(self) -> dict[str, Any]:
        return {"size": self.size}

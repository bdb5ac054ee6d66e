"""Gaussian noise injection at the input.

Adds ``sigma * N(0, I)`` to the pixels before the model, as the input noise layer of
random self-ensemble (Liu, Cheng, Zhang & Hsieh, "Towards robust neural networks via
random self-ensemble", ECCV 2018) and the base classifier of randomized smoothing
(Cohen, Rosenfeld & Kolter, ICML 2019). A fresh draw every forward makes the model
randomized, so an adaptive attack averages gradients over draws (EOT; Athalye,
Engstrom, Ilyas & Kwok 2018). The transform is differentiable: the gradient of the
output with respect to the input is 1 where the noisy pixel lies inside [0, 1] and 0
where it is clamped.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from robustlab.defenses.base import DEFENSES, Defense, check_pixels
from robustlab.errors import ConfigError


@DEFENSES.register("noise")
class GaussianNoise(Defense):
    """Gaussian noise injection: ``clamp(x + sigma * N(0, I), 0, 1)``.

    Randomness comes from torch's global generator (``torch.manual_seed`` reproduces a
    draw); one independent draw per element and per call.

    Args:
        sigma: standard deviation of the noise, in pixel units (pixels in [0, 1]). The
            default 0.25 is one of the noise levels of Cohen et al. (2019); Liu et al.
            (2018) inject about 0.2 at the input of their CIFAR-10 networks (unverified).
        clip: clamp the noisy pixels to [0, 1] (default True). With ``clip=False`` the
            output leaves [0, 1], as in the randomized-smoothing papers; the model must
            accept such inputs.

    Shapes:
        Input (B, C, H, W) pixels in [0, 1] (anything else is a DefenseInputError);
        output the same shape, dtype and device.

    Example:
        >>> defended = defend(model, ["noise:sigma=0.25"])
    """

    name = "noise"
    randomized = True
    differentiable = True

    def __init__(self, sigma: float = 0.25, clip: bool = True) -> None:
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
            raise ConfigError(f"noise: sigma must be a number, got {sigma!r}")
        if not math.isfinite(sigma) or sigma < 0:
            raise ConfigError(f"noise: sigma must be a finite number >= 0, got {sigma!r}")
        if not isinstance(clip, bool):
            raise ConfigError(f"noise: clip must be true or false, got {clip!r}")
        self.sigma = float(sigma)
        self.clip = clip

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        check_pixels(x.detach(), self.name)
        noisy = x + self.sigma * torch.randn_like(x)
        return noisy.clamp(0.0, 1.0) if self.clip else noisy

    def options(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "clip": self.clip}

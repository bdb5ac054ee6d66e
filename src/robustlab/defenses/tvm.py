"""Total-variation minimisation (TVM) with random pixel dropout.

Guo, Rana, Cisse & van der Maaten, "Countering adversarial images using input
transformations", ICLR 2018: drop pixels at random and reconstruct the "simplest" image
consistent with the pixels kept, by minimising, per image and channel,

    E(z) = ||keep * (z - x)||_2^2 + weight * TV(z)

where ``keep`` is a Bernoulli(keep_prob) mask (1 = pixel kept). The paper writes the
unsquared norm; its released solver (a masked Bregman iteration, also used by Athalye,
Carlini & Wagner's 2018 re-implementation with keep probability 0.5 and lambda_TV 0.03;
solver and numbers from memory, unverified) minimises the squared one, as here.

The solver is documented and deterministic given the mask:

- TV is the isotropic total variation with forward differences (zero across the last
  row and column), smoothed so that it is differentiable:
  ``TV(z) = sum_ij sqrt(dh_ij^2 + dv_ij^2 + s^2) - s`` with ``s = SMOOTHING`` (0.01).
- Dropped pixels start at the mean of the kept pixels in their 3x3 neighbourhood (the
  mean of all kept pixels of that channel where none is near, 0.5 where none is kept),
  kept pixels at their value; nothing of a dropped pixel's value enters the result.
- Then ``iterations`` steps of monotone FISTA (MFISTA: Beck & Teboulle, "Fast
  gradient-based algorithms for constrained total variation image denoising and
  deblurring problems", IEEE TIP 2009): accelerated projected gradient steps onto
  [0, 1] with step ``1 / L``, ``L = 2 + 8 * weight / s``, an upper bound of the
  Lipschitz constant of the gradient of E (the smoothed TV's Hessian is at most 1/s
  times ||D||^2 <= 8); each image channel keeps the new point only where it does not
  raise E, so E never increases from one iteration to the next. The projection onto
  [0, 1] loses nothing: for x in [0, 1], clamping z to [0, 1] raises neither term.

The transform is randomized (the mask; EOT) and, being an iterative solver, treated as
non-differentiable: its surrogate is the identity (BPDA's straight-through estimate,
which Athalye et al. used to break TVM together with EOT).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from robustlab.defenses.base import DEFENSES, Defense, check_pixels
from robustlab.errors import ConfigError

#: s in the smoothed total variation sqrt(dh^2 + dv^2 + s^2) - s (pixel units)
SMOOTHING = 0.01


def _initial(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept pixels as they are; dropped ones at the mean of their kept 3x3 neighbours."""
    kx = keep * x
    near_sum = F.avg_pool2d(kx, 3, stride=1, padding=1)
    near_count = F.avg_pool2d(keep.expand_as(x).contiguous(), 3, stride=1, padding=1)
    count = keep.expand_as(x).sum(dim=(2, 3), keepdim=True)
    channel_mean = torch.where(
        count > 0, kx.sum(dim=(2, 3), keepdim=True) / count.clamp_min(1), 0.5
    )
    fill = torch.where(near_count > 0, near_sum / near_count.clamp_min(1e-12), channel_mean)
    return kx + (1 - keep) * fill


def _differences(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along W and H, zero across the last column and row."""
    dh = F.pad(z[..., :, 1:] - z[..., :, :-1], (0, 1))
    dv = F.pad(z[..., 1:, :] - z[..., :-1, :], (0, 0, 0, 1))
    return dh, dv


def _tv_gradient(z: torch.Tensor, s: float) -> torch.Tensor:
    """Gradient of the smoothed isotropic TV: D^T (Dz / sqrt(|Dz|^2 + s^2))."""
    dh, dv = _differences(z)
    mag = torch.sqrt(dh * dh + dv * dv + s * s)
    ph, pv = dh / mag, dv / mag
    return F.pad(ph[..., :, :-1], (1, 0)) - ph + F.pad(pv[..., :-1, :], (0, 0, 1, 0)) - pv


def _energy(
    z: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, weight: float, s: float
) -> torch.Tensor:
    """E per image and channel, (B, C, 1, 1)."""
    dh, dv = _differences(z)
    tv = (torch.sqrt(dh * dh + dv * dv + s * s) - s).sum((2, 3), keepdim=True)
    data = (keep * (z - x)).square().sum((2, 3), keepdim=True)
    return data + weight * tv


def reconstruct(
    x: torch.Tensor,
    keep: torch.Tensor,
    weight: float = 0.03,
    iterations: int = 50,
    smoothing: float = SMOOTHING,
) -> torch.Tensor:
    """Minimise ``||keep * (z - x)||^2 + weight * TV(z)`` per image and channel (MFISTA).

    Args:
        x: pixels in [0, 1], (B, C, H, W).
        keep: 1 where a pixel is kept, 0 where it is dropped; broadcastable to ``x``
            ((B, 1, H, W) shares the mask across channels).
        weight: lambda_TV.
        iterations: solver steps (0 gives the initial fill).
        smoothing: s of the smoothed TV.

    Returns:
        The reconstruction, (B, C, H, W) in [0, 1], in the dtype of ``x`` (the solver
        runs in float32 at least).
    """
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xs = x.detach().to(work)
    m = keep.detach().to(work)
    step = 1.0 / (2.0 + 8.0 * weight / smoothing)
    z = y = _initial(xs, m)
    energy = _energy(z, xs, m, weight, smoothing)
    t = 1.0
    for _ in range(iterations):
        grad = 2.0 * m * (y - xs) + weight * _tv_gradient(y, smoothing)
        u = (y - step * grad).clamp(0.0, 1.0)
        u_energy = _energy(u, xs, m, weight, smoothing)
        better = u_energy <= energy
        z_new = torch.where(better, u, z)
        energy = torch.where(better, u_energy, energy)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = z_new + (t / t_new) * (u - z_new) + ((t - 1.0) / t_new) * (z_new - z)
        z, t = z_new, t_new
    return z.to(x.dtype)


@DEFENSES.register("tvm")
class TotalVariationMinimization(Defense):
    """Random pixel dropout and total-variation reconstruction (Guo et al., ICLR 2018).

    A fresh Bernoulli(``keep_prob``) mask per image and pixel location (shared by the
    channels, as in Athalye et al.'s re-implementation; the paper's notation draws one
    per channel too) from torch's global generator, then :func:`reconstruct`.

    Args:
        keep_prob: probability that a pixel is kept, in (0, 1] (default 0.5; 1 keeps
            every pixel and makes the defense a deterministic TV denoiser).
        weight: lambda_TV, the weight of the total variation against the squared error
            on kept pixels (default 0.03).
        iterations: steps of the solver (default 50).

    Shapes:
        Input (B, C, H, W) pixels in [0, 1]; output the same shape, dtype and device,
        in [0, 1].

    Example:
        >>> defended = defend(model, ["tvm:keep_prob=0.5:weight=0.03"])
        >>> with bpda_mode(defended):  # straight-through gradients; add EOT for the mask
        ...     x_adv = attack(defended, x, y)
    """

    name = "tvm"
    randomized = True
    differentiable = False

    def __init__(self, keep_prob: float = 0.5, weight: float = 0.03, iterations: int = 50) -> None:
        super().__init__()
        for key, value in (("keep_prob", keep_prob), ("weight", weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"tvm: {key} must be a number, got {value!r}")
        if not 0 < keep_prob <= 1:
            raise ConfigError(f"tvm: keep_prob must be in (0, 1], got {keep_prob!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"tvm: weight must be a finite number >= 0, got {weight!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"tvm: iterations must be an integer >= 1, got {iterations!r}")
        self.keep_prob = float(keep_prob)
        self.weight = float(weight)
        self.iterations = iterations

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        check_pixels(x.detach(), self.name)
        b, _, h, w = x.shape
        keep = torch.rand(b, 1, h, w, device=x.device) < self.keep_prob
        return reconstruct(x, keep, self.weight, self.iterations)

    def options(self) -> dict[str, Any]:
        return {"keep_prob": self.keep_prob, "weight": self.weight, "iterations": self.iterations}

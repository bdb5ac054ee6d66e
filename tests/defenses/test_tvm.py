"""Total-variation minimisation with pixel dropout (robustlab.defenses.tvm)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import robustlab.defenses.tvm  # noqa: F401  (registers "tvm")
from robustlab.defenses.base import bpda_mode, create_defense, defend
from robustlab.defenses.tvm import SMOOTHING, TotalVariationMinimization, reconstruct
from robustlab.errors import ConfigError, RobustlabError


def objective(z, x, keep, weight, s=SMOOTHING) -> float:
    """||keep * (z - x)||^2 + weight * smoothed isotropic TV, in numpy (independent)."""
    z, x = z.double().numpy(), x.double().numpy()
    keep = np.broadcast_to(keep.double().numpy(), x.shape)
    dh = np.zeros_like(z)
    dh[..., :, :-1] = np.diff(z, axis=-1)
    dv = np.zeros_like(z)
    dv[..., :-1, :] = np.diff(z, axis=-2)
    return float(
        ((keep * (z - x)) ** 2).sum() + weight * (np.sqrt(dh**2 + dv**2 + s * s) - s).sum()
    )


def total_variation(z) -> float:
    z = z.double().numpy()
    return float(np.abs(np.diff(z, axis=-1)).sum() + np.abs(np.diff(z, axis=-2)).sum())


def two_regions(channels=1, size=16) -> torch.Tensor:
    x = torch.full((1, channels, size, size), 0.2, dtype=torch.float64)
    x[..., size // 2 :] = 0.8
    return x


def test_piecewise_constant_image_keeps_its_edge():
    x = two_regions(channels=3)
    z = TotalVariationMinimization(keep_prob=1.0, weight=0.03)(x)
    # ROF shifts each flat region by about weight * edge / (2 * area) = 0.002; no blur
    assert float((z - x).abs().max()) < 0.01
    assert float((z[..., 8] - z[..., 7]).min()) > 0.58


def test_small_weight_converges_to_the_input():
    x, keep = torch.rand(1, 3, 12, 12, dtype=torch.float64), torch.ones(1, 1, 12, 12)
    for weight in (1e-2, 1e-3, 1e-4):
        z = reconstruct(x, keep, weight, iterations=50)
        # at the minimiser |z - x| <= weight * (2 + sqrt 2) / 2 per pixel
        assert float((z - x).abs().max()) <= 1.75 * weight


def test_objective_never_increases_and_reaches_the_minimum():
    torch.manual_seed(0)
    x = (two_regions(channels=2, size=10) + 0.1 * torch.randn(1, 2, 10, 10)).clamp(0, 1)
    keep = (torch.rand(1, 1, 10, 10) < 0.5).double()
    weight = 0.1
    values = [objective(reconstruct(x, keep, weight, k), x, keep, weight) for k in range(25)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))
    assert values[-1] < 0.8 * values[0]
    # an independent minimiser of the same objective (L-BFGS in float64) agrees
    v = torch.full_like(x, 0.5, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=3000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        dh = nn.functional.pad(v[..., :, 1:] - v[..., :, :-1], (0, 1))
        dv = nn.functional.pad(v[..., 1:, :] - v[..., :-1, :], (0, 0, 0, 1))
        tv = (torch.sqrt(dh**2 + dv**2 + SMOOTHING**2) - SMOOTHING).sum()
        e = ((keep * (v - x)) ** 2).sum() + weight * tv
        e.backward()
        return e

    opt.step(closure)
    best = objective(v.detach(), x, keep, weight)
    z = reconstruct(x, keep, weight, iterations=200)
    assert objective(z, x, keep, weight) <= best * (1 + 1e-4)
    assert float((z - v.detach()).abs().max()) < 0.02


def test_reduces_the_total_variation_of_a_noisy_image():
    torch.manual_seed(0)
    clean = two_regions(channels=3)
    noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
    z = TotalVariationMinimization(keep_prob=1.0, weight=0.1)(noisy)
    assert total_variation(z) < 0.4 * total_variation(noisy)
    assert float((z - clean).abs().mean()) < 0.5 * float((noisy - clean).abs().mean())


def test_dropped_pixels_do_not_matter_and_kept_ones_are_kept():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    keep = (torch.rand(2, 1, 12, 12) < 0.5).double()
    z = reconstruct(x, keep, weight=1e-4, iterations=30)
    other = torch.where(keep.bool(), x, torch.rand_like(x))  # new values where dropped
    assert torch.equal(reconstruct(other, keep, weight=1e-4, iterations=30), z)
    kept = keep.bool().expand_as(x)
    assert float((z - x)[kept].abs().max()) < 1e-3
    assert float((z - x)[~kept].abs().mean()) > 0.1  # filled in, not copied


def test_the_mask_keeps_keep_prob_of_the_pixel_locations_for_all_channels():
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    torch.manual_seed(3)
    z = TotalVariationMinimization(keep_prob=0.3, weight=1e-4, iterations=20)(x)
    torch.manual_seed(3)
    kept = (torch.rand(4, 1, 16, 16) < 0.3).expand_as(x)  # from the global generator
    assert abs(float(kept.double().mean()) - 0.3) < 0.05  # binomial std 0.01
    close = (z - x).abs() < 1e-3
    assert bool(close[kept].all())  # every channel of a kept location is kept
    assert float(close[~kept].double().mean()) < 0.02  # dropped ones are filled in


def test_seeded_randomness_is_reproducible_and_draws_differ():
    d, x = TotalVariationMinimization(iterations=5), torch.rand(2, 3, 10, 10)
    torch.manual_seed(7)
    a, b = d(x), d(x)
    torch.manual_seed(7)
    assert torch.equal(d(x), a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_shape_dtype_device_and_range(channels, dtype):
    x = torch.rand(2, channels, 9, 7, dtype=dtype)
    out = TotalVariationMinimization(iterations=5)(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1


def test_spec_rebuilds_an_equal_defense_and_declarations():
    for d in (TotalVariationMinimization(), TotalVariationMinimization(1, 1e-5, 3)):
        again = create_defense(d.spec())
        assert type(again) is TotalVariationMinimization and again.options() == d.options()
    assert TotalVariationMinimization().options() == {
        "keep_prob": 0.5, "weight": 0.03, "iterations": 50,
    }  # fmt: skip
    assert TotalVariationMinimization.name == "tvm" and TotalVariationMinimization.randomized
    assert not TotalVariationMinimization.differentiable


@pytest.mark.parametrize(
    "spec, words",
    [
        ("tvm:keep_prob=0", "keep_prob must be in (0, 1]"),
        ("tvm:keep_prob=1.5", "keep_prob must be in (0, 1]"),
        ("tvm:weight=-1", "weight must be a finite number >= 0"),
        ("tvm:iterations=0", "iterations must be an integer >= 1"),
        ("tvm:iterations=2.5", "iterations"),
        ("tvm:lambda=0.1", "tvm"),
    ],
)
def test_bad_options_are_one_clear_line(spec, words):
    with pytest.raises(ConfigError) as err:
        create_defense(spec)
    assert words in str(err.value) and "\n" not in str(err.value)
    for bad in ({"keep_prob": True}, {"weight": "1"}, {"iterations": 2.0}):
        with pytest.raises(ConfigError):
            TotalVariationMinimization(**bad)


def test_bad_input_is_refused():
    with pytest.raises(RobustlabError, match="B, C, H, W"):
        TotalVariationMinimization()(torch.rand(3, 8, 8))


def test_bpda_gives_the_straight_through_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double()
    defended = defend(model, ["tvm:keep_prob=0.5:weight=0.03:iterations=10"])
    assert defended.randomized and not defended.differentiable
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(defended(x)[:, 0].sum(), x)
    assert torch.equal(g, torch.zeros_like(g))  # what a naive attacker sees
    with bpda_mode(defended):
        torch.manual_seed(4)
        (g,) = torch.autograd.grad(defended(x)[:, 0].sum(), x)
    assert g.abs().sum() > 0
    # identity surrogate: the model's gradient at the transformed point, passed straight on
    torch.manual_seed(4)
    z = defended.defenses[0](x.detach()).requires_grad_()
    (expected,) = torch.autograd.grad(model(z)[:, 0].sum(), z)
    assert torch.allclose(g, expected)

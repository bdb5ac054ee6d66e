"""Gaussian noise injection (robustlab.defenses.noise)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import robustlab.defenses.noise  # noqa: F401  (registers "noise")
from robustlab.defenses.base import DefendedModel, bpda_mode, create_defense, defend
from robustlab.defenses.noise import GaussianNoise
from robustlab.errors import ConfigError, RobustlabError


def test_noise_mean_and_std_match_sigma():
    n = 4 * 3 * 32 * 32
    for sigma, clip in ((0.3, False), (0.05, True)):  # 0.5 +- 10 sigma: no pixel is clamped
        x = torch.full((4, 3, 32, 32), 0.5, dtype=torch.float64)
        torch.manual_seed(0)
        noise = (GaussianNoise(sigma=sigma, clip=clip)(x) - x).flatten()
        assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(n)
        # the sample std's standard error is sigma / sqrt(2n); 4 of them
        assert abs(float(noise.std()) - sigma) < 4 * sigma / math.sqrt(2 * n)
        # Gaussian, not uniform: about 68.3% within one sigma (binomial std 0.004)
        assert abs(float((noise.abs() < sigma).double().mean()) - 0.6827) < 0.02


def test_output_is_the_clamped_noisy_input_drawn_from_the_global_generator():
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(5)
    out = GaussianNoise(sigma=0.4)(x)
    torch.manual_seed(5)
    expected = torch.clamp(x + 0.4 * torch.randn(3, 1, 8, 8, dtype=torch.float64), 0, 1)
    assert torch.equal(out, expected)
    assert out.min() == 0 and out.max() == 1  # sigma 0.4 pushes some pixels out: clamped
    torch.manual_seed(5)
    raw = GaussianNoise(sigma=0.4, clip=False)(x)
    assert torch.equal(raw.clamp(0, 1), expected) and (raw < 0).any() and (raw > 1).any()


def test_same_seed_same_output_and_two_calls_differ():
    d, x = GaussianNoise(sigma=0.1), torch.rand(2, 3, 8, 8)
    torch.manual_seed(1)
    a, b = d(x), d(x)
    torch.manual_seed(1)
    assert torch.equal(d(x), a)
    assert not torch.equal(a, b)


def test_gradient_is_the_clamp_mask():
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(2)
    GaussianNoise(sigma=0.3)(x).sum().backward()
    torch.manual_seed(2)
    noisy = x.detach() + 0.3 * torch.randn(4, 3, 8, 8, dtype=torch.float64)
    inside = ((noisy > 0) & (noisy < 1)).double()
    assert 0.1 < float(inside.mean()) < 0.9
    assert torch.equal(x.grad, inside)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_shape_dtype_device_and_range(channels, dtype):
    x = torch.rand(2, channels, 7, 5, dtype=dtype)
    out = GaussianNoise(sigma=0.5)(x)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1


def test_spec_rebuilds_an_equal_defense_and_declarations():
    for d in (GaussianNoise(), GaussianNoise(sigma=1e-5, clip=False), GaussianNoise(sigma=2)):
        again = create_defense(d.spec())
        assert type(again) is GaussianNoise and again.options() == d.options()
    assert GaussianNoise().options() == {"sigma": 0.25, "clip": True}
    assert GaussianNoise.name == "noise" and GaussianNoise.randomized
    assert GaussianNoise.differentiable


@pytest.mark.parametrize(
    "spec, words",
    [
        ("noise:sigma=-0.1", "sigma must be a finite number >= 0"),
        ("noise:sigma=.nan", "sigma"),
        ("noise:sigma=abc", "sigma"),
        ("noise:clip=maybe", "clip"),
        ("noise:sigm=0.1", "did you mean 'sigma'"),
    ],
)
def test_bad_options_are_one_clear_line(spec, words):
    with pytest.raises(ConfigError) as err:
        create_defense(spec)
    assert words in str(err.value) and "\n" not in str(err.value)
    for bad in ({"sigma": True}, {"sigma": "0.1"}, {"sigma": math.inf}, {"clip": 1}):
        with pytest.raises(ConfigError):
            GaussianNoise(**bad)


def test_bad_input_is_refused():
    with pytest.raises(RobustlabError, match="pixels in"):
        GaussianNoise()(torch.full((1, 1, 2, 2), 2.0))


def test_defended_model_and_bpda_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).double()
    defended = defend(model, ["noise:sigma=0.3"])
    assert isinstance(defended, DefendedModel) and defended.randomized
    assert defended.differentiable and defended.specs() == ["noise:sigma=0.3:clip=True"]
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert defended(x).shape == (2, 4)
    # differentiable: the true gradient is the model's, masked where the noise clamps
    (g,) = torch.autograd.grad(defended.defenses[0](x).sum(), x)
    assert 0 < float(g.mean()) < 1
    with bpda_mode(defended):  # the identity surrogate: straight through, clamped or not
        (g,) = torch.autograd.grad(defended.defenses[0](x).sum(), x)
        assert torch.equal(g, torch.ones_like(g))
        (g,) = torch.autograd.grad(defended(x).sum(), x)
        assert g.abs().sum() > 0
    assert not defended.defenses[0].use_surrogate_gradient

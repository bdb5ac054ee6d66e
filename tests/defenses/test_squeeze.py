"""Feature squeezing (Xu et al. 2018): bit depth against numpy's rint, its soft-staircase
surrogate against the forward, median smoothing against scipy.ndimage.median_filter, and
naive versus BPDA attacks through DefendedModel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import robustlab.defenses.squeeze  # noqa: F401  (registers bitdepth, median)
from robustlab.defenses.base import DEFENSES, DefendedModel, bpda_mode, create_defense, defend
from robustlab.defenses.squeeze import BitDepth, MedianSmoothing
from robustlab.errors import ConfigError


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_registered_and_declared():
    assert DEFENSES.get("bitdepth") is BitDepth and BitDepth.name == "bitdepth"
    assert DEFENSES.get("median") is MedianSmoothing and MedianSmoothing.name == "median"
    assert not BitDepth.differentiable and not BitDepth.randomized
    assert MedianSmoothing.differentiable and not MedianSmoothing.randomized


# ----------------------------------------------------------------------------- bit depth


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("channels", [1, 3])
def test_bitdepth_matches_numpy_rint(bits, channels):
    torch.manual_seed(bits)
    x = torch.rand(2, channels, 6, 5, dtype=torch.float64)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    out = BitDepth(bits)(x)
    levels = 2**bits - 1
    np.testing.assert_array_equal(out.numpy(), np.rint(x.numpy() * levels) / levels)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert len(torch.unique(BitDepth(bits)(torch.linspace(0, 1, 2001).view(1, 1, 1, -1)))) == (
        levels + 1
    )


def test_bitdepth_by_hand():
    x = torch.tensor([0.2, 0.49, 0.51, 0.7, 1.0]).view(1, 1, 1, 5)
    assert BitDepth(1)(x).flatten().tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_allclose(
        BitDepth(2)(x).flatten().numpy(), [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1], rtol=1e-6
    )


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_bitdepth_surrogate_close_to_forward(bits):
    """At temperature 0.1 the soft staircase is within 0.5001/L of the forward (1/2 a step
    at a threshold, 2 * sum_m sigmoid(-m/0.1) more) and 0.15/L on average (the identity:
    0.25/L); it tends to the forward as the temperature goes to 0."""
    L = 2**bits - 1
    x = torch.linspace(0, 1, 20001, dtype=torch.float64).view(1, 1, 1, -1)
    d = BitDepth(bits)
    diff = (d.surrogate(x) - d.transform(x)).abs()
    tail = 2 * sum(sigmoid(-m / 0.1) for m in range(1, 20))
    assert diff.max() <= (0.5 + tail) / L + 1e-12
    assert diff.mean() <= 0.15 / L
    assert diff.mean() < 0.6 * (x - d.transform(x)).abs().mean()  # the identity: 0.25/L
    # far from thresholds (>= 0.2 step away) a cold surrogate equals the forward
    t = x * L
    far = (t - torch.floor(t) - 0.5).abs() >= 0.2
    cold = BitDepth(bits, temperature=0.02)
    assert (cold.surrogate(x) - cold.transform(x)).abs()[far].max() <= 1e-4 / L


def test_bitdepth_surrogate_gradient_useful():
    bits, L = 3, 7
    x = torch.linspace(0, 1, 7001, dtype=torch.float64).view(1, 1, 1, -1).requires_grad_(True)
    (grad,) = torch.autograd.grad(BitDepth(bits).surrogate(x).sum(), x)
    assert torch.isfinite(grad).all() and (grad > 0).all()  # never zero, even at 0 and 1
    levels = torch.tensor([k / L for k in range(L + 1)], dtype=torch.float64)
    thresholds = torch.tensor([(k + 0.5) / L for k in range(L)], dtype=torch.float64)

    def slope(points):
        p = points.view(1, 1, 1, -1).clone().requires_grad_(True)
        return torch.autograd.grad(BitDepth(bits).surrogate(p).sum(), p)[0].flatten()

    # d/dx at a threshold: L * sigmoid'(0) / (T L) = 2.5; at an inner level: 2 sigmoid'(5) / T
    torch.testing.assert_close(
        slope(thresholds), torch.full((L,), 2.5, dtype=torch.float64), rtol=1e-3, atol=0
    )
    s5 = sigmoid(5) * sigmoid(-5)
    torch.testing.assert_close(
        slope(levels[1:-1]),
        torch.full((L - 1,), 2 * s5 / 0.1, dtype=torch.float64),
        rtol=1e-3,
        atol=0,
    )


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))


def test_bitdepth_bpda_gives_gradients_the_naive_forward_hides():
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    defended = DefendedModel(tiny_model().double(), [BitDepth(3)])
    assert not defended.differentiable

    def grad_and_out():
        xg = x.clone().requires_grad_(True)
        out = defended(xg)
        return torch.autograd.grad(out.sum(), xg)[0], out.detach()

    naive, out = grad_and_out()
    assert (naive == 0).all()
    with bpda_mode(defended):
        assert defended.defenses[0].use_surrogate_gradient
        bpda, out_bpda = grad_and_out()
    assert not defended.defenses[0].use_surrogate_gradient
    assert torch.equal(out, out_bpda)  # same values: the forward's
    assert (bpda != 0).all() and torch.isfinite(bpda).all()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_pgd_naive_versus_bpda_through_bitdepth(trained_mnist_model):
    from robustlab.attacks import PGD

    model, test = trained_mnist_model
    x, y = test.float_images(slice(0, 32)), test.y[:32]
    defended = defend(model, ["bitdepth:bits=3"])
    clean = accuracy(defended, x, y)
    naive = PGD(defended, eps=0.3, steps=10, random_start=False)(x, y)
    assert torch.equal(naive, x)  # zero gradient: the attack never moves
    with bpda_mode(defended):
        adaptive = PGD(defended, eps=0.3, steps=10, random_start=False)(x, y)
    assert clean >= 0.8 and accuracy(defended, adaptive, y) <= clean - 0.5


# ----------------------------------------------------------------------------- median


def scipy_median(x: torch.Tensor, size: int) -> np.ndarray:
    a = x.numpy()
    return np.stack(
        [
            [ndimage.median_filter(a[b, c], size=size, mode="reflect") for c in range(a.shape[1])]
            for b in range(a.shape[0])
        ]
    )


@pytest.mark.parametrize("size", [2, 3, 4, 5])
@pytest.mark.parametrize("channels", [1, 3])
def test_median_equals_scipy_reflect(size, channels):
    torch.manual_seed(size)
    x = torch.rand(3, channels, 9, 12, dtype=torch.float64)
    x[0] = torch.round(x[0] * 4) / 4  # ties, as in real images
    out = MedianSmoothing(size)(x)
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(out.numpy(), scipy_median(x, size))


def test_median_2x2_anchor_and_upper_median_by_hand():
    x = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3) / 8
    out = MedianSmoothing(2)(x)[0, 0] * 8
    # window of (i, j) holds (i-1..i, j-1..j), reflected at the border (-1 -> 0); of four
    # values the upper middle one: (1,1): {0,1,3,4} -> 3; (2,2): {4,5,7,8} -> 7
    assert out.tolist() == [[0, 1, 2], [3, 3, 4], [6, 6, 7]]


def test_median_gradient_sparse_and_straight_through_under_bpda():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    d = MedianSmoothing(3)
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    assert grad.sum() == x.numel() and (grad == 0).any()  # each output picks one input
    defended = DefendedModel(torch.nn.Identity(), [d])
    with bpda_mode(defended):
        out = defended(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, d(x)) and (grad == 1).all()


def test_pgd_bpda_through_median(trained_mnist_model):
    from robustlab.attacks import PGD

    model, test = trained_mnist_model
    x, y = test.float_images(slice(0, 32)), test.y[:32]
    defended = defend(model, ["median:size=2"])
    clean = accuracy(defended, x, y)
    with bpda_mode(defended):
        adaptive = PGD(defended, eps=0.3, steps=10, random_start=False)(x, y)
    assert clean >= 0.8 and accuracy(defended, adaptive, y) <= clean - 0.5


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("d", [BitDepth(1), BitDepth(7, temperature=0.3), MedianSmoothing(3)])
def test_spec_round_trip(d):
    again = create_defense(d.spec())
    assert type(again) is type(d) and again.options() == d.options()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bitdepth:bits=0", "bits must be an integer in 1..8"),
        ("bitdepth:bits=9", "bits must be an integer in 1..8"),
        ("bitdepth:bits=2.5", "expected an integer"),
        ("bitdepth:temperature=0", "temperature must be a finite number > 0"),
        ("median:size=1", "size must be an integer >= 2"),
        ("median:window=3", "has no option 'window'"),
    ],
)
def test_bad_options(spec, message):
    with pytest.raises(ConfigError, match=message):
        create_defense(spec)


@pytest.mark.parametrize("d", [BitDepth(3), MedianSmoothing(2)])
def test_bad_input_and_empty_batch(d):
    with pytest.raises(ValueError, match="expects a batch of images"):
        d(torch.rand(8, 8))
    with pytest.raises(ValueError, match=r"expects pixels in \[0, 1\]"):
        d(torch.rand(1, 3, 8, 8) - 0.5)
    with pytest.raises(ValueError, match="NaN"):
        d(torch.full((1, 1, 4, 4), float("nan")))
    assert d(torch.zeros(0, 3, 8, 8)).shape == (0, 3, 8, 8)


def test_median_window_larger_than_image():
    with pytest.raises(ValueError, match="a 3x3 window needs images of at least 3x3"):
        MedianSmoothing(3)(torch.rand(1, 1, 2, 5))

"""Activations and their swap (SAT surgery) on zoo models and user models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from robustlab.errors import ConfigError
from robustlab.nn import (
    MaxMin,
    ParametricSoftplus,
    SmoothGradReLU,
    SmoothReLU,
    SwapError,
    count_activations,
    make_activation,
    smooth_gradients,
    swap_activations,
)


def test_parametric_softplus_matches_its_formula_and_its_derivative_is_sigmoid():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    f = ParametricSoftplus(alpha=10)
    y = f(x)
    ref = torch.log1p(torch.exp(10 * x.detach())) / 10
    torch.testing.assert_close(y.detach(), ref)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.sigmoid(10 * x.detach()))
    # tends to ReLU: the gap is at most log(2)/alpha, at 0
    assert float((y - F.relu(x)).detach().abs().max()) == pytest.approx(math.log(2) / 10, rel=1e-6)


def test_maxmin_sorts_channel_pairs_and_is_a_norm_preserving_contraction():
    torch.manual_seed(0)
    x = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    y = MaxMin()(x)
    for i in range(3):  # channel i is paired with channel i + 3, by definition
        pair = torch.stack([x[:, i], x[:, i + 3]])
        torch.testing.assert_close(y[:, i], pair.amax(0))
        torch.testing.assert_close(y[:, i + 3], pair.amin(0))
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    a, b = torch.randn(1000, 8, dtype=torch.float64), torch.randn(1000, 8, dtype=torch.float64)
    gap_in, gap_out = (a - b).norm(dim=1), (MaxMin()(a) - MaxMin()(b)).norm(dim=1)
    assert bool((gap_out <= gap_in * (1 + 1e-12)).all())  # 1-Lipschitz in L2
    assert isinstance(make_activation("maxmin"), MaxMin)
    with pytest.raises(ConfigError, match="even number of channels"):
        MaxMin()(torch.randn(2, 3))


def test_smooth_relu_formula_and_a_continuous_derivative():
    f = SmoothReLU(sqrt_beta=2.0)  # beta = 4
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y = f.double()(x)
    expected = [0.0, 0.0, 0.5 - math.log(3.0) / 4, 2.0 - math.log(9.0) / 4]
    torch.testing.assert_close(y.detach(), torch.tensor(expected, dtype=torch.float64))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, 2 / 3, 8 / 9], dtype=torch.float64))
    assert isinstance(f.sqrt_beta, nn.Parameter)  # learnable, as in the paper


def test_smooth_gradient_relu_is_relu_forward_and_softplus_backward_when_asked():
    m = SmoothGradReLU(alpha=10)
    x = torch.randn(100, dtype=torch.float64, requires_grad=True)
    with smooth_gradients(m, True):
        y = m(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, F.relu(x))
    torch.testing.assert_close(g, torch.sigmoid(10 * x.detach()))
    assert m.smooth is False  # restored
    (g_relu,) = torch.autograd.grad(m(x).sum(), x)
    torch.testing.assert_close(g_relu, (x > 0).double())


def test_activation_names_take_options_and_unknown_ones_are_named():
    assert make_activation("parametric_softplus:alpha=5").alpha == 5.0
    assert make_activation("leaky_relu:slope=0.2").negative_slope == 0.2
    with pytest.raises(rl.UnknownNameError, match="alpha"):
        make_activation("parametric_softplus:alpah=5")
    with pytest.raises(rl.UnknownNameError, match="silu"):
        make_activation("sulu")


@pytest.mark.parametrize("act", ["silu", "gelu", "softplus", "parametric_softplus", "elu",
                                 "smooth_relu"])  # fmt: skip
def test_swap_on_a_zoo_model_keeps_weights_and_equals_the_model_built_with_that_activation(act):
    torch.manual_seed(0)
    model = rl.create_model("small_cnn", in_channels=1, input_size=28)
    swapped = swap_activations(model, act)
    assert set(count_activations(swapped)) == {type(make_activation(act)).__name__}
    assert count_activations(model) == {"ReLU": 3}  # the original is untouched
    original = model.state_dict()
    for key, value in swapped.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key
    reference = rl.create_model("small_cnn", in_channels=1, input_size=28, act=act)
    reference.load_state_dict(swapped.state_dict())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(swapped(x), reference(x))


class FunctionalNet(nn.Module):
    """A user model calling activations functionally, three different ways."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = torch.relu(self.b(h)) + h
        return self.c(h.relu())


def test_functional_relu_calls_are_rewritten_through_fx():
    torch.manual_seed(0)
    net = FunctionalNet()
    swapped = swap_activations(net, "silu")
    x = torch.randn(5, 6)
    # an independent reference: the same computation written with silu
    h = F.silu(net.a(x))
    h = F.silu(net.b(h)) + h
    expected = net.c(F.silu(h))
    torch.testing.assert_close(swapped(x), expected)
    assert count_activations(swapped) == {"SiLU": 3}
    assert set(swapped.state_dict()) >= set(net.state_dict())


class UntraceableFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return F.relu(self.a(x))


class UntraceableModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.act(self.a(x))


def test_an_untraceable_model_with_functional_relus_is_refused_naming_the_call():
    site = r"test_activations\.py:\d+: return F\.relu\(self\.a\(x\)\)"
    with pytest.raises(SwapError, match=site):
        swap_activations(UntraceableFunctional(), "silu", example=torch.randn(2, 4))


def test_an_untraceable_model_without_an_example_is_refused_asking_for_one():
    with pytest.raises(SwapError, match=r"could not trace UntraceableModules.*pass example="):
        swap_activations(UntraceableModules(), "gelu")


def test_an_untraceable_model_with_activation_modules_is_swapped_given_an_example():
    swapped = swap_activations(UntraceableModules(), "gelu", example=torch.randn(2, 4))
    assert count_activations(swapped) == {"GELU": 1}


def test_a_model_without_relus_is_an_error():
    with pytest.raises(SwapError, match="no"):
        swap_activations(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), "silu")

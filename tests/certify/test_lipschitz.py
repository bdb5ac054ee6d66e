"""Soundness of the Lipschitz bounds: never below the true constant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from robustlab.certify import LipschitzError, lipschitz_bound, max_slope
from robustlab.certify.lipschitz import (
    _conv_ops,
    _max_spectral_norm,
    dense_matrix,
    fft_conv_bound,
    lmt_conv_bound,
)
from robustlab.nn import MaxMin

CONVS = [
    dict(cin=2, cout=3, k=3, stride=1, padding=1, size=6),
    dict(cin=3, cout=4, k=3, stride=2, padding=1, size=7),
    dict(cin=2, cout=2, k=5, stride=1, padding=2, size=5),
    dict(cin=3, cout=2, k=3, stride=1, padding=0, size=6),
    dict(cin=2, cout=3, k=4, stride=2, padding=1, size=8),
    dict(cin=2, cout=2, k=3, stride=1, padding=2, size=5, dilation=2),
    dict(cin=4, cout=4, k=1, stride=2, padding=0, size=6),
    dict(cin=4, cout=3, k=1, stride=1, padding=1, size=4),
    # padding large against the input: the fft grid (H + p) wraps into the zeros
    dict(cin=2, cout=3, k=3, stride=1, padding=2, size=3),
    dict(cin=3, cout=2, k=3, stride=2, padding=1, size=2),
    dict(cin=2, cout=2, k=5, stride=1, padding=3, size=4),
    dict(cin=2, cout=2, k=3, stride=1, padding=3, size=4, dilation=3),
]


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: f"k{s['k']}s{s['stride']}p{s['padding']}")
def test_every_conv_bound_is_at_least_the_exact_norm_of_its_dense_matrix(spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(spec["cin"], spec["cout"], spec["k"], stride=spec["stride"],
                     padding=spec["padding"], dilation=spec.get("dilation", 1))  # fmt: skip
    shape = (1, spec["cin"], spec["size"], spec["size"])
    apply, apply_t, _ = _conv_ops(conv, conv.weight, shape, torch.float64)
    matrix = dense_matrix(apply, shape)  # built explicitly, strides and padding included
    exact = float(torch.linalg.matrix_norm(matrix, 2))
    # the adjoint used by power iteration is the transposed matrix
    u = torch.randn(
        1, *apply(torch.zeros(shape, dtype=torch.float64)).shape[1:], dtype=torch.float64
    )
    torch.testing.assert_close(apply_t(u).flatten(), matrix.T @ u.flatten())
    assert fft_conv_bound(conv, conv.weight, shape) >= exact * (1 - 1e-9)
    assert lmt_conv_bound(conv, conv.weight, shape) >= exact * (1 - 1e-9)
    net = nn.Sequential(conv).eval()
    for method in ("power", "fft", "exact", "lmt"):
        bound = lipschitz_bound(net, shape, method=method).total
        assert bound >= exact * (1 - 1e-9), method
    assert lipschitz_bound(net, shape, method="power").total <= exact * 1.02  # and tight
    # the Lanczos-accelerated estimate itself converges to the exact norm
    estimate = lipschitz_bound(net, shape, method="power", margin=0.0).total
    assert estimate == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("spec", CONVS[:6], ids=lambda s: f"k{s['k']}s{s['stride']}p{s['padding']}")
def test_fft_bound_is_the_circular_convolution_norm_over_every_frequency(spec):
    """Against a plain reference: the kernel zero-padded to the (H + p) grid, its full 2-D
    FFT (no conjugate-pair pruning, no tap-wise DFT), the largest singular value over all
    frequencies."""
    torch.manual_seed(1)
    conv = nn.Conv2d(spec["cin"], spec["cout"], spec["k"], stride=spec["stride"],
                     padding=spec["padding"], dilation=spec.get("dilation", 1))  # fmt: skip
    n, p, d, k = spec["size"], spec["padding"], spec.get("dilation", 1), spec["k"]
    grid = n + p
    kernel = torch.zeros(spec["cout"], spec["cin"], grid, grid, dtype=torch.float64)
    for a in range(k):
        for b in range(k):
            kernel[:, :, (a * d) % grid, (b * d) % grid] += conv.weight[:, :, a, b].double()
    spectrum = torch.fft.fft2(kernel).permute(2, 3, 0, 1).reshape(-1, spec["cout"], spec["cin"])
    reference = float(torch.linalg.svdvals(spectrum)[:, 0].max())
    shape = (1, spec["cin"], n, n)
    assert fft_conv_bound(conv, conv.weight, shape) == pytest.approx(reference, rel=3e-4)
    assert fft_conv_bound(conv, conv.weight, shape) >= reference


@pytest.mark.parametrize("separated", [True, False])
def test_max_spectral_norm_is_a_tight_upper_bound(separated):
    """Both paths: Cholesky-verified estimate (a dominant singular value) and the
    eigenvalue fallback (clustered random spectra, where 8 power steps do not settle)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 40, 30, generator=g, dtype=torch.complex128)
    if separated:
        u = torch.randn(40, 1, dtype=torch.complex128)
        v = torch.randn(1, 30, dtype=torch.complex128)
        a = a + 3 * (u @ v) * torch.linspace(0.5, 1, 12, dtype=torch.float64)[:, None, None]
    exact = float(torch.linalg.svdvals(a)[:, 0].max())
    bound = _max_spectral_norm(a)
    assert exact <= bound <= exact * (1 + 2e-4)


def test_linear_and_batch_norm_bounds_against_svd():
    torch.manual_seed(0)
    lin, bn = nn.Linear(7, 5), nn.BatchNorm1d(5)
    bn.running_var.uniform_(0.2, 3.0)
    bn.weight.data.uniform_(-2, 2)
    net = nn.Sequential(lin, bn).eval()
    with torch.no_grad():
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        exact = float(torch.linalg.matrix_norm(scale[:, None] * lin.weight.double(), 2))
    folded = lipschitz_bound(net, (7,), method="exact")
    unfolded = lipschitz_bound(net, (7,), method="exact", fold_bn=False)
    assert exact <= folded.total <= exact * (1 + 1e-8)  # sound, and within its margin
    assert unfolded.total >= folded.total  # folding is the tighter bound


def test_activation_slopes_are_computed_not_guessed():
    import math

    # GELU' = Phi(x) + x phi(x) peaks where phi(x) (2 - x^2) = 0: at sqrt(2)
    r2 = math.sqrt(2)
    gelu_max = 0.5 * (1 + math.erf(1.0)) + r2 * math.exp(-1.0) / math.sqrt(2 * math.pi)
    assert max_slope(F.gelu) == pytest.approx(gelu_max, rel=1e-5)
    assert max_slope(F.gelu) >= gelu_max  # never below: the grid maximum carries a margin
    # SiLU' = s (1 + x (1 - s)) peaks where SiLU'' = s (1 - s) (2 + x (1 - 2 s)) = 0
    lo, hi = 2.0, 3.0
    for _ in range(60):
        mid = (lo + hi) / 2
        sig = 1 / (1 + math.exp(-mid))
        lo, hi = (mid, hi) if 2 + mid * (1 - 2 * sig) > 0 else (lo, mid)
    sig = 1 / (1 + math.exp(-lo))
    silu_max = sig * (1 + lo * (1 - sig))
    assert max_slope(F.silu) == pytest.approx(silu_max, rel=1e-5) and silu_max == pytest.approx(
        1.0998, abs=1e-4
    )
    assert max_slope(torch.sigmoid) == pytest.approx(0.25, rel=1e-5)


class Residual(nn.Module):
    """A user model written functionally: F.relu, F.avg_pool2d, torch.flatten, x.view, +."""

    def __init__(self, act=F.relu) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 3)
        self.act = act

    def forward(self, x):
        h = self.act(self.c1(x))
        h = h + self.bn(self.c2(h))  # residual sum
        h = F.avg_pool2d(h, 2)
        h = torch.flatten(h, 1)
        return self.fc(h.view(h.shape[0], -1))


def _largest_jacobian_norm(model, shape, samples=32, steps=20):
    """Largest ||J(x)||_2 found by gradient ascent on ||J(x) u|| from random points."""
    best = 0.0
    for _ in range(samples // 8):
        x = (torch.randn(8, *shape) * 2).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(steps):
            u = torch.randn(8, *shape)
            _, jvp = torch.func.jvp(model, (x,), (u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1),))
            gain = jvp.flatten(1).norm(dim=1)
            opt.zero_grad()
            (-gain.sum()).backward()
            opt.step()
        for xi in x.detach():
            jac = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi)
            best = max(best, float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2)))
    return best


@pytest.mark.parametrize(
    "act",
    [F.relu, F.silu, F.gelu, torch.tanh, MaxMin()],
    ids=["relu", "silu", "gelu", "tanh", "maxmin"],
)
def test_network_bound_is_never_below_the_largest_jacobian_norm(act):
    for seed in range(3):
        torch.manual_seed(seed)
        model = Residual(act)
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.1, 2)
        model.eval()
        found = _largest_jacobian_norm(model, (2, 6, 6))
        for method in ("power", "fft", "exact"):
            assert lipschitz_bound(model, (2, 6, 6), method=method).total >= found, (seed, method)


def test_zoo_models_are_bounded():
    torch.manual_seed(0)
    for name, shape, opts in [
        ("small_cnn", (1, 28, 28), {}), ("lenet", (1, 28, 28), {}), ("mlp", (1, 28, 28), {}),
        ("preact_resnet18", (3, 16, 16), {}), ("resnet18", (3, 16, 16), {}),
        ("wide_resnet", (3, 16, 16), {"depth": 10, "width": 2}),
    ]:  # fmt: skip
        norm = {"mean": [0.5] * shape[0], "std": [0.25] * shape[0]}
        model = rl.create_model(name, in_channels=shape[0], input_size=shape[1:], **norm, **opts)
        model.eval()
        report = lipschitz_bound(model, shape, method="fft")
        assert report.total > 0 and report.guaranteed, name
        assert any(layer.op == "Normalize" and layer.bound == 4.0 for layer in report.layers)


def test_an_operation_without_a_bound_is_named():
    class Sine(nn.Module):
        def forward(self, x):
            return torch.sin(x).flatten(1)

    with pytest.raises(LipschitzError, match="sin"):
        lipschitz_bound(Sine(), (1, 4, 4))

    class Product(nn.Module):
        def forward(self, x):
            return (x * x).flatten(1)

    with pytest.raises(LipschitzError, match="product of two tensors"):
        lipschitz_bound(Product(), (1, 4, 4))

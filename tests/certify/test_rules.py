"""Every per-operation rule against an independent reference: the dense Jacobian.

The reference is the largest singular value of the model's Jacobian, built by autograd
in float64 (``torch.autograd.functional.jacobian``, then ``matrix_norm(ord=2)``): for a
linear model it is the exact Lipschitz constant, for max pooling the local one at the
point. A proven bound must never be below it, and must equal it where the rule is exact.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.certify import lipschitz_bound
from robustlab.certify.training import LipschitzTracker

PROVEN = ("fft", "exact", "lmt")
SOUND = 1 - 1e-9  # a bound may undershoot the reference by rounding only
TIGHT = 1 + 1e-6  # where a rule is exact, it may overshoot by its rounding margins only


class Fn(nn.Module):
    """A model written as a function of its modules (``fn(self, x)``), traced by fx."""

    def __init__(self, fn, **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            self.add_module(name, m)

    def forward(self, x):
        return self.fn(self, x)


def jacobian_norm(model: nn.Module, x: torch.Tensor) -> float:
    """||J(x)||_2 of ``model`` at ``x`` (one input, with its batch dimension of 1), in float64."""
    m = copy.deepcopy(model).double().eval()
    x = x.double()
    jac = torch.autograd.functional.jacobian(m, x, vectorize=True)
    out = m(x)
    return float(torch.linalg.matrix_norm(jac.reshape(out.numel(), x.numel()), ord=2))


def _psd_linear(n: int) -> nn.Linear:
    """A linear map with a symmetric positive semi-definite weight: ||I + W|| = 1 + ||W||."""
    lin = nn.Linear(n, n)
    with torch.no_grad():
        a = torch.randn(n, n)
        lin.weight.copy_(a @ a.T / n)
    return lin


def _bn(channels: int, dims: int = 2) -> nn.Module:
    """A batch norm in eval mode with non-trivial running statistics and affine parameters
    (|gamma| / sqrt(var) ranges well above and below 1 across channels)."""
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 3.0)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


# (id, model factory, input shape without batch, methods whose bound is exact here)
LINEAR_CASES = [
    ("linear", lambda: nn.Linear(6, 4), (6,), PROVEN),
    ("flatten-linear", lambda: nn.Sequential(nn.Flatten(), nn.Linear(18, 5)), (2, 3, 3), PROVEN),
    ("linear-bn1d", lambda: nn.Sequential(nn.Linear(6, 5), _bn(5, 1)), (6,), PROVEN),
    ("conv-strided", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7), ("exact",)),
    ("conv-grouped", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5), ("exact",)),
    ("conv-dilated", lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2), (2, 6, 6), ("exact",)),
    ("conv-same-even", lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 5, 5), ("exact",)),
    (
        "conv-same-dilated",
        lambda: nn.Conv2d(2, 2, 3, padding="same", dilation=2),
        (2, 6, 6),
        ("exact",),
    ),
    ("conv-valid", lambda: nn.Conv2d(2, 2, 3, padding="valid"), (2, 5, 5), ("exact",)),
    (
        "conv-bn-folded",
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(3)),
        (2, 5, 5),
        ("exact",),
    ),
    (
        "grouped-conv-bn",
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), _bn(4)),
        (4, 4, 4),
        ("exact",),
    ),
    # average pooling is linear, and its rule exact in every method
    ("avgpool-2", lambda: nn.AvgPool2d(2), (2, 6, 6), PROVEN),
    ("avgpool-3-overlap", lambda: nn.AvgPool2d(3, stride=1), (1, 5, 5), PROVEN),
    ("avgpool-3s2p1", lambda: nn.AvgPool2d(3, 2, 1), (1, 6, 6), PROVEN),
    (
        "avgpool-ceil-nopad-count",
        lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        (1, 6, 6),
        PROVEN,
    ),
    ("avgpool-divisor", lambda: nn.AvgPool2d(2, stride=1, divisor_override=3), (1, 4, 4), PROVEN),
    ("avgpool-rect", lambda: nn.AvgPool2d((2, 3), stride=(1, 2)), (1, 5, 7), PROVEN),
    (
        "avgpool-functional",
        lambda: Fn(lambda s, x: F.avg_pool2d(x, 3, 2, 1, True, False)),
        (1, 6, 6),
        PROVEN,
    ),
    ("adaptive-avg-uneven", lambda: nn.AdaptiveAvgPool2d(3), (1, 5, 5), PROVEN),
    ("adaptive-avg-even", lambda: Fn(lambda s, x: F.adaptive_avg_pool2d(x, 2)), (2, 4, 4), PROVEN),
    # a tensor used twice, scaled, concatenated, summed over branches
    ("x-plus-x", lambda: Fn(lambda s, x: x + x), (2, 3, 3), PROVEN),
    ("f-times-2", lambda: Fn(lambda s, x: s.lin(x) * 2, lin=nn.Linear(6, 4)), (6,), PROVEN),
    (
        "f-div-const",
        lambda: Fn(lambda s, x: s.lin(x) / 4 - 1, lin=nn.Linear(6, 4)),
        (6,),
        PROVEN,
    ),
    ("cat-2x-3x", lambda: Fn(lambda s, x: torch.cat([x * 2, x * 3], 1)), (2, 3, 3), PROVEN),
    ("cat-x-x", lambda: Fn(lambda s, x: torch.cat([x, -x], 1)), (3,), PROVEN),
    (
        "cat-convs",
        lambda: Fn(
            lambda s, x: torch.cat([s.a(x), s.b(x)], 1),
            a=nn.Conv2d(2, 3, 3, padding=1),
            b=nn.Conv2d(2, 2, 3, padding=1),
        ),
        (2, 4, 4),
        (),
    ),
    ("residual-psd", lambda: Fn(lambda s, x: x + s.lin(x), lin=_psd_linear(5)), (5,), PROVEN),
    (
        "residual-conv",
        lambda: Fn(lambda s, x: x + s.conv(x), conv=nn.Conv2d(2, 2, 3, padding=1)),
        (2, 4, 4),
        (),
    ),
    (
        "branches",
        lambda: Fn(lambda s, x: s.a(x) + s.b(x), a=nn.Linear(5, 3), b=nn.Linear(5, 3)),
        (5,),
        (),
    ),
    (
        "branches-same-layer",
        lambda: Fn(lambda s, x: s.a(x) - 2 * s.a(x), a=_psd_linear(4)),
        (4,),
        (),
    ),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_rules_against_the_exact_jacobian_norm(case):
    name, make, shape, tight = case
    torch.manual_seed(len(name))
    model = make().eval()
    exact = jacobian_norm(model, torch.randn(1, *shape))
    assert exact > 0.1, name  # the case exercises something
    for method in PROVEN:
        bound = lipschitz_bound(model, shape, method=method).total
        assert bound >= exact * SOUND, (name, method, bound, exact)
        if method in tight:
            assert bound <= exact * TIGHT, (name, method, bound, exact)


def test_batch_norm_unfolded_is_still_sound():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(3)).eval()
    exact = jacobian_norm(model, torch.randn(1, 2, 5, 5))
    folded = lipschitz_bound(model, (2, 5, 5), method="exact").total
    unfolded = lipschitz_bound(model, (2, 5, 5), method="exact", fold_bn=False).total
    assert exact * SOUND <= folded <= exact * TIGHT
    assert unfolded >= folded * SOUND


MAX_POOLS = [
    ("k2s2", lambda: nn.MaxPool2d(2), (1, 6, 6)),
    ("k3s3-2ch", lambda: nn.MaxPool2d(3), (2, 6, 6)),
    ("k3s1-overlap", lambda: nn.MaxPool2d(3, stride=1), (1, 5, 5)),
    ("k3s2-overlap", lambda: nn.MaxPool2d(3, stride=2), (1, 7, 7)),
    ("k2s1-overlap", lambda: nn.MaxPool2d(2, stride=1), (1, 4, 5)),
    ("k3s2p1", lambda: nn.MaxPool2d(3, 2, padding=1), (1, 6, 6)),
    ("k3s2-ceil", lambda: nn.MaxPool2d(3, 2, ceil_mode=True), (1, 4, 4)),
    ("k2s1-dilated", lambda: nn.MaxPool2d(2, stride=1, dilation=2), (1, 5, 5)),
    ("k3x2-rect", lambda: nn.MaxPool2d((3, 2), stride=(1, 2)), (1, 5, 6)),
    ("functional-k3s2p1", lambda: Fn(lambda s, x: F.max_pool2d(x, 3, 2, 1)), (1, 6, 6)),
    ("functional-k2s2", lambda: Fn(lambda s, x: F.max_pool2d(x, kernel_size=2)), (1, 4, 4)),
]


@pytest.mark.parametrize("case", MAX_POOLS, ids=[c[0] for c in MAX_POOLS])
def test_max_pool_bound_is_the_largest_local_jacobian_norm(case):
    """Never below ||J(x)|| at random points; equal to the largest ||J(x)|| over inputs
    with one spike (the most-read pixel's spike attains the Lipschitz constant, so the
    bound is exact)."""
    name, make, shape = case
    model = make().eval()
    g = torch.Generator().manual_seed(0)
    points = [torch.randn(1, *shape, generator=g) for _ in range(30)]
    spikes = []
    for i in range(math.prod(shape)):
        x = torch.rand(1, *shape, generator=g)
        x.view(-1)[i] = 10.0
        spikes.append(x)
    local = [jacobian_norm(model, x) for x in points]
    spiked = max(jacobian_norm(model, x) for x in spikes)
    for method in PROVEN:
        bound = lipschitz_bound(model, shape, method=method).total
        assert bound >= max(local) * SOUND, (name, method, bound, max(local))
        assert spiked * SOUND <= bound <= spiked * TIGHT, (name, method, bound, spiked)


def test_max_pool_inside_a_network_is_sound():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(2)
    found = max(jacobian_norm(model, torch.randn(1, 1, 6, 6, generator=g)) for _ in range(40))
    for method in PROVEN:
        assert lipschitz_bound(model, (1, 6, 6), method=method).total >= found * SOUND, method


def test_the_tracker_shares_the_cat_and_sum_rules():
    """The training tracker's bound of ``h = cat(A x, B x); h + C h`` converges to
    ``(1 + ||C||) sqrt(||A||^2 + ||B||^2)``, computed here from the weights."""
    torch.manual_seed(0)
    model = Fn(
        lambda s, x: (lambda h: h + s.c(h))(torch.cat([s.a(x), s.b(x)], 1)),
        a=nn.Linear(6, 3),
        b=nn.Linear(6, 2),
        c=nn.Linear(5, 5),
    )
    tracker = LipschitzTracker(model, (6,))
    for _ in range(60):
        estimate = float(tracker().detach())

    def norm(m):
        return float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))

    expected = (1 + norm(model.c)) * math.sqrt(norm(model.a) ** 2 + norm(model.b) ** 2)
    assert estimate == pytest.approx(expected, rel=1e-4)

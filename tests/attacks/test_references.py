"""Attacks against independent references: closed forms on linear models, and a peer library."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.attacks import (
    APGD,
    BPDA,
    CW,
    EOT,
    FGSM,
    PGD,
    DeepFool,
    Square,
    UniversalPerturbation,
    lp_norm,
)
from tests.attacks.conftest import Linear

torchattacks = pytest.importorskip("torchattacks")


def _centered(n, d=16, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + spread * torch.randn(n, 1, 4, d // 4, generator=g)).clamp(0, 1)


def _exact_l2_distance(model, x):
    """Distance from x to the nearest decision boundary of an affine classifier."""
    with torch.no_grad():
        z = model(x)
        p = z.argmax(1)
        w = model.weight
        dist = torch.full((x.shape[0],), float("inf"))
        for k in range(z.shape[1]):
            diff = (z.gather(1, p[:, None])[:, 0] - z[:, k]).abs()
            wn = (w[k] - w[p]).norm(dim=1)
            dist = torch.where(k != p, torch.minimum(dist, diff / wn), dist)
    return dist


def test_deepfool_finds_the_exact_boundary_of_a_linear_model():
    model = Linear(16, 4, scale=0.5)
    x = _centered(20)
    x_adv = DeepFool(model, norm="l2", overshoot=0.02)(x, model(x).argmax(1))
    found = lp_norm(x_adv - x, "l2")
    exact = _exact_l2_distance(model, x)
    assert (model(x_adv).argmax(1) != model(x).argmax(1)).all()
    # one linearisation step is exact for an affine model: (1 + overshoot) * (d + 1e-4 / ||w||)
    torch.testing.assert_close(found, 1.02 * exact, rtol=2e-3, atol=2e-4)


def test_cw_never_beats_the_true_minimum_and_gets_close():
    model = Linear(16, 4, scale=0.5)
    x = _centered(8)
    y = model(x).argmax(1)
    result = CW(model, steps=300, search_steps=6, lr=0.05, c=0.1).run(x, y)
    exact = _exact_l2_distance(model, x)
    found = lp_norm(result.x_adv - x, "l2")
    assert result.success.all()
    assert (found >= exact - 1e-4).all()  # soundness: nothing closer than the boundary exists
    assert (found <= 1.15 * exact + 1e-3).all()


def test_linf_pgd_matches_the_analytic_optimum_of_a_binary_linear_model():
    """For f = w.(x - 0.5) + b the best L-inf attack moves every pixel by eps against the margin."""
    model = Linear(16, 2, scale=1.0)
    x = _centered(200, spread=0.02)
    y = model(x).argmax(1)
    eps = 0.05
    with torch.no_grad():
        margin = (model(x)[:, 0] - model(x)[:, 1]).abs()
    w = model.weight[0] - model.weight[1]
    breakable = margin < eps * w.abs().sum()
    result = PGD(model, eps=eps, steps=20, random_start=False).run(x, y)
    assert torch.equal(result.success, breakable)


def test_fgsm_equals_torchattacks(trained_mnist_model):
    model, test = trained_mnist_model
    x, y = test.float_images()[:64], test.y[:64]
    ours = FGSM(model, eps=0.1, precision="fp32")(x, y)  # the peer's arithmetic, to the bit
    theirs = torchattacks.FGSM(model, eps=0.1)(x, y)
    assert float((ours - theirs).abs().max()) <= 1e-6


def test_pgd_without_random_start_equals_torchattacks(trained_mnist_model):
    model, test = trained_mnist_model
    x, y = test.float_images()[:64], test.y[:64]
    ours = PGD(model, eps=0.1, steps=10, step_size=0.02, random_start=False, precision="fp32")(x, y)
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=10, random_start=False)(x, y)
    assert float((ours - theirs).abs().max()) <= 1e-6


def test_l2_pgd_agrees_with_torchattacks_pgdl2(trained_mnist_model):
    model, test = trained_mnist_model
    x, y = test.float_images()[:200], test.y[:200]
    eps, alpha, steps = 1.5, 0.3, 10
    ours = PGD(model, eps=eps, norm="l2", steps=steps, step_size=alpha, random_start=False,
               precision="fp32")(x, y)  # fmt: skip
    peer = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    theirs = peer(x, y)
    for adv in (ours, theirs):
        assert float((adv - x).flatten(1).norm(dim=1).max()) <= eps + 1e-5
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean()
        acc_ours = (model(ours).argmax(1) == y).float().mean()
        acc_theirs = (model(theirs).argmax(1) == y).float().mean()
    assert acc_ours < clean - 0.2  # the attack does something at this budget
    assert abs(float(acc_ours - acc_theirs)) <= 0.02, (float(acc_ours), float(acc_theirs))
    # same algorithm: the points agree up to float rounding, which the steps can amplify
    # at a few points where the loss is flat or the projection is active (seen: 1 of 200)
    gap = (ours - theirs).flatten(1).norm(dim=1)
    assert float(gap.median()) <= 1e-3 and float((gap > 1e-3).float().mean()) <= 0.05


def test_apgd_is_at_least_as_strong_as_torchattacks_apgd(trained_mnist_model):
    model, test = trained_mnist_model
    x, y = test.float_images()[:100], test.y[:100]
    ours = APGD(model, eps=0.15, steps=20, seed=0).run(x, y).success.float().mean()
    torch.manual_seed(0)
    adv = torchattacks.APGD(model, eps=0.15, steps=20, loss="ce", seed=0)(x, y)
    theirs = (model(adv).argmax(1) != y).float().mean()
    assert ours >= theirs - 0.02, (float(ours), float(theirs))


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("gradient read")


def test_square_never_reads_gradients(trained_mnist_model):
    model, test = trained_mnist_model
    guarded = nn.Sequential(nn.Module(), model)
    guarded[0].forward = _NoBackward.apply  # type: ignore[method-assign]
    x, y = test.float_images()[:32], test.y[:32]
    result = Square(guarded, eps=0.2, n_queries=100, seed=0).run(x, y)
    assert result.success.float().mean() > 0.2
    with pytest.raises(RuntimeError, match="gradient read"):
        PGD(guarded, eps=0.2, steps=1)(x, y)


def test_square_counts_queries_and_gets_stronger_with_more():
    model = Linear(16, 4, scale=0.5)
    x = _centered(40)
    y = model(x).argmax(1)
    few = Square(model, eps=0.05, n_queries=5, seed=0)
    many = Square(model, eps=0.05, n_queries=300, seed=0)
    s_few, s_many = few.run(x, y).success, many.run(x, y).success
    assert int(few.queries.max()) <= 5 and int(many.queries.max()) <= 300
    assert int((many.queries < 300).sum()) >= int(s_many.sum())  # fooled points stop querying
    assert s_many.sum() >= s_few.sum() and s_many.any()


def test_eot_averages_the_gradient_of_a_randomised_model():
    """f(x) = s * W x, s = +1 (p = 3/4) or -1: the expected margin gradient is half of s = +1's."""

    class RandomSign(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = Linear(16, 2)

        def forward(self, x):
            s = 1.0 if torch.rand(()) < 0.75 else -1.0
            return s * self.lin(x)

    model = RandomSign()
    x, y = _centered(4), torch.zeros(4, dtype=torch.long)
    w = model.lin.weight
    expected = 0.5 * (w[1] - w[0]).view(1, 1, 4, 4)  # gradient of margin z_1 - z_0
    torch.manual_seed(0)
    attack = EOT(PGD(model, eps=0.1, loss="margin"), n=4000)
    _, grad, _ = attack.loss_and_grad(x, y, None, "margin")
    scale = float(w.detach().abs().max())
    torch.testing.assert_close(grad, expected.detach().expand_as(grad), atol=0.05 * scale, rtol=0)
    torch.manual_seed(0)
    _, single, _ = PGD(model, eps=0.1, loss="margin").loss_and_grad(x, y, None, "margin")
    assert (single - expected).abs().max() > 0.4 * float(
        (w[1] - w[0]).detach().abs().max()
    )  # one draw is off


def test_bpda_gives_quantisation_a_gradient(trained_mnist_model):
    model, test = trained_mnist_model
    x, y = test.float_images()[:100], test.y[:100]

    def quantise(t):
        return torch.round(t * 3) / 3  # 2-bit depth: zero gradient almost everywhere

    masked = nn.Sequential(nn.Module(), model)
    masked[0].forward = quantise  # type: ignore[method-assign]
    adaptive = nn.Sequential(BPDA(quantise), model)
    with torch.no_grad():
        assert torch.equal(masked(x), adaptive(x))  # same function forward
    naive = PGD(masked, eps=0.3, steps=20, seed=0).run(x, y).success.float().mean()
    bpda = PGD(adaptive, eps=0.3, steps=20, seed=0).run(x, y).success.float().mean()
    assert bpda > naive + 0.3, (float(naive), float(bpda))


def test_universal_perturbation_fools_held_out_data_and_round_trips(trained_mnist_model, tmp_path):
    model, test = trained_mnist_model
    fit_set, held_out = test.subset(torch.arange(0, 300)), test.subset(torch.arange(300, 600))
    uap = UniversalPerturbation(model, xi=0.25, max_passes=2, delta=0.5, batch_size=50).fit(fit_set)
    v = uap.perturbation
    assert float(v.abs().max()) <= 0.25 + 1e-6
    rate = uap.fooling_rate(held_out)
    noise = torch.sign(torch.randn_like(v)) * 0.25  # a random perturbation of the same size
    with torch.no_grad():
        x = held_out.float_images()
        random_rate = (
            (model((x + noise).clamp(0, 1)).argmax(1) != model(x).argmax(1)).float().mean()
        )
    # On MNIST one image's DeepFool step is already close to xi, so the method is weak here
    # (about 12-15% at xi = 0.25); it must still beat random noise of the same size.
    assert rate > float(random_rate) + 0.04, (rate, float(random_rate))
    uap.save(tmp_path / "uap.safetensors")
    loaded = UniversalPerturbation.load(tmp_path / "uap.safetensors", model)
    assert torch.equal(loaded.perturbation, v) and loaded.fooling_rate(held_out) == rate


def test_bf16_pgd_is_as_strong_as_the_fp32_peer(trained_mnist_model):
    """Reduced precision is a speed option: on a trained model, bf16 PGD breaks as many
    points (judged in fp32) as torchattacks' fp32 PGD, within 2 of 200."""
    model, test = trained_mnist_model
    x, y = test.float_images()[:200], test.y[:200]
    ours = PGD(model, eps=0.1, steps=10, step_size=0.02, random_start=False, precision="bf16")
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=10, random_start=False)(x, y)
    result = ours.run(x, y)
    with torch.no_grad():
        truth = model(result.x_adv).argmax(1) != y  # fp32, outside the attack
        peer = int((model(theirs).argmax(1) != y).sum())
    assert torch.equal(result.success, truth)
    assert int(truth.sum()) >= peer - 2 and peer > 20

"""Contracts every registered attack keeps, checked over random shapes, budgets and norms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from robustlab.attacks import ATTACKS, AttackError, lp_norm
from tests.attacks.conftest import conv_net

# Tiny budgets: the invariants do not depend on attack strength.
FAST = {
    "fgsm": {},
    "bim": {"steps": 2},
    "pgd": {"steps": 2, "restarts": 2},
    "apgd": {"steps": 3},
    "apgd-t": {"steps": 3, "n_target_classes": 2},
    "square": {"n_queries": 6},
    "deepfool": {"steps": 3, "candidates": 3},
    "cw": {"steps": 3, "search_steps": 2},
}
NORMS = {"cw": ["l2"]}


def test_every_attack_is_covered():
    assert set(FAST) == set(ATTACKS.names())


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(FAST)))
    norm = draw(st.sampled_from(NORMS.get(name, ["linf", "l2"])))
    eps = draw(st.floats(0.0, 0.5 if norm == "linf" else 3.0))
    b, c, h = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3])), draw(st.integers(4, 9))
    seed = draw(st.integers(0, 2**16))
    extra = {"early_stop": draw(st.booleans())} if name in ("pgd", "bim", "apgd") else {}
    return name, norm, eps, (b, c, h, h), seed, extra


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_output_invariants_and_model_left_as_found(case):
    name, norm, eps, shape, seed, extra = case
    torch.manual_seed(seed)
    model = conv_net(shape[1])
    model.train()
    model[1].eval()  # a mixed-mode model must come back mixed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(shape)
    x[0, 0, 0, 0] = 0.0  # pixels at the box edges
    x[-1, -1, -1, -1] = 1.0
    y = torch.randint(0, 5, (shape[0],))
    attack = ATTACKS.get(name)(model, eps=eps, norm=norm, seed=seed, **FAST[name], **extra)
    result = attack.run(x, y)
    x_adv = result.x_adv
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not torch.isnan(x_adv).any()
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(lp_norm(x_adv - x, norm).max()) <= eps + 1e-6
    assert result.success.shape == (shape[0],) and result.success.dtype == torch.bool
    # success is what it claims to be
    model.eval()
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    assert torch.equal(result.success, pred != y)
    # model left as found
    model.train()
    model[1].eval()
    assert model.training and not model[1].training and model[0].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_is_used_and_restored():
    model = conv_net()
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    ATTACKS.get("pgd")(model, eps=0.1, steps=2)(torch.rand(2, 1, 5, 5), torch.tensor([0, 1]))
    assert seen and not any(seen) and model.training


def test_call_returns_the_same_points_as_run():
    model = conv_net()
    x, y = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 2])
    for name in ("pgd", "apgd", "square"):
        a = ATTACKS.get(name)(model, eps=0.1, seed=3, **FAST[name])
        assert torch.equal(a(x, y), a.run(x, y).x_adv), name


def test_seeded_attacks_are_reproducible():
    model = conv_net()
    x, y = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 2])
    for name in ("pgd", "apgd", "square"):
        runs = [ATTACKS.get(name)(model, eps=0.1, seed=7, **FAST[name])(x, y) for _ in range(2)]
        assert torch.equal(*runs), name


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, x, y, message",
    [
        (
            {},
            torch.rand(2, 1, 5, 5) * 2,
            torch.tensor([0, 1]),
            r"pixels in \[0, 1\].*normalisation",
        ),
        ({}, torch.full((2, 1, 5, 5), float("nan")), torch.tensor([0, 1]), "contains NaN"),
        ({}, torch.rand(2, 1, 5, 5), torch.tensor([0, 1, 2]), r"y must have shape \(2,\)"),
        ({}, torch.rand(2, 1, 5, 5), torch.tensor([0, 7]), r"labels must lie in 0\.\.4"),
        ({}, torch.rand(2, 1, 5, 5), torch.tensor([0.0, 1.0]), "integer class labels"),
        ({}, torch.randint(0, 2, (2, 1, 5, 5)), torch.tensor([0, 1]), "floating-point tensor"),
        ({"targeted": True}, torch.rand(2, 1, 5, 5), torch.tensor([0, 1]), "pass target="),
    ],
)
def test_bad_inputs_are_named(kwargs, x, y, message):
    attack = ATTACKS.get("pgd")(conv_net(), eps=0.1, steps=1, **kwargs)
    with pytest.raises(AttackError, match=message):
        attack(x, y)


def test_bad_settings_are_named():
    model = conv_net()
    with pytest.raises(AttackError, match="eps must be a finite number >= 0"):
        ATTACKS.get("pgd")(model, eps=-0.1)
    with pytest.raises(AttackError, match="unknown norm 'l1'"):
        ATTACKS.get("pgd")(model, eps=0.1, norm="l1")
    for name in ("fgsm", "pgd", "apgd"):
        with pytest.raises(AttackError, match="unknown loss 'hinge'"):
            ATTACKS.get(name)(model, eps=0.1, loss="hinge")
    with pytest.raises(AttackError, match="pgd needs eps"):
        ATTACKS.get("pgd")(model, eps=None)


def test_model_outputs_that_are_not_logits():
    class Tupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = conv_net()

        def forward(self, x):
            return self.net(x), {"aux": 1}

    x, y = torch.rand(2, 1, 5, 5), torch.tensor([0, 1])
    with pytest.raises(AttackError, match="returned tuple.*output_fn"):
        ATTACKS.get("fgsm")(Tupled(), eps=0.1)(x, y)
    x_adv = ATTACKS.get("fgsm")(Tupled(), eps=0.1, output_fn=lambda out: out[0])(x, y)
    assert float(lp_norm(x_adv - x, "linf").max()) <= 0.1 + 1e-6
    with pytest.raises(AttackError, match=r"a tensor of shape \(1, 5, 1\)"):
        ATTACKS.get("fgsm")(lambda x: conv_net()(x)[..., None], eps=0.1)(x, y)


@pytest.mark.parametrize("mode", ["random", "least_likely"])
def test_targeted_modes_reach_their_targets(mode):
    from tests.attacks.conftest import Linear

    model = Linear(16, 4, scale=3.0)
    x, y = torch.full((6, 1, 4, 4), 0.5) + 0.05 * torch.randn(6, 1, 4, 4), torch.arange(6) % 4
    x = x.clamp(0, 1)
    attack = ATTACKS.get("pgd")(model, eps=0.45, steps=30, targeted=mode, seed=0)
    result = attack.run(x, y)
    assert result.success.all()  # targeted success: the prediction is the target
    pred = model(result.x_adv).argmax(1)
    if mode == "least_likely":
        assert torch.equal(pred, model(x).scatter(1, y[:, None], float("inf")).argmin(1))
    assert (pred != y).all()


def test_apgd_early_stop_changes_the_cost_not_the_result():
    from tests.attacks.conftest import Linear

    model = Linear(16, 4, scale=0.5)
    g = torch.Generator().manual_seed(0)
    x = (0.5 + 0.05 * torch.randn(40, 1, 4, 4, generator=g)).clamp(0, 1)
    y = model(x).argmax(1)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    fast = ATTACKS.get("apgd")(model, eps=0.04, steps=20, seed=1, early_stop=True).run(x, y)
    n_fast, calls[:] = sum(calls), []
    full = ATTACKS.get("apgd")(model, eps=0.04, steps=20, seed=1, early_stop=False).run(x, y)
    assert 0 < int(fast.success.sum()) < 40
    assert torch.equal(fast.success, full.success)
    torch.testing.assert_close(fast.x_adv, full.x_adv, rtol=0, atol=1e-6)
    assert n_fast < 0.9 * sum(calls)  # fewer samples went through the model


def test_pgd_early_stop_keeps_the_first_adversarial_iterate():
    from tests.attacks.conftest import Linear

    model = Linear(16, 3, scale=0.5)
    g = torch.Generator().manual_seed(1)
    x = (0.5 + 0.05 * torch.randn(30, 1, 4, 4, generator=g)).clamp(0, 1)
    y = model(x).argmax(1)
    fast = ATTACKS.get("pgd")(model, eps=0.05, steps=30, seed=0, early_stop=True).run(x, y)
    full = ATTACKS.get("pgd")(model, eps=0.05, steps=30, seed=0).run(x, y)
    assert 0 < int(full.success.sum()) < 30
    # For an affine model the CE ascent never un-fools a point: both find the same points.
    assert torch.equal(fast.success, full.success)
    # early-stopped points sit closer to the clean image than the full run's
    moved = lambda r: (r.x_adv - x).flatten(1).abs().sum(1)  # noqa: E731
    assert (moved(fast)[fast.success] <= moved(full)[full.success] + 1e-6).all()


def test_fast_model_computes_the_same_function_and_leaves_the_original_alone():
    from robustlab.attacks import fast_model
    from robustlab.models import create_model

    model = create_model("wide_resnet", input_size=8, depth=10, width=1).train()
    fast = fast_model(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    (g_ref,) = torch.autograd.grad(model(x).sum(), x)
    (g_fast,) = torch.autograd.grad(fast(x).sum(), x)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    timed = fast_model(model, x.detach())  # layout chosen by timing both on the example
    torch.testing.assert_close(timed(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in timed.parameters())
    y = torch.tensor([0, 1, 2, 3])
    a = ATTACKS.get("pgd")(model, eps=0.1, steps=3, random_start=False)(x.detach(), y)
    b = ATTACKS.get("pgd")(fast, eps=0.1, steps=3, random_start=False)(x.detach(), y)
    assert float((a - b).abs().gt(1e-4).float().mean()) < 0.01  # sign flips only at ties

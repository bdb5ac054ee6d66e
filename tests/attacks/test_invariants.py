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
    with pytest.raises(AttackError, match="returned a tuple of 2 items; pass output_fn=0"):
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


# ----------------------------------------------------------------------------- budgets

MINIMUM_NORM = {"deepfool", "cw"}  # the attacks that may run without a budget


def _build(name, model, **kwargs):
    kwargs.setdefault("norm", NORMS.get(name, ["linf"])[0])
    return ATTACKS.get(name)(model, **{**FAST[name], **kwargs})


def test_minimum_norm_attacks_are_exactly_deepfool_and_cw():
    assert {n for n in ATTACKS.names() if ATTACKS.get(n).minimum_norm} == MINIMUM_NORM


@pytest.mark.parametrize("name", sorted(FAST))
@pytest.mark.parametrize(
    "eps",
    [float("nan"), float("inf"), float("-inf"), torch.tensor(float("nan")), -1e-9],
    ids=["nan", "inf", "-inf", "tensor-nan", "negative"],
)
def test_non_finite_or_negative_eps_is_refused(name, eps):
    with pytest.raises(AttackError, match="eps must be a finite number >= 0"):
        _build(name, conv_net(), eps=eps)


@pytest.mark.parametrize("name", sorted(FAST))
def test_eps_none_only_for_minimum_norm_attacks_and_non_numbers_refused(name):
    if name in MINIMUM_NORM:
        assert _build(name, conv_net(), eps=None).eps is None
    else:
        with pytest.raises(AttackError, match=f"{name} needs eps.*deepfool.*accept eps=None"):
            _build(name, conv_net(), eps=None)
    for bad in ("0.1", True, torch.tensor([0.1, 0.2])):
        with pytest.raises(AttackError, match="eps must be a number"):
            _build(name, conv_net(), eps=bad)


def test_universal_perturbation_refuses_a_non_finite_radius():
    from robustlab.attacks import UniversalPerturbation

    for xi in (float("nan"), float("inf"), -0.1):
        with pytest.raises(AttackError, match="finite xi >= 0"):
            UniversalPerturbation(conv_net(), xi=xi)


def _check_threat_model(x, x_adv, eps, norm):
    """The output contract, computed here without the library's norm helpers."""
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert torch.isfinite(x_adv).all()
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if eps is not None:
        d = (x_adv - x).flatten(1).double()
        dist = d.abs().amax(1) if norm == "linf" else d.pow(2).sum(1).sqrt()
        assert float(dist.max()) <= eps + 1e-6


# ----------------------------------------------------------------------------- targeted modes

# deepfool is untargeted and apgd-t picks its own targets: both refuse targeted=
TARGETABLE = {
    "fgsm": {},
    "bim": {"steps": 10, "step_size": 0.03},
    "pgd": {"steps": 10},
    "apgd": {"steps": 10},
    "square": {"n_queries": 60},
    "cw": {"steps": 30, "search_steps": 2, "lr": 0.05},
}


def test_untargeted_only_attacks_refuse_targeted():
    for name in ("deepfool", "apgd-t"):
        with pytest.raises(ValueError, match="untargeted|chooses its own targets"):
            ATTACKS.get(name)(conv_net(), eps=0.1, targeted="random")


@pytest.mark.parametrize("mode", [True, "random", "least_likely"])
@pytest.mark.parametrize("name", sorted(TARGETABLE))
def test_targeted_success_means_the_target_is_reached(name, mode):
    """Success of a targeted attack is `prediction == target`, not `prediction != label`."""
    from tests.attacks.conftest import Linear

    k = 5
    model = Linear(16, k, seed=1, scale=2.0)
    g = torch.Generator().manual_seed(2)
    x = (0.5 + 0.1 * torch.randn(40, 1, 4, 4, generator=g)).clamp(0, 1)
    with torch.no_grad():
        clean = model(x)
    y = clean.argmax(1)
    given = (y + 1 + torch.arange(40) % (k - 1)) % k if mode is True else None
    eps = None if name == "cw" else 0.15
    attack = ATTACKS.get(name)(model, eps=eps, targeted=mode, seed=0, **TARGETABLE[name])
    chosen = []  # the targets the attack resolved, to judge its success claims
    resolve = attack._resolve_target
    attack._resolve_target = lambda *a: chosen.append(resolve(*a)) or chosen[-1]
    result = attack.run(x, y, target=given)
    (target,) = chosen
    assert target.shape == y.shape and ((target >= 0) & (target < k)).all()
    assert (target != y).all()
    if mode is True:
        assert torch.equal(target, given)
    elif mode == "least_likely":  # the lowest clean logit, computed here
        ranked = clean.argsort(1)
        expected = torch.where(ranked[:, 0] == y, ranked[:, 1], ranked[:, 0])
        assert torch.equal(target, expected)
    else:
        assert len(set(target.tolist())) > 1  # random, not one fixed class
    _check_threat_model(x, result.x_adv, eps, "linf" if name != "cw" else "l2")
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred == target)
    assert result.success.any()  # not vacuous
    # some point ended in a wrong class that is not its target: there "success" must be False
    assert name == "cw" or bool(((pred != y) & (pred != target)).any()) or result.success.all()


# ----------------------------------------------------------------------------- dtypes, min-norm


@pytest.mark.parametrize("name", sorted(FAST))
def test_float64_inputs_give_float64_outputs_inside_the_threat_model(name):
    torch.manual_seed(0)
    model = conv_net(3).double().eval()
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    for norm in NORMS.get(name, ["linf", "l2"]):
        eps = 0.1 if norm == "linf" else 0.5
        result = _build(name, model, eps=eps, norm=norm, seed=0).run(x, y)
        _check_threat_model(x, result.x_adv, eps, norm)
        with torch.no_grad():
            pred = model(result.x_adv).argmax(1)
        assert torch.equal(result.success, pred != y), norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MINIMUM_NORM))
def test_minimum_norm_attacks_without_a_budget(name, dtype):
    from tests.attacks.conftest import Linear

    model = Linear(48, 4, seed=3, scale=0.5).to(dtype)
    x = torch.rand(5, 3, 4, 4, dtype=dtype)
    x[0] = 0.0  # a corner of the box: the boundary may lie outside [0, 1]
    y = model(x).argmax(1)
    opts = {"deepfool": {"steps": 20}, "cw": {"steps": 40, "search_steps": 3, "lr": 0.05}}[name]
    result = ATTACKS.get(name)(model, eps=None, **opts).run(x, y)
    _check_threat_model(x, result.x_adv, None, "l2")
    with torch.no_grad():
        pred = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred != y)
    assert result.success[1:].all()  # interior points of a linear model are always breakable


# ----------------------------------------------------------------------------- train mode


@pytest.mark.parametrize("name", sorted(FAST))
def test_train_mode_attack_restores_every_mode_and_running_statistic(name):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5),
    )  # fmt: skip
    for bn in (model[1], model[5]):  # statistics that differ from a fresh norm's
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    model.train()
    model[4].eval()  # one submodule in eval mode, the root in train mode
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []  # the mode batch norm ran in during the attack
    model[1].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
    norm = NORMS.get(name, ["linf"])[0]
    _build(name, model, eps=0.1, norm=norm, model_mode="train", seed=0).run(x, y)
    assert any(seen)  # batch statistics were used: the attack ran in train mode
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- EOT and BPDA


class _Noise(nn.Module):
    def forward(self, x):
        return x + 0.05 * torch.randn_like(x)


@pytest.mark.parametrize("name", sorted(FAST))
def test_eot_and_bpda_wrapped_attacks_keep_the_invariants(name):
    from robustlab.attacks import BPDA, EOT

    torch.manual_seed(0)
    model = nn.Sequential(BPDA(lambda t: torch.round(t * 7) / 7), _Noise(), conv_net())
    model.train()
    model[2][1].eval()
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 2])
    for norm in NORMS.get(name, ["linf", "l2"]):
        eps = 0.1 if norm == "linf" else 0.5
        plain = _build(name, model, eps=eps, norm=norm, seed=0)
        attack = EOT(plain, n=3)
        assert attack.eot_samples == 3 and plain.eot_samples == 1
        result = attack.run(x, y)
        _check_threat_model(x, result.x_adv, eps, norm)
        assert result.success.shape == (3,) and result.success.dtype == torch.bool
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- every step


class _Recorder(nn.Module):
    """The model, remembering every input it is shown."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


STEPWISE = {  # iterative settings whose unprojected iterates would leave the ball
    "fgsm": {},
    "bim": {"steps": 5, "step_size": 0.05},
    "pgd": {"steps": 5, "step_size": 0.06},
    "pgd-early-stop": {"steps": 5, "step_size": 0.06, "early_stop": True},
    "pgd-restarts": {"steps": 3, "step_size": 0.06, "restarts": 2},
    "apgd": {"steps": 10},
    "apgd-no-early-stop": {"steps": 10, "early_stop": False},
    "apgd-t": {"steps": 6, "n_target_classes": 2},
    "square": {"n_queries": 40},
}


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("case", sorted(STEPWISE))
def test_every_input_the_model_sees_lies_in_the_threat_model(case, norm):
    """Checks each attack's own per-step projection, not only the final re-projection."""
    name = case.split("-no-")[0].split("-early")[0].split("-restarts")[0]
    eps = 0.1 if norm == "linf" else 0.4
    opts = dict(STEPWISE[case])
    if norm == "l2" and "step_size" in opts:
        opts["step_size"] *= 4
    torch.manual_seed(0)
    model = _Recorder(conv_net().eval())
    x = torch.rand(6, 1, 6, 6)  # pairwise distances far above eps: each row has one owner
    x[0, 0, :2] = 0.0  # pixels on the box edges
    x[1, 0, :2] = 1.0
    with torch.no_grad():
        y = model.net(x).argmax(1)  # all clean-correct: every point is attacked
    ATTACKS.get(name)(model, eps=eps, norm=norm, seed=0, **opts).run(x, y)
    assert len(model.seen) >= (2 if name == "fgsm" else 4)
    flat_x = x.flatten(1).double()
    for i, batch in enumerate(model.seen):
        assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0, i
        diff = batch.flatten(1).double()[:, None, :] - flat_x[None]  # (rows, points, d)
        dist = diff.abs().amax(2) if norm == "linf" else diff.pow(2).sum(2).sqrt()
        nearest = dist.min(1).values
        assert float(nearest.max()) <= eps + 1e-6, (i, float(nearest.max()))


# ----------------------------------------------------------------------------- model outputs


class _Tupled(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        return logits, x.flatten(1)  # (logits, features)


class _Dicted(_Tupled):
    def forward(self, x):
        return {"features": x, "logits": self.net(x)}


@pytest.mark.parametrize("name", sorted(FAST))
def test_output_fn_selects_by_index_key_or_function(name):
    net = conv_net()
    x, y = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 2])
    eps = 0.1 if NORMS.get(name, ["linf"])[0] == "linf" else 0.5
    reference = _build(name, net, eps=eps, seed=5).run(x, y)
    for model, output_fn in [
        (_Tupled(net), 0),
        (_Dicted(net), "logits"),
        (_Dicted(net), lambda out: out["logits"]),
    ]:
        result = _build(name, model, eps=eps, seed=5, output_fn=output_fn).run(x, y)
        assert torch.equal(result.x_adv, reference.x_adv), output_fn
        assert torch.equal(result.success, reference.success), output_fn


def test_bad_output_fn_is_named():
    net = conv_net()
    x, y = torch.rand(2, 1, 5, 5), torch.tensor([0, 1])
    with pytest.raises(AttackError, match=r"output_fn=5 does not select.*2 items"):
        ATTACKS.get("fgsm")(_Tupled(net), eps=0.1, output_fn=5)(x, y)
    with pytest.raises(AttackError, match=r"output_fn='logit' does not select.*'logits'"):
        ATTACKS.get("fgsm")(_Dicted(net), eps=0.1, output_fn="logit")(x, y)
    with pytest.raises(AttackError, match=r"dict with keys.*pass output_fn='features'"):
        ATTACKS.get("fgsm")(_Dicted(net), eps=0.1)(x, y)
    with pytest.raises(AttackError, match=r"tensor of shape \(1, 1, 5, 5\)"):  # the features
        ATTACKS.get("fgsm")(_Dicted(net), eps=0.1, output_fn="features")(x, y)
    for bad in (1.5, True, [0]):
        with pytest.raises(AttackError, match="output_fn must be an index, a key or a function"):
            ATTACKS.get("fgsm")(net, eps=0.1, output_fn=bad)


def test_universal_perturbation_leaves_modes_as_found():
    from robustlab.attacks import UniversalPerturbation

    model = conv_net()
    model.train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    uap = UniversalPerturbation(model, xi=0.1, max_passes=1, deepfool_steps=2, candidates=3)
    uap.fit(torch.rand(8, 1, 6, 6))
    assert [m.training for m in model.modules()] == modes
    uap.fooling_rate(torch.rand(4, 1, 6, 6))
    assert [m.training for m in model.modules()] == modes

"""No silent success: an adversarial point met along the attack's path is returned even
when the last iterate is not adversarial, and ``run()`` says at which step each point
first broke. Checked on a model whose path is worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.attacks import PGD


class Window(nn.Module):
    """One pixel p. Class 1 wins only on the window (0.55, 0.65): z1 = 1 - 20 |p - 0.6|;
    z0 = 0; a third logit z2 = 10 p - 100 never wins but gives a loss that always grows
    with p, so the ascent walks through the window and out of it."""

    def forward(self, x):
        p = x.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(p), 1 - 20 * (p - 0.6).abs(), 10 * p - 100], 1)


def grows_with_p(logits, y, target):
    return logits[:, 2]


@pytest.mark.parametrize("need_success", [False, True])
def test_pgd_returns_the_adversarial_iterate_it_walked_past(need_success):
    # start 0.3, steps of 0.1: iterates 0.3, 0.4, 0.5, 0.6 (in the window), 0.7, 0.8
    x, y = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    attack = PGD(Window(), eps=0.5, steps=5, step_size=0.1, random_start=False, loss=grows_with_p)
    if need_success:
        result = attack.run(x, y)
        assert result.success.tolist() == [True]
        assert result.first_step.tolist() == [3]  # three steps from 0.3 to 0.6
        x_adv = result.x_adv
    else:
        x_adv = attack(x, y)
    assert float(x_adv) == pytest.approx(0.6)
    assert int(Window()(x_adv).argmax(1)) == 1


def test_a_label_free_pgd_returns_its_last_iterate_and_has_no_success():
    # the same walk through the window; a label-free loss (TRADES' KL) wants the last
    # iterate, 0.8, not the adversarial one the walk passed
    x, y = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    attack = PGD(Window(), eps=0.5, steps=5, step_size=0.1, random_start=False,
                 loss=grows_with_p, label_free=True)  # fmt: skip
    assert float(attack(x, y)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="label_free"):
        attack.run(x, y)
    for bad in ({"restarts": 2}, {"early_stop": True}):
        with pytest.raises(ValueError, match="restarts=1 and early_stop=False"):
            PGD(Window(), eps=0.5, loss=grows_with_p, label_free=True, **bad)


def test_a_gaussian_start_is_projected_onto_the_ball():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 4, 4)
    start = PGD(nn.Flatten(), eps=0.01, steps=1, random_start=0.5)._start(x)
    assert float((start - x).abs().max()) == pytest.approx(0.01)  # N(0, 0.25) mostly beyond
    assert float(start.min()) >= 0 and float(start.max()) <= 1
    small = PGD(nn.Flatten(), eps=0.5, steps=1, random_start=0.001)._start(x) - x
    assert 0.0005 < float(small.std()) < 0.002
    for bad in (0.0, -1.0, 1, "yes", float("nan")):
        with pytest.raises(ValueError, match="random_start"):
            PGD(nn.Flatten(), eps=0.1, random_start=bad)


def test_the_last_iterate_is_kept_when_it_fools_too():
    # start 0.3, steps of 0.1, 4 steps: the last iterate 0.7 is outside the window, but with
    # 3 steps the last one (0.6) is inside: it is returned as it is
    x, y = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    attack = PGD(Window(), eps=0.5, steps=3, step_size=0.1, random_start=False, loss=grows_with_p)
    result = attack.run(x, y)
    assert float(result.x_adv) == pytest.approx(0.6) and result.first_step.tolist() == [3]
    never = PGD(Window(), eps=0.05, steps=3, step_size=0.1, random_start=False, loss=grows_with_p)
    result = never.run(x, y)
    assert result.success.tolist() == [False] and result.first_step.tolist() == [-1]


def test_first_step_counts_restarts_and_early_stop():
    x, y = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    early = PGD(Window(), eps=0.5, steps=5, step_size=0.1, random_start=False,
                loss=grows_with_p, early_stop=True).run(x, y)  # fmt: skip
    assert early.first_step.tolist() == [3] and float(early.x_adv) == pytest.approx(0.6)
    # steps of 0.15 from 0.3: 0.45, 0.6 is reached at step 2 of the first restart
    r = PGD(Window(), eps=0.5, steps=4, step_size=0.15, random_start=False, loss=grows_with_p,
            restarts=3).run(x, y)  # fmt: skip
    assert r.first_step.tolist() == [2]


class LateWindow(Window):
    """The window opens only after ``closed`` forward passes: the first restart's path
    never fools the model, the second one's does."""

    def __init__(self, closed: int):
        super().__init__()
        self.calls, self.closed = 0, closed

    def forward(self, x):
        self.calls += 1
        out = super().forward(x)
        if self.calls <= self.closed:
            out = out.clone()
            out[:, 1] = -1.0
        return out


def test_first_step_counts_the_steps_of_earlier_restarts():
    x, y = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    # passes: 1 probe of the output size, then restart 1 = 4 gradient steps + 1 check: 6 closed
    model = LateWindow(closed=6)
    r = PGD(model, eps=0.5, steps=4, step_size=0.15, random_start=False, loss=grows_with_p,
            restarts=2).run(x, y)  # fmt: skip
    assert r.success.tolist() == [True]
    assert r.first_step.tolist() == [4 + 2]  # all of restart 1, then 2 steps of restart 2


def test_apgd_first_step_agrees_with_success_and_counts_runs(trained_mnist_model):
    from robustlab.attacks import APGD, APGDT

    model, test = trained_mnist_model
    x, y = test.float_images(slice(0, 48)), test.y[:48]
    for attack in (APGD(model, eps=0.1, steps=10, restarts=2, seed=0),
                   APGDT(model, eps=0.1, steps=10, n_target_classes=3, seed=0)):  # fmt: skip
        r = attack.run(x, y)
        assert torch.equal(r.success, r.first_step >= 0)
        with torch.no_grad():
            assert torch.equal(r.success, model(r.x_adv).argmax(1) != y)  # honest success
        runs = 2 if isinstance(attack, APGD) and not isinstance(attack, APGDT) else 3
        assert int(r.first_step.max()) <= runs * 10


class Capped(nn.Module):
    """One pixel p. z0 = 0, z1 = 10 min(p - 0.5, 0.01): class 1 wins for p > 0.5, but its
    margin never exceeds 0.1, so a confidence kappa = 1 is out of reach."""

    def forward(self, x):
        p = x.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(p), 10 * torch.clamp(p - 0.5, max=0.01)], 1)


@pytest.mark.parametrize("eps", [None, 0.5])
def test_cw_returns_a_fooling_point_that_never_reached_kappa(eps):
    from robustlab.attacks import CW

    x, y = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    result = CW(Capped(), eps=eps, kappa=1.0, steps=200, lr=0.05, search_steps=3).run(x, y)
    assert result.success.tolist() == [True]
    assert 0.5 < float(result.x_adv) <= 0.8  # misclassified, inside the budget
    assert int(Capped()(result.x_adv).argmax(1)) == 1


class GapBeforeConfidence(nn.Module):
    """One pixel p; the margin of class 1 is 10 (p - 0.5) minus 3 on (0.55, 0.64), a step
    with no gradient. So the gradient always pushes p up; class 1 wins (by less than
    1) on (0.5, 0.55], loses on (0.55, 0.64) and wins by at least 1.4 from 0.64 on."""

    def forward(self, x):
        p = x.flatten(1).mean(1)
        gap = ((p > 0.55) & (p < 0.64)).to(p.dtype)
        return torch.stack([torch.zeros_like(p), 10 * (p - 0.5) - 3 * gap], 1)


def test_cw_prefers_a_fooling_point_inside_the_budget_to_a_confident_one_outside():
    from robustlab.attacks import CW

    # from 0.3 with eps 0.29 the ball ends at 0.59: the confident points (>= 0.64) lie
    # outside and project to 0.59, where class 0 wins; the fooling ones (0.5, 0.55] inside
    x, y = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    attack = CW(GapBeforeConfidence(), eps=0.29, kappa=1.0, c=10.0, steps=200, lr=0.01,
                search_steps=1)  # fmt: skip
    result = attack.run(x, y)
    assert result.success.tolist() == [True]
    assert 0.5 < float(result.x_adv) <= 0.55


def test_deepfool_leaves_a_misclassified_point_where_it_is():
    from robustlab.attacks import DeepFool

    # z0 = p, z1 = 0.6 - p: class 1 below p = 0.3, class 0 above
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        model[1].bias.copy_(torch.tensor([0.0, 0.6]))
    x = torch.tensor([[0.2, 0.5, 0.5, 0.5], [0.8, 0.5, 0.5, 0.5]]).view(2, 1, 2, 2)
    y = torch.tensor([0, 0])  # the first is misclassified (class 1), the second is not
    assert model(x).argmax(1).tolist() == [1, 0]
    result = DeepFool(model, steps=10).run(x, y)
    # flipping the first one's (wrong) prediction would walk it back to its true class
    assert torch.equal(result.x_adv[0], x[0])
    assert result.success.tolist() == [True, True]
    assert float(result.x_adv[1, 0, 0, 0]) < 0.3  # the second crossed the boundary

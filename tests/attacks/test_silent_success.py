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

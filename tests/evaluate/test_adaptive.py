"""Adaptive evaluation of defended models: the columns a defense's declarations call for,
and the per-point worst case over them, against independent hand-built references."""

from __future__ import annotations

import pytest
import torch

import robustlab as rl
from robustlab.attacks import BPDA, PGD
from robustlab.defenses import DefendedModel, Defense
from robustlab.evaluate.adaptive import AdaptiveReport


class _Quantize(Defense):
    """2-bit depth: a non-differentiable defense (zero gradient almost everywhere)."""

    name = "test_quantize"
    differentiable = False

    def transform(self, x):
        return torch.round(x * 3) / 3


class _Noise(Defense):
    name = "test_noise"
    randomized = True

    def transform(self, x):
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def _robust_by_hand(model, x, y, attack_on, score_on, seed=0, eps=0.3):
    """Points classified correctly by ``score_on`` whose PGD example (made on ``attack_on``,
    one batch, seeded like the evaluation's first batch) is still classified correctly."""
    from robustlab.data.loader import batch_seed

    with torch.no_grad():
        ok = score_on(x).argmax(1) == y
    idx = ok.nonzero()[:, 0]
    s = batch_seed(seed, 0, 0, 0)
    torch.manual_seed(s)
    x_adv = PGD(attack_on, eps=eps, steps=10, seed=s, early_stop=True)(x[idx], y[idx])
    with torch.no_grad():
        ok[idx] = score_on(x_adv).argmax(1) == y[idx]
    return ok


def test_non_differentiable_defense_gets_bpda_and_transfer_columns(trained_mnist_model):
    model, test = trained_mnist_model
    defended = DefendedModel(model, [_Quantize()])
    kw = dict(attacks=["pgd:steps=10"], eps=[0.3], n=64, fast=False)
    report = rl.evaluate(defended, test, **kw)
    assert isinstance(report, AdaptiveReport)
    assert list(report.modes) == ["none", "naive", "bpda", "transfer"]
    naive, bpda = (report.modes[m].results[0].robust_accuracy for m in ("naive", "bpda"))
    assert naive > bpda + 0.2  # the naive attack is fooled by the masked gradient
    assert any("naive attack overstates" in w for w in report.warnings)
    # the worst case equals a hand-built per-point AND of naive, BPDA and transfer
    x, y = test.float_images()[:64], test.y[:64]
    by_hand = (
        _robust_by_hand(model, x, y, defended, defended)  # naive
        & _robust_by_hand(
            model,
            x,
            y,
            torch.nn.Sequential(BPDA(lambda v: torch.round(v * 3) / 3), model),
            defended,
        )
        & _robust_by_hand(model, x, y, model, defended)  # transfer
    )
    assert torch.equal(report.robust[0.3], by_hand)
    assert report.robust_accuracy[0] == pytest.approx(float(by_hand.float().mean()))
    assert report.robust_accuracy[0] <= min(
        r.results[0].robust_accuracy for m, r in report.modes.items() if m != "none"
    )
    assert "worst case" in report.table() and "bpda" in report.table()


def test_randomized_defense_gets_eot_columns_and_is_reproducible(trained_mnist_model):
    model, test = trained_mnist_model
    defended = DefendedModel(model, [_Noise()])
    kw = dict(attacks=["fgsm"], eps=[0.1], n=32, fast=False, eot_samples=4)
    a = rl.evaluate(defended, test, **kw)
    b = rl.evaluate(defended, test, **kw)
    assert list(a.modes) == ["none", "naive", "eot-4", "transfer"]
    assert a.robust_accuracy == b.robust_accuracy and torch.equal(a.robust[0.1], b.robust[0.1])
    both = DefendedModel(model, [_Noise(), _Quantize()])
    c = rl.evaluate(both, test, **{**kw, "eot_samples": 2})
    assert list(c.modes) == ["none", "naive", "bpda", "eot-2", "bpda+eot-2", "transfer"]


def test_adaptive_false_evaluates_the_defended_model_naively(trained_mnist_model):
    model, test = trained_mnist_model
    defended = DefendedModel(model, [_Quantize()])
    report = rl.evaluate(defended, test, attacks=["fgsm"], eps=[0.1], n=16, adaptive=False)
    assert not isinstance(report, AdaptiveReport)


def test_transfer_scores_the_surrogate_examples_on_the_model(trained_mnist_model):
    model, test = trained_mnist_model
    other = rl.create_model("lenet", in_channels=1, input_size=28)  # random weights
    report = rl.evaluate(model, test, attacks=["pgd:steps=10"], eps=[0.15], n=64,
                         transfer_from=other, fast=False)  # fmt: skip
    x, y = test.float_images()[:64], test.y[:64]
    assert torch.equal(report.robust[0.15], _robust_by_hand(model, x, y, other, model, eps=0.15))


class _Flaky(torch.nn.Module):
    """Predicts the true class (the label is encoded in the image) except with probability
    0.3 per call, when it predicts the next class: a randomized model of known accuracy."""

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 10).round().long()
        flip = (torch.rand(len(x)) < 0.3).long()
        return torch.nn.functional.one_hot((label + flip) % 10, 10) + 0.0 * x.flatten(1)[:, :1]


def test_randomized_models_are_scored_over_draws_worst_case_and_majority():
    """A point is robust in the worst case only if every draw is right, on the clean image
    and on its adversarial example (at eps 0 the image itself): 0.7^10 for 5 + 5 draws; by
    majority vote if most are, twice; scored once each, 0.7^2 (about 0.49)."""
    from robustlab.data import ImageDataset

    y = torch.arange(400) % 10
    data = ImageDataset(y.float()[:, None, None, None].expand(-1, 1, 2, 2) / 10, y, 10)
    kw = dict(attacks=["fgsm"], eps=[0.0], fast=False)
    scored = rl.evaluate(_Flaky(), data, **kw, rescore_draws=5)
    once = rl.evaluate(_Flaky(), data, **kw, rescore_draws=1)
    majority_5 = sum(  # P(at most 2 of 5 draws flip)
        __import__("math").comb(5, k) * 0.3**k * 0.7 ** (5 - k) for k in range(3)
    )
    assert scored.draws == 5 and once.draws == 1
    assert abs(scored.results[0].robust_accuracy - 0.7**10) < 0.03  # 0.028
    assert abs(scored.results[0].majority_accuracy - majority_5**2) < 0.06  # 0.70
    assert abs(once.results[0].robust_accuracy - 0.7 * 0.7) < 0.08  # clean draw, then one more
    assert "majority" in scored.table() and any("randomised" in w for w in scored.warnings)

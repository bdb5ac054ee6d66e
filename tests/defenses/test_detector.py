"""Feature-squeezing detector (Xu et al. 2018): the score against a hand computation, the
fitted false-positive rate, ROC/AUC against scikit-learn, modes left as found."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from torch import nn

from robustlab.defenses.detector import SqueezeDetector, roc_curve
from robustlab.defenses.squeeze import BitDepth
from robustlab.errors import ConfigError


class SumModel(nn.Module):
    """logits = [sum of pixels, 0]"""

    def forward(self, x):
        s = x.flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_score_by_hand():
    det = SqueezeDetector(SumModel(), ["bitdepth:bits=1", "median:size=2"])
    x = torch.tensor([[[[0.4, 0.4], [0.4, 0.4]]], [[[0.9, 0.9], [0.9, 0.1]]]], dtype=torch.float64)
    # image 0: sum 1.6; 1 bit -> all 0 (sum 0): L1(softmax[1.6, 0], [.5, .5]) = tanh(0.8);
    #   the median leaves a constant image alone (0).
    # image 1: sum 2.8; 1 bit -> 1, 1, 1, 0 (sum 3); the 2x2 median (window up-left,
    #   reflected, upper middle value) -> all 0.9 (sum 3.6): the larger distance
    #   2 (sigmoid(3.6) - sigmoid(2.8)).
    expected = [math.tanh(0.8), 2 * (sigmoid(3.6) - sigmoid(2.8))]
    np.testing.assert_allclose(det.score(x).numpy(), expected, rtol=1e-6)
    assert det.score(x).shape == (2,)


def test_modes_left_as_found_and_scoring_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5),
                          nn.Linear(8, 3))  # fmt: skip
    model.train()
    model[2].eval()  # a submodule the caller put in eval
    before = [m.training for m in model.modules()]
    stats = model[2].running_mean.clone()
    det = SqueezeDetector(model, ["bitdepth:bits=3"])
    x = torch.rand(6, 1, 4, 4)
    first, second = det.score(x), det.score(x)
    assert torch.equal(first, second)  # dropout off: eval mode while scoring
    assert [m.training for m in model.modules()] == before
    assert torch.equal(model[2].running_mean, stats)


def random_setup(n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    return model, torch.rand(n, 3, 4, 4)


@pytest.mark.parametrize("fpr", [0.05, 0.1, 1 / 3])
def test_fit_flags_floor_fpr_n_of_the_fit_data(fpr):
    model, x = random_setup(100)
    det = SqueezeDetector(model, [BitDepth(2), "median:size=2"]).fit(x, fpr=fpr)
    scores = det.score(x)
    assert len(torch.unique(scores)) == 100  # no ties: the count is exact
    assert int(det.detect(x).sum()) == math.floor(fpr * 100)
    assert det.threshold == float(scores.sort().values[math.ceil((1 - fpr) * 100 - 1e-9) - 1])


def test_fit_holds_on_held_out_clean_digits(trained_mnist_model):
    model, test = trained_mnist_model
    x = test.float_images(slice(0, 1000))
    det = SqueezeDetector(model, ["bitdepth:bits=1", "median:size=2"]).fit(x[:500], fpr=0.05)
    assert int(det.detect(x[:500]).sum()) == 25  # floor(0.05 * 500)
    held_out = float(det.detect(x[500:]).float().mean())
    assert abs(held_out - 0.05) <= 0.035, held_out  # 3.6 binomial standard deviations


def test_roc_curve_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 20, 300) / 10, rng.integers(5, 25, 200) / 10  # many ties
    ours = roc_curve(neg, pos)
    labels = np.r_[np.zeros(300), np.ones(200)]
    fpr, tpr, thresholds = sk_roc_curve(labels, np.r_[neg, pos], drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr)
    np.testing.assert_allclose(ours.tpr, tpr)
    np.testing.assert_array_equal(ours.thresholds, thresholds)
    assert ours.auc == pytest.approx(roc_auc_score(labels, np.r_[neg, pos]), abs=1e-12)
    perfect = roc_curve(np.array([0.1, 0.2]), np.array([0.3, 0.4]))
    assert perfect.auc == 1.0 and perfect.tpr[-1] == perfect.fpr[-1] == 1.0


def test_roc_on_pgd_examples_matches_sklearn(trained_mnist_model):
    from robustlab.attacks import PGD

    model, test = trained_mnist_model
    x, y = test.float_images(slice(0, 64)), test.y[:64]
    x_adv = PGD(model, eps=0.3, steps=10, seed=0)(x, y)
    det = SqueezeDetector(model, ["bitdepth:bits=1", "median:size=2"])
    result = det.roc(x, x_adv)
    scores = np.r_[det.score(x).numpy(), det.score(x_adv).numpy()]
    labels = np.r_[np.zeros(64), np.ones(64)]
    assert result.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert result.auc > 0.8  # Xu et al.: MNIST L-inf attacks are detected well


def test_errors():
    model, x = random_setup(4)
    with pytest.raises(ConfigError, match="non-empty list"):
        SqueezeDetector(model, [])
    with pytest.raises(ConfigError, match="non-empty list"):
        SqueezeDetector(model, "bitdepth:bits=1")
    with pytest.raises(ConfigError, match="unknown defense 'bitdept'"):
        SqueezeDetector(model, ["bitdept:bits=1"])
    det = SqueezeDetector(model, ["bitdepth:bits=1"])
    with pytest.raises(ConfigError, match="call fit"):
        det.detect(x)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"fpr must be in \(0, 1\)"):
            det.fit(x, fpr=bad)
    with pytest.raises(ValueError, match=r"expects pixels in \[0, 1\]"):
        det.score(x * 3)
    with pytest.raises(ConfigError, match="at least one clean and one adversarial"):
        roc_curve(np.array([]), np.array([0.5]))
    assert det.score(x[:0]).shape == (0,)

"""Attacking the squeezing detector adaptively: the joint classifier-plus-detector model
rejects exactly when the detector flags, the evasion objective and success rule by hand,
callable losses through the one PGD, and the naive-versus-adaptive evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.attacks import PGD, AttackError
from robustlab.defenses.detector import (
    DetectionPipeline,
    DetectorEvasion,
    SqueezeDetector,
    evasion_loss,
)
from robustlab.errors import ConfigError
from robustlab.evaluate.detection import evaluate_detector


def fitted_detector(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    det = SqueezeDetector(model, ["bitdepth:bits=2", "median:size=2"]).fit(torch.rand(200, 3, 4, 4))
    return model, det


def test_pipeline_rejects_exactly_when_the_detector_flags():
    model, det = fitted_detector()
    x = torch.rand(400, 3, 4, 4)
    out = DetectionPipeline(det)(x)
    assert out.shape == (400, 6)
    torch.testing.assert_close(out[:, :5], model(x))  # the classifier's logits unchanged
    score = det.score(x)
    clear = (score - det.threshold).abs() > 1e-4  # rounding at the threshold aside
    flagged = det.detect(x)
    assert flagged[clear].any() and (~flagged[clear]).any()
    assert torch.equal((out.argmax(1) == 5)[clear], flagged[clear])


def test_evasion_loss_by_hand():
    # classes 0..2, column 3 = rejected
    logits = torch.tensor(
        [
            [5.0, 1.0, 2.0, 0.0],  # correct (y=0), accepted: 2 - 5
            [1.0, 5.0, 2.0, 0.0],  # wrong class 1 beats y=0, accepted: 5 - 1
            [1.0, 5.0, 2.0, 9.0],  # wrong class 1 but rejected: 5 - 9
            [1.0, 5.0, 2.0, 4.0],  # wrong class 1, reject logit 4 < 5: 5 - 4
        ]
    )
    y = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(evasion_loss(logits, y), torch.tensor([-3.0, 4.0, -4.0, 1.0]))
    # targeted at class 2: z_2 - max(other columns, rejection included)
    target = torch.full((4,), 2)
    torch.testing.assert_close(
        evasion_loss(logits, y, target), torch.tensor([-3.0, -3.0, -7.0, -3.0])
    )


class Fixed(nn.Module):
    """Returns the same logits (B, 4) for any input, plus 0 * x so gradients exist."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.tensor(row)

    def forward(self, x):
        return self.row.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_evasion_success_excludes_rejection():
    x, y = torch.rand(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    rejected = DetectorEvasion(Fixed([0.0, 5.0, 1.0, 9.0]), eps=0.1, steps=2).run(x, y)
    assert not rejected.success.any()  # wrong class but rejected: the attack failed
    evaded = DetectorEvasion(Fixed([0.0, 5.0, 1.0, 2.0]), eps=0.1, steps=2).run(x, y)
    assert evaded.success.all()
    correct = DetectorEvasion(Fixed([5.0, 1.0, 1.0, 2.0]), eps=0.1, steps=2).run(x, y)
    assert not correct.success.any()


def test_callable_loss_runs_through_pgd_like_the_named_one():
    model, _ = fitted_detector()
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 5, (16,))

    def margin(logits, y, target):
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return other - logits.gather(1, y[:, None])[:, 0]

    named = PGD(model, eps=0.1, steps=5, loss="margin", seed=3)(x, y)
    function = PGD(model, eps=0.1, steps=5, loss=margin, seed=3)(x, y)
    assert torch.equal(named, function)
    with pytest.raises(AttackError, match="one value per sample"):
        PGD(model, eps=0.1, steps=1, loss=lambda z, y, t: z.sum())(x, y)


def test_pipeline_errors():
    model, _ = fitted_detector()
    with pytest.raises(ConfigError, match="fit the detector"):
        DetectionPipeline(SqueezeDetector(model, ["median:size=2"]))
    _, det = fitted_detector()
    for bad in (0, -1.0, True):
        with pytest.raises(ConfigError, match="weight must be > 0"):
            DetectionPipeline(det, weight=bad)
    with pytest.raises(ConfigError, match="another model"):
        evaluate_detector(nn.Linear(2, 2), det, None, eps=0.1)


def test_adaptive_attack_evades_what_the_naive_one_cannot(trained_mnist_model):
    """Xu et al.'s MNIST detector catches most naive examples; the adaptive attacker
    (BPDA through the bit-depth squeezer, exact gradients through the median) must be
    flagged far less often, and the headline is the per-point worst case of both."""
    model, test = trained_mnist_model
    det = SqueezeDetector(model, ["bitdepth:bits=1", "median:size=2"])
    det.fit(test.float_images(slice(500, 1000)), 0.05)  # held out from the 64 evaluated
    report = evaluate_detector(model, det, test, eps=[0.1], n=64, steps=20)
    print(report.table())
    x = test.float_images(slice(0, 64))
    flagged = det.detect(x)
    correct = model(x).argmax(1) == test.y[:64]
    assert report.false_positive_rate == pytest.approx(float(flagged.float().mean()))
    assert report.pipeline_clean_accuracy == pytest.approx(
        float((correct & ~flagged).float().mean())
    )
    for r in report.results:
        assert r.worst <= min(r.naive, r.adaptive) <= report.pipeline_clean_accuracy
        both = r.robust_naive & r.robust_adaptive  # the per-point worst case
        assert r.worst == pytest.approx(float(both.float().mean()))
        assert r.naive == pytest.approx(float(r.robust_naive.float().mean()))
        assert not (r.robust_naive & ~(correct & ~flagged)).any()  # robust needs a good start
        assert r.roc_naive is not None and r.fooling_naive > 10
    strong = report.results[-1]
    assert strong.detected_naive > 0.5  # Xu et al.: the naive examples are caught
    assert strong.detected_adaptive < strong.detected_naive - 0.3
    assert strong.adaptive < strong.naive
    assert "overstates the detector" in " ".join(report.warnings)
    assert "adaptive" in report.table() and report.to_dict()["results"][0]["roc_naive"]["auc"] > 0


def test_clean_false_positives_are_errors_and_the_adaptive_attack_runs_with_bpda(monkeypatch):
    """A flagged clean input counts against the pipeline; the adaptive attack's forward
    passes run with the squeezers' BPDA surrogates on."""
    from robustlab.data.base import ImageDataset

    model, det = fitted_detector()
    data = ImageDataset(torch.rand(40, 3, 4, 4), torch.zeros(40), num_classes=5)
    x = data.x
    data.y = model(x).argmax(1)  # every clean prediction correct
    det.fit(x, fpr=0.25)  # 10 of the 40 flagged
    seen = []
    forward = DetectionPipeline.forward

    def spy(self, inp):
        seen.append([s.use_surrogate_gradient for s in self.squeezers])
        return forward(self, inp)

    monkeypatch.setattr(DetectionPipeline, "forward", spy)
    report = evaluate_detector(model, det, data, eps=[0.01], steps=2)
    expected = float((~det.detect(x)).float().mean())
    assert report.pipeline_clean_accuracy == pytest.approx(expected)
    assert report.clean_accuracy == 1.0 and expected < 0.9
    assert seen and all(all(flags) for flags in seen)


def test_headline_is_the_per_point_worst_case(monkeypatch):
    """With adaptive attackers that break nothing, the headline is the naive figure (and
    the other way round): each point counts once, as its worse outcome."""
    from robustlab.attacks import Attack
    from robustlab.data.base import ImageDataset
    from robustlab.defenses.detector import SqueezedViews

    model, det = fitted_detector()
    data = ImageDataset(torch.rand(40, 3, 4, 4), torch.zeros(40), num_classes=5)
    data.y = model(data.x).argmax(1)

    def breaks_nothing(adaptive: bool):
        def call(self, x, y):
            is_adaptive = isinstance(self.model, (DetectionPipeline, SqueezedViews))
            return x if is_adaptive == adaptive else Attack.__call__(self, x, y)

        return call

    monkeypatch.setattr(PGD, "__call__", breaks_nothing(adaptive=True))
    report = evaluate_detector(model, det, data, eps=[0.3], steps=5)
    r = report.results[0]
    assert r.adaptive == report.pipeline_clean_accuracy > r.naive  # the naive attack broke some
    assert r.worst == r.naive
    monkeypatch.setattr(PGD, "__call__", breaks_nothing(adaptive=False))
    r = evaluate_detector(model, det, data, eps=[0.3], steps=5).results[0]
    assert r.naive == report.pipeline_clean_accuracy > r.adaptive
    assert r.worst == r.adaptive


def test_the_squeezed_views_attacker_counts_on_its_own(monkeypatch):
    """With the evasion attacker and the naive one breaking nothing, the points the
    squeezed-views attacker gets past the detector still count as broken."""
    from robustlab.attacks import Attack
    from robustlab.data.base import ImageDataset
    from robustlab.defenses.detector import SqueezedViews

    model, det = fitted_detector()
    data = ImageDataset(torch.rand(40, 3, 4, 4), torch.zeros(40), num_classes=5)
    data.y = model(data.x).argmax(1)

    def only_views(self, x, y):
        return Attack.__call__(self, x, y) if isinstance(self.model, SqueezedViews) else x

    monkeypatch.setattr(PGD, "__call__", only_views)
    report = evaluate_detector(model, det, data, eps=[0.3], steps=10)
    r = report.results[0]
    assert r.naive == report.pipeline_clean_accuracy
    assert r.adaptive < report.pipeline_clean_accuracy and r.worst == r.adaptive

"""Certified radii are never broken, and the last-layer form is the tighter one."""

from __future__ import annotations

import pytest
import torch

from robustlab.attacks import CW, PGD
from robustlab.certify import certified_radius, certify


@pytest.mark.parametrize("fixture", ["trained_mnist_model", "lmt_mnist_model"])
def test_no_attack_breaks_a_certificate(fixture, request):
    """A standard lenet and an LMT-trained MaxMin MLP: L2 PGD with a budget just below a
    point's certified radius never flips it, and every CW success lies beyond it."""
    model, test = request.getfixturevalue(fixture)
    x, y = test.float_images()[:200], test.y[:200]
    lmt = certified_radius(model, x, y, kind="lmt", method="fft")
    last = certified_radius(model, x, y, kind="last_layer", method="fft")
    assert bool((last.radius >= lmt.radius * (1 - 1e-6)).all())  # the tighter certificate
    assert bool((last.radius[~last.correct] == 0).all())
    certified = (last.radius > 0).nonzero()[:, 0]
    assert len(certified) > 100
    for i in certified[:25].tolist():
        r = float(last.radius[i])
        xi, yi = x[i : i + 1], y[i : i + 1]
        attack = PGD(model, eps=0.99 * r, norm="l2", steps=50, restarts=2, seed=0)
        assert not bool(attack.run(xi, yi).success), (i, r)  # a certificate is never broken
    # the attacks are not toothless: far beyond the radii they do succeed
    far = PGD(model, eps=4.0, norm="l2", steps=50, seed=0).run(x[certified[:25]], y[certified[:25]])
    assert far.success.float().mean() > 0.5
    cw = CW(model, steps=100).run(x[certified[:25]], y[certified[:25]])
    found = (cw.x_adv - x[certified[:25]]).flatten(1).norm(dim=1)
    assert bool((found[cw.success] >= last.radius[certified[:25]][cw.success]).all())


def test_certify_reports_accuracy_at_each_radius(trained_mnist_model):
    model, test = trained_mnist_model
    report = certify(model, test, radii=[0.0, 0.1, 0.5], n=300, method="fft")
    assert report.certified_accuracy[0] == pytest.approx(report.clean_accuracy)
    assert report.certified_accuracy == sorted(report.certified_accuracy, reverse=True)
    assert 0 < report.median_radius < 1.0
    assert "radius 0.5" in report.table()
    assert isinstance(report.lipschitz, float) and torch.isfinite(torch.tensor(report.lipschitz))

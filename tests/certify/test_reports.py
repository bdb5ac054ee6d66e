"""What the reports say: estimates are labelled as estimates, each Lipschitz figure says
what it is the constant of, and models returning tuples or dicts are certified."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustlab.certify import certified_radius, certify, lipschitz_bound
from robustlab.data import ImageDataset
from robustlab.nn.adapt import OutputError

SHAPE = (1, 6, 6)


def _layers(seed: int = 0) -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(seed)
    features = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 8), nn.ReLU(),
    )  # fmt: skip
    return features, nn.Linear(8, 3)


class Plain(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x):
        return self.head(self.features(x))


class TupleOut(Plain):
    def forward(self, x):
        h = self.features(x)
        return self.head(h), h


class DictOut(Plain):
    def forward(self, x):
        h = self.features(x)
        return {"features": h, "logits": self.head(h)}


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, *SHAPE, generator=g)
    return ImageDataset(x=x, y=torch.randint(0, 3, (48,), generator=g), num_classes=3)


@pytest.fixture(scope="module")
def plain_model() -> nn.Module:
    """An untrained model: its bounds and radii are what the comparisons need."""
    return Plain(*_layers()).eval()


@pytest.mark.parametrize("method", ["power", "fft"])
def test_power_iteration_is_labelled_an_estimate_everywhere(plain_model, data, method):
    bound = lipschitz_bound(plain_model, SHAPE, method=method)
    report = certify(plain_model, data, radii=[0.01, 0.1], method=method, kind="lmt")
    b, r = bound.to_dict(), report.to_dict()
    json.dumps(b), json.dumps(r)  # JSON-ready
    assert b["method"] == r["method"] == method
    first_line = report.table().splitlines()[0]
    if method == "power":
        assert b["guaranteed"] is False and r["guaranteed"] is False
        assert bound.table().startswith("estimated L2 Lipschitz constant")
        assert "not a guarantee" in bound.table().splitlines()[0]
        assert first_line.startswith(
            "estimated certified L2 accuracy (power iteration: not a guarantee)"
        )
        # no figure of an estimate is keyed as if proven
        assert "certified_accuracy" not in r and "median_radius" not in r
        assert r["estimated_certified_accuracy"] == report.certified_accuracy
        assert "estimate" in b["quantity"] and "estimate" in r["quantity"]
    else:
        assert b["guaranteed"] is True and r["guaranteed"] is True
        assert bound.table().startswith("L2 Lipschitz bound of the whole network")
        assert first_line.startswith("certified L2 accuracy") and "estimate" not in first_line
        assert r["certified_accuracy"] == report.certified_accuracy
        assert "estimated_certified_accuracy" not in r
    assert b["l2_lipschitz"] == bound.total
    assert r["lipschitz"]["value"] == report.lipschitz


def test_a_supplied_constant_is_not_called_a_guarantee(plain_model, data):
    report = certify(plain_model, data, radii=[0.1], kind="lmt", bound=3.0)
    assert report.method == "supplied" and not report.guaranteed
    assert "estimated_certified_accuracy" in report.to_dict()
    assert report.table().startswith("estimated certified L2 accuracy")


def test_each_lipschitz_figure_says_what_it_bounds(plain_model, data):
    """The whole network's bound and the sub-network's (below the last layer) are
    different numbers; each is labelled, and each is the constant of what it says."""
    whole = lipschitz_bound(plain_model, SHAPE, method="exact")
    below = lipschitz_bound(plain_model.features, SHAPE, method="exact")  # built by hand
    assert whole.table().startswith(
        f"L2 Lipschitz bound of the whole network (input to output): {whole.total:.6g}"
    )
    last = certify(plain_model, data, radii=[0.1], kind="last_layer", method="exact")
    lmt = certify(plain_model, data, radii=[0.1], kind="lmt", method="exact")
    assert last.lipschitz == pytest.approx(below.total, rel=1e-12)
    assert lmt.lipschitz == pytest.approx(whole.total, rel=1e-12)
    line = next(ln for ln in last.table().splitlines() if ln.strip().startswith("L ="))
    assert f"{below.total:.6g}" in line and "below its last linear layer" in line
    assert "||w_y - w_i||" in line  # how the radius uses it
    line = next(ln for ln in lmt.table().splitlines() if ln.strip().startswith("L ="))
    assert f"{whole.total:.6g}" in line and "whole network" in line and "sqrt(2)" in line
    assert last.to_dict()["lipschitz"]["of"] != lmt.to_dict()["lipschitz"]["of"]


@pytest.mark.parametrize(
    "wrapper, output",
    [(TupleOut, 0), (DictOut, "logits"), (TupleOut, lambda out: out[0])],
    ids=["tuple", "dict", "callable"],
)
def test_models_returning_several_values_are_certified_like_the_plain_model(
    plain_model, data, wrapper, output
):
    model = wrapper(plain_model.features, plain_model.head).eval()
    for method in ("fft", "power"):
        assert lipschitz_bound(model, SHAPE, method=method, output=output).total == pytest.approx(
            lipschitz_bound(plain_model, SHAPE, method=method).total, rel=1e-12
        )
    for kind in ("lmt", "last_layer"):
        got = certify(model, data, radii=[0.01, 0.05], kind=kind, output=output)
        want = certify(plain_model, data, radii=[0.01, 0.05], kind=kind)
        assert got.lipschitz == pytest.approx(want.lipschitz, rel=1e-12)
        assert got.point_radii == pytest.approx(want.point_radii, rel=1e-6)
        assert got.certified_accuracy == want.certified_accuracy
        assert max(want.point_radii) > 0  # some points are certified
        x, y = data.float_images()[:8], data.y[:8]
        cert = certified_radius(model, x, y, kind=kind, output=output)
        torch.testing.assert_close(
            cert.radius, certified_radius(plain_model, x, y, kind=kind).radius
        )


@pytest.mark.parametrize("wrapper, hint", [(TupleOut, "output=0"), (DictOut, "output='features'")])
def test_without_output_a_model_returning_several_values_gets_a_clear_error(
    plain_model, data, wrapper, hint
):
    model = wrapper(plain_model.features, plain_model.head).eval()
    with pytest.raises(OutputError, match=hint):
        lipschitz_bound(model, SHAPE)
    with pytest.raises(OutputError, match=hint):
        certify(model, data, radii=[0.1])
    with pytest.raises(OutputError, match=hint):
        certified_radius(model, data.float_images()[:4], data.y[:4])


def test_modes_are_restored_in_every_submodule(data):
    features, head = _layers()
    model = Plain(nn.Sequential(features, nn.Dropout(0.5)), head)
    model.train()
    model.features[0][0].eval()  # a submodule the caller put in eval mode stays there
    before = {name: m.training for name, m in model.named_modules()}
    lipschitz_bound(model, SHAPE)
    certify(model, data, radii=[0.1])
    assert {name: m.training for name, m in model.named_modules()} == before


def test_unselected_outputs_need_no_rule():
    """A model returning (logits, x.mean()): the unused mean (no Lipschitz rule) is ignored
    when output=0 selects the logits; the bound equals the plain model's."""
    from torch import nn

    from robustlab.certify import lipschitz_bound

    class WithStats(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x), x.mean()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    plain = lipschitz_bound(net, (1, 1, 4, 4)).total
    assert lipschitz_bound(WithStats(net), (1, 1, 4, 4), output=0).total == pytest.approx(plain)

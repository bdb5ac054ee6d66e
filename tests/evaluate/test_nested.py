"""evaluate() over several epsilons on a model whose vulnerability is not monotone in eps.

The model's class depends on sin(k * mean pixel) (class 0 on wide bands, class 1 on narrow
ones): an attack that moves every pixel by eps crosses into the other class for some
budgets and lands back in the true class for larger ones. A point broken at a small eps
must nevertheless count as broken at every larger eps (its adversarial example lies inside
the larger ball), so the robust masks must be nested. They are compared with a brute-force
reference that runs each attack directly on every point at every eps.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise

import torch
from torch import nn

from robustlab.attacks import FGSM, PGD
from robustlab.data import ImageDataset
from robustlab.evaluate import evaluate

EPS = [0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21, 0.24]
PERIOD = 0.4  # in mean-pixel units: bands of class 0 (width 0.3) and class 1 (width 0.1)


class Periodic(nn.Module):
    """Class 0 where sin(2 pi s / PERIOD) > -sin(pi / 4), else class 1; s the mean pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(2 * math.pi / PERIOD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 3.0 * (torch.sin(self.k * x.flatten(1).mean(1)) + math.sin(math.pi / 4))
        return torch.stack([z, -z], 1)


def _data(n: int = 64) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    s = 0.3 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64)  # one period of means
    noise = 0.05 * (torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1)
    noise -= noise.mean((1, 2, 3), keepdim=True)  # zero mean: the image's mean stays s
    x = (s[:, None, None, None] + noise).float()
    with torch.no_grad():
        y = Periodic()(x).argmax(1)
    y[:4] = 1 - y[:4]  # a few points the model already gets wrong
    return ImageDataset(x, y, 2)


# the attacks handed to evaluate(), and the same attacks built directly
SPECS = ["fgsm", "pgd:steps=3:random_start=false:early_stop=true"]


def _direct(model, eps):
    return [FGSM(model, eps=eps), PGD(model, eps=eps, steps=3, random_start=False, early_stop=True)]


def _reference(model, data):
    """Per point: robust at eps_j iff clean-correct and no attack broke it at any eps_i <= eps_j."""
    x, y = data.float_images(), data.y
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    broken = {e: [a.run(x, y).success for a in _direct(model, e)] for e in EPS}
    robust, ever = {}, torch.zeros_like(clean_ok)
    for e in EPS:
        for s in broken[e]:
            ever |= s
        robust[e] = clean_ok & ~ever
    return clean_ok, broken, robust


def test_robust_masks_are_nested_and_match_the_brute_force_reference(tmp_path):
    model, data = Periodic(), _data()
    clean_ok, broken, expected = _reference(model, data)
    any_broken = {e: broken[e][0] | broken[e][1] for e in EPS}
    # the premise: some clean-correct point is broken at a small eps and not at a larger one
    assert any(
        bool((clean_ok & any_broken[a] & ~any_broken[b]).any())
        for i, a in enumerate(EPS)
        for b in EPS[i + 1 :]
    )
    report = evaluate(model, data, attacks=SPECS, eps=EPS[::-1], batch_size=16, seed=3)
    assert sorted(report.robust) == EPS
    masks = [report.robust[e] for e in EPS]
    for small, large in pairwise(masks):
        assert not bool((large & ~small).any())  # robust at a larger eps => at a smaller one
    for e in EPS:
        assert torch.equal(report.robust[e], expected[e]), e
    # accuracies and per-stage counts agree with the reference too
    assert report.clean_accuracy == float(clean_ok.float().mean())
    still = clean_ok.clone()
    for r in report.results:
        assert r.robust_accuracy == float(expected[r.eps].float().mean())
        for stage, success in zip(r.stages, broken[r.eps]):
            assert stage.attacked == int(still.sum())
            assert stage.broken == int((still & success).sum())
            still &= ~success

    # resumed half-way (after the third eps) from a state file: the same masks
    state = tmp_path / "state.json"
    evaluate(model, data, attacks=SPECS, eps=EPS, batch_size=16, seed=3, state_file=state)
    saved = json.loads(state.read_text())
    for key in list(saved["stages"]):
        if int(key.split("/")[0]) >= 3:
            del saved["stages"][key]
    for table in ("robust", "majority"):  # the state as it was when eps 3 was running
        for key in list(saved[table]):
            if int(key) > 3:
                del saved[table][key]
    state.write_text(json.dumps(saved))
    resumed = evaluate(model, data, attacks=SPECS, eps=EPS, batch_size=16, seed=3, state_file=state)
    for e in EPS:
        assert torch.equal(resumed.robust[e], expected[e]), e

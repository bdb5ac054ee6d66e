"""The robust-evaluation engine: worst case, eps sweep, resume, warnings."""

from __future__ import annotations

import importlib
import json
from itertools import pairwise

import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.attacks import PGD, Square
from robustlab.errors import ConfigError
from robustlab.evaluate import evaluate, expand_attacks


def test_worst_case_is_monotone_and_below_clean(trained_mnist_model):
    model, test = trained_mnist_model
    report = evaluate(model, test, attacks=["fgsm", "pgd:steps=5"], eps=[0.2, 0.05, 0.1], n=120)
    assert [r.eps for r in report.results] == [0.05, 0.1, 0.2]  # sorted
    accs = [report.clean_accuracy] + [r.robust_accuracy for r in report.results]
    assert all(a >= b for a, b in pairwise(accs))
    for r in report.results:
        after = [s.robust_after for s in r.stages]
        assert all(a >= b for a, b in pairwise(after)) and after[-1] == r.robust_accuracy
    assert report.curve()[0] == (0.0, report.clean_accuracy)
    # the per-sample masks agree with the accuracies and only shrink with eps
    masks = [report.robust[e] for e in (0.05, 0.1, 0.2)]
    assert all(bool((b <= a).all()) for a, b in pairwise(masks))
    assert float(masks[-1].float().mean()) == report.results[-1].robust_accuracy


def test_points_left_robust_resist_the_attack_and_broken_ones_were_broken(trained_mnist_model):
    """Cross-check against running the same PGD directly on every point."""
    model, test = trained_mnist_model
    data = test.subset(100)
    report = evaluate(
        model, data, attacks=["pgd:steps=10:random_start=false"], eps=[0.1], batch_size=32
    )
    x, y = data.float_images(), data.y
    direct = PGD(model, eps=0.1, steps=10, random_start=False).run(x, y).success
    clean_ok = model(x).argmax(1) == y
    # deterministic attack (no random start): evaluation == direct, point by point
    assert torch.equal(report.robust[0.1], clean_ok & ~direct)


def test_resume_from_state_file_gives_the_same_report(trained_mnist_model, tmp_path, monkeypatch):
    robustness = importlib.import_module("robustlab.evaluate.robustness")

    model, test = trained_mnist_model
    kw = dict(attacks=["pgd:steps=3", "fgsm"], eps=[0.05, 0.1], n=90, batch_size=32, seed=1)
    full = evaluate(model, test, **kw)
    batches: list[tuple[int, ...]] = []  # (eps, attack, first point) of each batch run
    seed_of, run_batch = robustness.batch_seed, robustness._run_batch
    monkeypatch.setattr(robustness, "batch_seed", lambda *a: batches.append(a[1:]) or seed_of(*a))

    def interrupted(*args):  # a Ctrl-C in the second eps's first attack, second batch
        if batches[-1] == (1, 0, 32):
            raise KeyboardInterrupt
        return run_batch(*args)

    state = tmp_path / "state.json"
    monkeypatch.setattr(robustness, "_run_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, test, state_file=state, **kw)
    saved = json.loads(state.read_text())
    assert saved["stages"]["1/0"]["done"] is False and "1/1" not in saved["stages"]
    monkeypatch.setattr(robustness, "_run_batch", run_batch)
    batches.clear()
    resumed = evaluate(model, test, state_file=state, **kw)
    assert [r.robust_accuracy for r in resumed.results] == [r.robust_accuracy for r in full.results]
    assert all(torch.equal(resumed.robust[e], full.robust[e]) for e in full.robust)
    assert [[s.broken for s in r.stages] for r in resumed.results] == [
        [s.broken for s in r.stages] for r in full.results
    ]
    # only what was left ran: the second eps's first attack from its second batch, then
    # the second attack; nothing of the first eps
    assert batches and all(b[:2] in ((1, 0), (1, 1)) for b in batches), batches
    assert min(b[2] for b in batches if b[:2] == (1, 0)) == 32, batches
    # a state file from other settings is ignored, not trusted
    other = evaluate(model, test, state_file=state, **{**kw, "seed": 2})
    assert json.loads(state.read_text())["signature"] != saved["signature"]
    assert len(other.results) == 2


def test_gradient_masking_warning(trained_mnist_model):
    """Quantised inputs zero the gradient: PGD fails, Square does not, and the report says so."""
    model, test = trained_mnist_model
    masked = nn.Sequential(nn.Module(), model)
    masked[0].forward = lambda t: torch.round(t * 3) / 3  # type: ignore[method-assign]
    report = evaluate(
        masked, test, attacks=["pgd:steps=10", "square:n_queries=300"], eps=[0.3], n=64
    )
    stages = report.results[0].stages
    assert stages[1].broken > stages[0].broken
    assert report.validity.verdict("gradient_free_weaker") == "fail"
    assert report.validity.verdict("gradients") == "fail"  # the quantisation, seen directly
    assert "gradient_free_weaker" in report.table()
    # Square first: whatever it breaks says nothing about the gradient attacks after it.
    first = evaluate(masked, test, attacks=["square:n_queries=100", "pgd:steps=3"], eps=[0.3], n=32)
    assert first.results[0].stages[0].broken > 0
    assert first.validity.verdict("gradient_free_weaker") == "pass"


def test_randomised_model_warning():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 3)

        def forward(self, x):
            return self.lin(x.flatten(1) + 0.1 * torch.randn_like(x.flatten(1)))

    from robustlab.data import ImageDataset

    data = ImageDataset(torch.rand(20, 1, 4, 4), torch.arange(20) % 3, 3)
    report = evaluate(Noisy(), data, attacks=["fgsm"], eps=[0.1])
    assert any("randomised" in w and "EOT" in w for w in report.warnings)


def test_suites_and_bad_specs():
    assert [s.name for s in expand_attacks(["standard"])] == ["apgd", "apgd-t", "square"]
    assert expand_attacks(["standard"])[0].options == {"loss": "ce"}
    assert expand_attacks(["pgd:steps=40:restarts=5"])[0].options == {"steps": 40, "restarts": 5}
    with pytest.raises(ConfigError, match="unknown attack 'pdg'; did you mean 'pgd'"):
        expand_attacks(["pdg"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        expand_attacks(["pgd:steps"])
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    from robustlab.data import ImageDataset

    data = ImageDataset(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(
        ConfigError, match="attack 'pgd' has no option 'stepz'; did you mean 'steps'"
    ):
        evaluate(model, data, attacks=["pgd:stepz=3"], eps=[0.1])


def test_square_and_pgd_leave_a_train_mode_model_in_train_mode(trained_mnist_model):
    model, test = trained_mnist_model
    model.train()
    try:
        evaluate(model, test, attacks=["fgsm"], eps=[0.1], n=10)
        assert model.training
        x, y = test.float_images()[:4], test.y[:4]
        Square(model, eps=0.1, n_queries=3)(x, y)
        PGD(model, eps=0.1, steps=1)(x, y)
        assert model.training
    finally:
        model.eval()


class Unbreakable(nn.Module):
    """Class 0 by a margin of 10 everywhere, with a (zero) input gradient."""

    def forward(self, x):
        return torch.tensor([10.0, 0.0]) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_stage_cost_counts_the_passes_the_attack_made():
    """PGD-3 with early stop on points it cannot break: per batch one single-image probe,
    3 gradient passes per point and one forward per point to judge the result."""
    data = rl.ImageDataset(torch.rand(40, 1, 4, 4), torch.zeros(40, dtype=torch.long),
                           num_classes=2)  # fmt: skip
    report = evaluate(Unbreakable(), data, attacks=["pgd:steps=3"], eps=[0.1], batch_size=16,
                      checks=False, fast=False)  # fmt: skip
    stage = report.results[0].stages[0]
    assert (stage.attacked, stage.broken) == (40, 0)
    assert stage.gradients == 3 * 40
    assert stage.forwards == 40 + 3  # 3 batches: 16, 16, 8
    assert "where the time went" in report.table() and "120 gradient" in report.table()


class Noisy(nn.Module):
    """A randomized model: logits plus noise from torch's global generator."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x):
        z = self.lin(x.flatten(1))
        return z + 0.5 * torch.randn_like(z)


def test_validity_checks_do_not_depend_on_what_ran_before():
    """A sharded process reaches the checks with its generator wherever its last batch
    left it; the checks are seeded, so every layout checks the same way."""
    robustness = importlib.import_module("robustlab.evaluate.robustness")
    torch.manual_seed(0)
    model = Noisy().eval()
    data = rl.ImageDataset(torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,)), num_classes=3)
    report = evaluate(model, data, attacks=["fgsm"], eps=[0.1], checks=False, fast=False)
    tables = []
    for before in (1, 2, 3):
        torch.manual_seed(before)
        torch.rand(before * 7)  # a different generator state each time
        found = robustness._validity(model, data, report, [0.1], "linf", 16,
                                     torch.device("cpu"), seed=0)  # fmt: skip
        tables.append(found.table())
    assert tables[0] == tables[1] == tables[2]
    assert "noise" in tables[0]

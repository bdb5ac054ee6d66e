"""Validity checks: each fires on a model built to trip it, and stays silent on clean
models (a standard and a robustly trained one)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab as rl
from robustlab.evaluate.checks import (
    ValidityReport,
    model_checks,
    noise_accuracy,
    report_checks,
)
from robustlab.evaluate.robustness import EpsResult, EvalReport, StageResult

MODEL_CHECKS = {
    "deterministic", "logits", "saturation", "classes", "gradients", "noise_stability",
    "inner_gradients",
}  # fmt: skip


class Wrap(nn.Module):
    """``after(model(before(x)))``: a trained model with one thing broken."""

    def __init__(self, model, before=None, after=None):
        super().__init__()
        self.model, self.before, self.after = model, before, after

    def forward(self, x):
        x = self.before(x) if self.before else x
        out = self.model(x)
        return self.after(out) if self.after else out


def verdicts(model, x, y, **kw) -> dict[str, str]:
    checks = model_checks(model, x, y, **kw)
    assert {c.name for c in checks} == MODEL_CHECKS
    return {c.name: c.verdict for c in checks}


@pytest.fixture
def points(trained_mnist_model):
    model, test = trained_mnist_model
    return model, test.float_images(slice(0, 32)), test.y[:32]


def test_clean_models_trip_nothing(points, lmt_mnist_model, pgd_mnist_model):
    model, x, y = points
    assert set(verdicts(model, x, y, eps=0.1).values()) == {"pass"}
    for robust, _ in (lmt_mnist_model, pgd_mnist_model):  # certified-margin and PGD-trained
        assert set(verdicts(robust, x, y, eps=0.1).values()) == {"pass"}
    data = rl.ImageDataset(x, y, num_classes=10)
    pgd_model, _ = pgd_mnist_model
    report = rl.evaluate(pgd_model, data, attacks=["pgd:steps=10"], eps=[0.1, 0.3])
    assert not report.validity.flagged, report.validity.table()
    # legitimate oddities that are not masking: non-negative logits that are not
    # probabilities, and a model that looks only at the centre (zero gradient on 75%)
    shifted = Wrap(model, after=lambda z: z - z.amin(1, keepdim=True))
    assert set(verdicts(shifted, x, y, eps=0.1).values()) == {"pass"}
    centre = Wrap(model, before=lambda x: F.pad(x[..., 7:21, 7:21], (7, 7, 7, 7)))
    assert verdicts(centre, x, y, eps=0.1)["gradients"] == "pass"


@pytest.mark.parametrize(
    ("broken", "name", "verdict"),
    [
        (dict(after=lambda z: torch.softmax(z, 1)), "logits", "fail"),
        (dict(before=lambda x: torch.round(x * 3) / 3), "gradients", "fail"),  # quantised input
        (dict(before=lambda x: x.detach()), "gradients", "fail"),  # a gradient-killing layer
        (dict(after=lambda z: F.dropout(z, 0.5, training=True)), "deterministic", "warn"),
        (dict(after=lambda z: 1000 * z), "saturation", "warn"),  # a large temperature
        (dict(after=lambda z: z[:, :2]), "classes", "warn"),
        # a surface that flips at a scale far below eps: class 0's logit jumps by +-50
        (
            dict(
                after=lambda z: torch.cat([z[:, :1] + 50 * torch.sin(2e4 * z[:, :1]), z[:, 1:]], 1)
            ),
            "noise_stability",
            "warn",
        ),
    ],
)
def test_each_check_fires_on_the_model_built_to_trip_it(points, broken, name, verdict):
    model, x, y = points
    y = y % 2 if name == "classes" else y
    got = verdicts(Wrap(model, **broken), x, y, eps=0.1)
    assert got[name] == verdict, got
    line = next(c for c in model_checks(Wrap(model, **broken), x, y, eps=0.1) if c.name == name)
    assert line.next_step and line.reason  # says why and what to do


class Purified(nn.Module):
    """A dynamic defense: three gradient steps on the input towards smaller total
    variation, then the classifier (with ``.backward()`` or ``torch.autograd.grad``)."""

    def __init__(self, model, use_backward):
        super().__init__()
        self.model, self.use_backward = model, use_backward

    def forward(self, x):
        with torch.enable_grad():
            z = x.detach().clone().requires_grad_(True)
            for _ in range(3):
                tv = (z[..., 1:, :] - z[..., :-1, :]).abs().sum()
                if self.use_backward:
                    z.grad = None
                    tv.backward()
                    grad = z.grad
                else:
                    (grad,) = torch.autograd.grad(tv, z)
                z = (z - 0.01 * grad.sign()).clamp(0, 1).detach().requires_grad_(True)
        return self.model(x + (z - x).detach())


@pytest.mark.parametrize("use_backward", [False, True])
def test_gradients_computed_inside_forward_are_seen(points, use_backward):
    model, x, y = points
    got = verdicts(Purified(model, use_backward), x, y, eps=0.1)
    assert got["inner_gradients"] == "warn", got
    check = next(c for c in model_checks(Purified(model, use_backward), x, y, eps=0.1)
                 if c.name == "inner_gradients")  # fmt: skip
    assert check.evidence["autograd_calls"] == 3 and "BPDA" in check.next_step
    assert sys.getprofile() is None  # the watcher is gone afterwards


def test_still_moving_against_hand_made_loss_traces():
    from robustlab.evaluate.checks import _still_moving

    steps = torch.arange(21.0)
    traces = torch.stack(
        [
            steps,  # rising to the end: 2 of 20 in the last tenth
            torch.clamp(steps, max=10.0),  # flat since step 10
            torch.where(steps < 19, steps, 0.0),  # best reached at 18, then a drop: settled
            18 + 0.05 * (steps - 18).clamp(min=0) * 20,  # +2 over the last 2 steps of 20 range?
            torch.zeros(21),  # never moved (masked): nothing to complete
            # best 20 at step 10, a fall to 0 and a partial recovery to 5: the loss rises at
            # the end, the best (what the attack keeps) does not
            torch.where(steps <= 10, 2 * steps, (steps - 18).clamp(min=0) * 2.5),
        ],
        1,
    )
    # the fourth: min 18, max 21, best rises 18 -> 21 in the last two steps: 100% of its span
    assert _still_moving(traces).tolist() == [True, False, False, True, False, False]
    # a rise of 4% of the span in the last tenth is settled, 6% is not
    slow = torch.cat([torch.linspace(0, 0.96, 19), torch.tensor([0.98, 1.0])])
    quick = torch.cat([torch.linspace(0, 0.94, 19), torch.tensor([0.97, 1.0])])
    assert _still_moving(torch.stack([slow, quick], 1)).tolist() == [False, True]


def test_loss_settled_warns_for_a_stopped_ascent(points):
    model, x, y = points
    data = rl.ImageDataset(x, y, num_classes=10)
    # steps of 0.002 in a 0.2 ball: after 10 steps the loss is still climbing
    slow = rl.evaluate(model, data, attacks=["pgd:steps=10:step_size=0.002:random_start=false"],
                       eps=[0.2], checks="full")  # fmt: skip
    check = next(c for c in slow.validity.checks if c.name == "loss_settled")
    assert check.verdict == "warn" and check.evidence["cases"][0]["share"] > 0.5
    # APGD-T's trace is its first target's run, with its own (targeted DLR) loss
    apgdt = rl.evaluate(model, data, attacks=["apgd-t:steps=10:n_target_classes=2"],
                        eps=[0.05], checks="full")  # fmt: skip
    assert apgdt.validity.verdict("loss_settled") in ("pass", "warn")
    # a gradient-free attack first: no trace to read, no verdict
    square = rl.evaluate(model, data, attacks=["square:n_queries=20"], eps=[0.05], checks="full")
    assert "loss_settled" not in {c.name for c in square.validity.checks}


class Lottery(nn.Module):
    """Class 1 where the mean pixel exceeds 0.5, else class 0; no gradient anywhere. From
    the grey image only a random start can break it (about half of them do): doubling
    the steps adds nothing but fresh starts, doubling the restarts adds more."""

    def forward(self, x):
        up = (x.flatten(1).mean(1) > 0.5).float()
        return torch.stack([1 - up, up], 1) + 0 * x.flatten(1)[:, :1]


def test_converged_doubles_the_restarts_too():
    data = rl.ImageDataset(torch.full((64, 1, 4, 4), 0.5), torch.zeros(64), num_classes=2)
    report = rl.evaluate(Lottery(), data, attacks=["pgd:steps=2"], eps=[0.1], checks="full")
    check = next(c for c in report.validity.checks if c.name == "converged")
    assert check.verdict == "warn"
    options = {k for case in check.evidence["cases"] for k in ("steps", "restarts") if k in case}
    assert options == {"steps", "restarts"}, check.evidence
    restarts = next(c for c in check.evidence["cases"] if "restarts" in c)
    assert restarts["restarts"] == 2 and restarts["newly_broken"] > 0


def report_with(stages, robust=0.5):
    return EvalReport(
        n=10, norm="linf", clean_accuracy=0.9, attacks=[s.attack for s in stages], seed=0,
        results=[EpsResult(0.3, robust, stages)],
    )  # fmt: skip


def test_report_checks_gradient_free_beating_gradients_and_noise():
    pgd = StageResult("pgd:steps=10", broken=3, robust_after=0.6, attacked=9, seconds=1.0)
    square = StageResult("square", broken=1, robust_after=0.5, attacked=6, seconds=1.0)
    square_first = StageResult("square", broken=3, robust_after=0.6, attacked=9, seconds=1.0)
    nothing = StageResult("square", broken=0, robust_after=0.6, attacked=6, seconds=1.0)
    v = {c.name: c.verdict for c in report_checks(report_with([pgd, square]), noise=[0.7])}
    assert v == {"gradient_free_weaker": "fail", "noise_weaker": "pass"}
    v = {c.name: c.verdict for c in report_checks(report_with([square_first, pgd]), noise=[0.4])}
    assert v == {"gradient_free_weaker": "pass", "noise_weaker": "fail"}  # square ran first
    v = {c.name: c.verdict for c in report_checks(report_with([pgd, nothing]))}
    assert v == {"gradient_free_weaker": "pass"}


def test_noise_accuracy_against_a_hand_count():
    # logits = [0, mean pixel - 0.5]: class 1 iff the mean is above 0.5; sign noise of
    # size 0.2 moves the mean by at most 0.2, so points at mean 0.1 / 0.9 never change and
    # a point at 0.45 (class 0) flips once noise pushes the mean above 0.5.
    model = lambda x: torch.stack([torch.zeros(len(x)), x.flatten(1).mean(1) - 0.5], 1)  # noqa: E731
    x = torch.tensor([0.1, 0.9, 0.45]).view(3, 1, 1, 1).expand(3, 1, 1, 64).contiguous()
    y = torch.tensor([0, 1, 0])
    assert noise_accuracy(model, x, y, [0.01, 0.2], draws=8) == pytest.approx([1.0, 2 / 3])


def test_evaluate_reports_checks_and_a_weak_attack_trips_noise(points):
    model, x, y = points
    data = rl.ImageDataset(x, y, num_classes=10)
    report = rl.evaluate(model, data, attacks=["pgd:steps=10"], eps=[0.1])
    assert isinstance(report.validity, ValidityReport) and not report.validity.flagged
    assert report.to_dict()["validity"]["checks"]
    weak = rl.evaluate(model, data, attacks=["pgd:steps=1:step_size=1e-6:random_start=false"],
                       eps=[0.3])  # fmt: skip
    assert weak.validity.verdict("noise_weaker") == "fail"
    assert "noise_weaker" in weak.table()
    assert rl.evaluate(model, data, attacks=["fgsm"], eps=[0.1], checks=False).validity is None


def test_full_checks_pass_on_a_clean_model_and_fire_on_masked_and_weak(points):
    model, x, y = points
    data = rl.ImageDataset(x, y, num_classes=10)
    # APGD: a fixed-step PGD's loss is still creeping up at the end on points near the
    # boundary (loss_settled warns for pgd:steps=40 here, rightly)
    report = rl.evaluate(model, data, attacks=["apgd-ce:steps=50"], eps=[0.1, 0.2],
                         checks="full")  # fmt: skip
    v = {c.name: c.verdict for c in report.validity.checks}
    assert {v["unbounded"], v["single_step_weaker"], v["converged"], v["loss_settled"]} == {
        "pass"
    }, report.validity.table()
    # quantised input: zero gradients, so even an unbounded PGD stays put. On points whose
    # label differs from what the model says for random images, a random start would be
    # "adversarial" by chance and hide that: the check must start from the clean point.
    masked = Wrap(model, before=lambda t: torch.round(t * 3) / 3)
    with torch.no_grad():
        noise_class = masked(torch.rand(64, *x.shape[1:])).argmax(1).mode().values
    keep = y != noise_class
    subset = rl.ImageDataset(x[keep], y[keep], num_classes=10)
    report = rl.evaluate(masked, subset, attacks=["pgd:steps=5"], eps=[0.3], checks="full")
    assert report.validity.verdict("unbounded") == "fail"
    # an attack with a step far too small: FGSM beats it and doubling its steps is no help
    weak = rl.evaluate(model, data, attacks=["pgd:steps=2:step_size=1e-4:random_start=false"],
                       eps=[0.2], checks="full")  # fmt: skip
    assert weak.validity.verdict("single_step_weaker") == "fail"
    with pytest.raises(rl.ConfigError, match="checks must be"):
        rl.evaluate(model, data, attacks=["fgsm"], eps=[0.1], checks="all")


def test_doubling_steps_that_help_warns(points):
    """PGD-2 with a step of 0.02 from the clean point moves at most 0.04 of a 0.2 budget:
    doubling its steps breaks more points, so it had not converged."""
    model, x, y = points
    data = rl.ImageDataset(x, y, num_classes=10)
    report = rl.evaluate(model, data, attacks=["pgd:steps=2:step_size=0.02:random_start=false"],
                         eps=[0.2], checks="full")  # fmt: skip
    assert report.validity.verdict("converged") == "warn"


class OnlyTheCleanPoint(nn.Module):
    """Class 0 exactly on the grey image 0.5, class 1 anywhere else; no gradient anywhere
    (rounding). A random start is "adversarial" by chance; from the clean point an
    attack cannot move."""

    def forward(self, x):
        grey = (torch.round(x.flatten(1) * 1000) == 500).all(1).float()
        return torch.stack([grey, 1 - grey], 1) + 0 * torch.round(x.flatten(1)[:, :1])


def test_unbounded_check_starts_from_the_clean_point():
    data = rl.ImageDataset(torch.full((8, 1, 4, 4), 0.5), torch.zeros(8), num_classes=2)
    report = rl.evaluate(OnlyTheCleanPoint(), data, attacks=["pgd:steps=2"], eps=[0.1],
                         checks="full")  # fmt: skip
    assert report.validity.verdict("unbounded") == "fail"


def test_cli_eval_prints_and_saves_the_checks(tiny_config, capsys):
    import json

    from robustlab.cli import main
    from robustlab.train import Trainer

    run = Trainer(tiny_config("epochs=1")).fit()
    argv = ["eval", str(run), "--eps", "0.05", "--n", "16", "--attacks", "pgd:steps=3"]
    assert main([*argv, "--checks", "full"]) == 0
    saved = json.loads((run / "eval.json").read_text())["robust"]["validity"]["checks"]
    assert {"gradients", "noise_weaker", "unbounded", "converged"} <= {c["name"] for c in saved}
    assert main([*argv, "--checks", "off"]) == 0
    assert json.loads((run / "eval.json").read_text())["robust"]["validity"] is None


def test_a_defended_model_takes_the_checks_switch(points):
    from robustlab.defenses import defend

    model, x, y = points
    data = rl.ImageDataset(x[:16], y[:16], num_classes=10)
    defended = defend(model, ["bitdepth:bits=3"])
    report = rl.evaluate(defended, data, attacks=["pgd:steps=2"], eps=[0.1])
    assert report.modes["naive"].validity.verdict("gradients") == "fail"  # by design
    assert report.modes["bpda"].validity.verdict("gradients") == "pass"  # the surrogate's
    assert report.modes["transfer"].validity is None
    assert not any(w.startswith("naive: check") for w in report.warnings)
    off = rl.evaluate(defended, data, attacks=["pgd:steps=2"], eps=[0.1], checks=False)
    assert all(r.validity is None for r in off.modes.values())

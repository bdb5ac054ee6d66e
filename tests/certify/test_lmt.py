"""Lipschitz-Margin Training: the differentiable bound and the recipe."""

from __future__ import annotations

import torch

import robustlab as rl
from robustlab.certify import certify, lipschitz_bound
from robustlab.certify.radius import _last_linear
from robustlab.certify.training import LipschitzTracker
from robustlab.train import Trainer

SYNTH = "data.options={size: 12, n_train: 512, n_test: 200, num_classes: 4}"


def test_the_tracker_converges_to_the_exact_bound_and_has_gradients():
    torch.manual_seed(0)
    model = rl.create_model("small_cnn", in_channels=1, input_size=12, num_classes=4, bn=True)
    model.train()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.5, 2.0)
    tracker = LipschitzTracker(model, (1, 12, 12))
    for _ in range(100):  # one power step per call: many calls converge
        estimate = tracker()
    exact = lipschitz_bound(model, (1, 12, 12), method="exact", fold_bn=False).total
    assert abs(float(estimate.detach()) - exact) <= 1e-3 * exact
    estimate.backward()
    assert model[0].weight.grad is not None and model[1].weight.grad is not None  # conv, BN
    features, _ = _last_linear(model)
    head = LipschitzTracker(model, (1, 12, 12), upto="features")
    for _ in range(100):
        est_features = head()
    exact_features = lipschitz_bound(features, (1, 12, 12), method="exact", fold_bn=False).total
    assert abs(float(est_features.detach()) - exact_features) <= 1e-3 * exact_features


def test_lmt_training_certifies_far_larger_radii_than_standard_training(tiny_config):
    common = ["epochs=8", "optim.lr=0.001", SYNTH]
    lmt = ["name=lmt", "recipe.name=lmt", "recipe.options={c: 0.1, c_ramp_epochs: 3}"]
    runs = {
        "std": Trainer(tiny_config(*common, "name=std")).fit(),
        "lmt": Trainer(tiny_config(*common, *lmt)).fit(),
    }
    test = rl.load_dataset("synthetic", "test", size=12, n_train=512, n_test=200, num_classes=4)
    reports = {
        k: certify(rl.load(run), test, radii=[0.05], method="fft") for k, run in runs.items()
    }
    assert reports["lmt"].clean_accuracy > 0.9
    assert reports["lmt"].median_radius > 3 * reports["std"].median_radius
    assert reports["lmt"].certified_accuracy[0] > 0.5 > reports["std"].certified_accuracy[0]


def test_lmt_composes_with_adversarial_training_and_sat_activations(tiny_config):
    from robustlab.train.recipes import RECIPES

    recipe = RECIPES.get("lmt")(c=0.1, eps=0.5, norm="l2", steps=3)
    torch.manual_seed(0)
    model = rl.create_model("mlp", in_channels=1, input_size=12, num_classes=4, act="maxmin")
    x, y = torch.rand(16, 1, 12, 12), torch.randint(0, 4, (16,))
    x_adv = recipe.make_adversarial(model, x, y)
    gap = (x_adv - x).flatten(1).norm(dim=1)
    assert bool((gap <= 0.5 + 1e-5).all()) and float(gap.max()) > 0.1  # inside the L2 ball
    out = recipe.loss(model, x, y)
    assert out["eps"] == 0.5 and torch.isfinite(out["loss"])
    opts = (
        "recipe.options={c: 0.05, c_ramp_epochs: 1, eps: 0.3, norm: l2, steps: 2, activation: silu}"
    )
    run = Trainer(tiny_config("epochs=2", SYNTH, "recipe.name=lmt", opts)).fit()
    trained = rl.load(run)
    assert any(isinstance(m, torch.nn.SiLU) for m in trained.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in trained.modules())
    test = rl.load_dataset("synthetic", "test", size=12, n_train=512, n_test=200, num_classes=4)
    report = certify(trained, test, radii=[0.01], method="fft")
    assert report.clean_accuracy > 0.5 and report.median_radius > 0

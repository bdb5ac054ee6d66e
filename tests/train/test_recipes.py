"""Training recipes on tiny synthetic data."""

from __future__ import annotations

import json

import pytest
import torch

import robustlab as rl
from robustlab.attacks import PGD
from robustlab.train import Trainer, create_recipe


def test_pgd_recipe_ramps_eps_and_trains_on_points_inside_the_ball():
    recipe = create_recipe("pgd", eps=0.2, steps=3, eps_ramp_epochs=2)
    model = rl.create_model("mlp", in_channels=1, input_size=4, hidden=[8])
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x, y = torch.rand(6, 1, 4, 4), torch.arange(6) % 3
    for progress, expected in [(0.0, 0.0), (1.0, 0.1), (5.0, 0.2)]:
        recipe.progress = progress
        seen.clear()
        out = recipe.loss(model, x, y)
        assert float(out["eps"]) == pytest.approx(expected)
        trained_on = seen[-1]  # the last forward is the training pass
        assert float((trained_on - x).abs().max()) <= expected + 1e-6
        assert torch.isfinite(out["loss"]) and out["logits"].shape == (6, 10)
    assert all(p.grad is None for p in model.parameters())  # the attack left no gradients


def test_pgd_training_is_more_robust_than_standard_training(tiny_config):
    common = [
        "epochs=4",
        "optim.lr=0.003",
        "data.options={size: 12, n_train: 512, n_test: 200, num_classes: 4}",
    ]
    std = Trainer(tiny_config(*common, "name=std")).fit()
    adv = Trainer(tiny_config(*common, "name=adv", "recipe.name=pgd",
                              "recipe.options={eps: 0.1, steps: 5}")).fit()  # fmt: skip
    test = rl.load_dataset("synthetic", "test", size=12, n_train=512, n_test=200, num_classes=4)
    x, y = test.float_images(), test.y
    robust = {}
    for name, run in (("std", std), ("adv", adv)):
        model = rl.load(run)
        robust[name] = 1 - float(
            PGD(model, eps=0.1, steps=10, seed=0).run(x, y).success.float().mean()
        )
    assert robust["adv"] > robust["std"] + 0.1, robust
    rows = [json.loads(line) for line in (adv / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_eps"] == pytest.approx(0.1) for r in rows)

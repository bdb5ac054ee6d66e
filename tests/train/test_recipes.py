"""Training recipes on tiny synthetic data."""

from __future__ import annotations

import copy
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


# ----------------------------------------------------------------------------- all recipes

SYNTH = "data.options={size: 12, n_train: 256, n_test: 128, num_classes: 4}"
RECIPE_OPTIONS = {
    "standard": "{}",
    "fgsm": "{eps: 0.1}",
    "fast": "{eps: 0.1, guard_size: 32, guard_steps: 3}",
    "nfgsm": "{eps: 0.1}",
    "pgd": "{eps: 0.1, steps: 3}",
    "trades": "{eps: 0.1, steps: 3}",
    "advprop": "{eps: [0.05, 0.1], steps: 2}",
    "sat": "{eps: 0.1, steps: 3, activation: silu}",
}


@pytest.mark.parametrize("name", sorted(RECIPE_OPTIONS))
def test_every_recipe_trains_and_exports_a_plain_model(tiny_config, name):
    from robustlab.nn import AuxBatchNorm, SmoothGradReLU

    cfg = tiny_config(
        "epochs=3", SYNTH, "model.options={bn: true}", f"recipe.name={name}",
        f"recipe.options={RECIPE_OPTIONS[name]}", f"name={name}",
    )  # fmt: skip
    run = Trainer(cfg).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], rows
    assert rows[-1]["test_acc"] > 0.4  # 4 classes: chance is 0.25
    model = rl.load(run)
    assert not any(isinstance(m, (AuxBatchNorm, SmoothGradReLU)) for m in model.modules())
    meta = json.loads((run / "meta.json").read_text())
    fresh = rl.create_model(meta["model"]["name"], **meta["model"]["kwargs"])
    assert set(model.state_dict()) == set(fresh.state_dict())  # no auxiliary state leaks


def test_fgsm_recipe_loss_is_the_papers_mixture():
    torch.manual_seed(0)
    model = rl.create_model("mlp", in_channels=1, input_size=4, hidden=[8], num_classes=3)
    x, y = torch.rand(6, 1, 4, 4), torch.arange(6) % 3
    out = create_recipe("fgsm", eps=0.1).loss(model, x, y)
    # independent reference: the gradient sign step from the clean point
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y), xg)
    x_adv = (x + 0.1 * g.sign()).clamp(0, 1)
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * ce(model(x), y) + 0.5 * ce(model(x_adv), y)
    torch.testing.assert_close(out["loss"], expected)


def _trained_on(recipe, model, x, y):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    recipe.loss(model, x, y)
    handle.remove()
    return seen[-1]


def test_fast_trains_inside_the_ball_and_nfgsm_beyond_it():
    torch.manual_seed(0)
    model = rl.create_model("mlp", in_channels=1, input_size=8, hidden=[16], num_classes=3)
    x, y = torch.rand(64, 1, 8, 8) * 0.5 + 0.25, torch.arange(64) % 3
    fast = _trained_on(create_recipe("fast", eps=0.1, guard=False), model, x, y)
    assert float((fast - x).abs().max()) <= 0.1 + 1e-6
    nfgsm = _trained_on(create_recipe("nfgsm", eps=0.1), model, x, y)
    dist = (nfgsm - x).abs().flatten(1).amax(1)
    assert float(dist.max()) <= 0.3 + 1e-6  # noise 2 eps + step eps
    assert float(dist.min()) > 0.1  # unprojected: beyond the eps-ball, as the method says


def test_trades_inner_maximisation_raises_the_kl_and_stays_in_the_ball():
    from robustlab.train.recipes.trades import kl_clean_adv

    torch.manual_seed(0)
    model = rl.create_model("mlp", in_channels=1, input_size=6, hidden=[16], num_classes=4)
    x = torch.rand(32, 1, 6, 6)
    recipe = create_recipe("trades", eps=0.2, steps=10)
    x_adv = recipe.make_adversarial(model, x, torch.zeros(32, dtype=torch.long))
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    with torch.no_grad():
        clean = model(x)
        noise = (x + (torch.rand_like(x) * 2 - 1) * 0.2).clamp(0, 1)
        kl_adv = kl_clean_adv(clean, model(x_adv)).mean()
        kl_noise = kl_clean_adv(clean, model(noise)).mean()
    assert kl_adv > 5 * kl_noise


def _trades_paper_inner_max(model, x, eps, steps, step):
    """TRADES' inner maximisation written out from the paper (independent of PGD)."""
    with torch.no_grad():
        p_clean = torch.softmax(model(x), 1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(x - eps, x + eps).clamp(0, 1)
    for _ in range(steps):
        xa = x_adv.detach().requires_grad_(True)
        log_q = torch.log_softmax(model(xa), 1)
        kl = torch.nn.functional.kl_div(log_q, p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, xa)
        x_adv = torch.min(torch.max(xa.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("labels", ["true", "wrong"])
def test_trades_inner_maximisation_is_the_papers_and_ignores_the_labels(labels):
    torch.manual_seed(0)
    # float64: near the start the KL's gradient is second-order small, and float32 rounding
    # flips the sign of a few of its components between two correct computations
    model = rl.create_model(
        "small_cnn", in_channels=1, num_classes=10, input_size=8, bn=True
    ).double()
    model.train()  # the recipe attacks in eval mode (batch norm frozen) and puts the mode back
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(16) % 10 if labels == "true" else (torch.arange(16) + 3) % 10
    recipe = create_recipe("trades", eps=0.1, steps=5, step_size=0.03)
    torch.manual_seed(1)
    got = recipe.make_adversarial(model, x, y)
    assert model.training
    model.eval()
    torch.manual_seed(1)
    want = _trades_paper_inner_max(model, x, 0.1, 5, 0.03)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_smooth_gradient_ablation_switches_attacker_and_optimizer_separately():
    from robustlab.nn import SmoothGradReLU

    x, y = torch.rand(8, 1, 6, 6), torch.arange(8) % 3
    for where, attacker, optimizer in [("attacker", True, False), ("optimizer", False, True),
                                       ("both", True, True)]:  # fmt: skip
        recipe = create_recipe("pgd", eps=0.1, steps=2, smooth_grad=where)
        model = recipe.prepare(
            rl.create_model("mlp", in_channels=1, input_size=6, hidden=[8], num_classes=3)
        )
        acts = [m for m in model.modules() if isinstance(m, SmoothGradReLU)]
        assert acts
        flags: list[bool] = []
        acts[0].register_forward_hook(lambda m, a, o, flags=flags: flags.append(m.smooth))
        recipe.loss(model, x, y)
        # probe (1 pass, no gradient) + 2 attack steps, then the training pass
        assert flags[-3:-1] == [attacker, attacker] and flags[-1] == optimizer, (where, flags)
        assert not any(isinstance(m, SmoothGradReLU) for m in recipe.export(model).modules())


def test_smooth_activation_options_compose_with_every_recipe():
    from robustlab.nn import count_activations

    for name in ("fast", "trades", "advprop", "pgd", "fgsm", "nfgsm"):
        recipe = create_recipe(name, eps=0.1, activation="gelu")
        model = recipe.prepare(rl.create_model("small_cnn", in_channels=1, input_size=8, bn=True))
        assert count_activations(model) == {"GELU": 3}, name
    with pytest.raises(rl.ConfigError, match="smooth_grad"):
        create_recipe("pgd", activation="silu", smooth_grad="both")
    with pytest.raises(rl.UnknownNameError, match="smooth_grad"):
        create_recipe("pgd", smoth_grad="both")


def test_advprop_adversarial_pass_updates_only_auxiliary_running_statistics():
    from robustlab.nn import AuxBatchNorm

    torch.manual_seed(0)
    plain = rl.create_model("small_cnn", in_channels=1, input_size=8, bn=True, num_classes=3)
    recipe = create_recipe("advprop", eps=0.2, steps=2)
    model = recipe.prepare(rl.create_model("small_cnn", in_channels=1, input_size=8, bn=True,
                                           num_classes=3))  # fmt: skip
    strip = rl.nn.strip_aux_bn(model)
    plain.load_state_dict(strip.state_dict())
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 3
    model.train()
    torch.manual_seed(1)
    x_adv = recipe.make_adversarial(model, x, y, 0)  # the attack alone moves no statistic
    for m in model.modules():
        if isinstance(m, AuxBatchNorm):
            assert int(m.main.num_batches_tracked) == 0 and int(m.aux[0].num_batches_tracked) == 0
    torch.manual_seed(1)
    recipe.loss(model, x, y)  # same seed: the same adversarial batch
    # independent references: plain copies of the network fed clean or adversarial rows only
    main_ref, aux_ref = copy.deepcopy(plain).train(), copy.deepcopy(plain).train()
    main_ref(x)
    aux_ref(x_adv)
    bns = [m for m in model.modules() if isinstance(m, AuxBatchNorm)]
    bn_type = torch.nn.modules.batchnorm._BatchNorm
    refs_main = [m for m in main_ref.modules() if isinstance(m, bn_type)]
    refs_aux = [m for m in aux_ref.modules() if isinstance(m, bn_type)]
    assert len(bns) == len(refs_main) == 3
    for bn, rm, ra in zip(bns, refs_main, refs_aux):
        torch.testing.assert_close(bn.main.running_mean, rm.running_mean)
        torch.testing.assert_close(bn.main.running_var, rm.running_var)
        torch.testing.assert_close(bn.aux[0].running_mean, ra.running_mean)
        torch.testing.assert_close(bn.aux[0].running_var, ra.running_var)
        assert not torch.allclose(bn.main.running_mean, bn.aux[0].running_mean)


def test_advprop_run_saves_the_auxiliary_state_apart(tiny_config):
    from safetensors.torch import load_file

    run = Trainer(tiny_config("epochs=1", SYNTH, "model.options={bn: true}", "recipe.name=advprop",
                              "recipe.options={eps: 0.1, steps: 2}")).fit()  # fmt: skip
    aux = load_file(str(run / "aux_bn.safetensors"))
    model = load_file(str(run / "model.safetensors"))
    assert aux and all(".aux.0." in k for k in aux)
    assert not any("aux" in k or ".main." in k for k in model)


class _ConstantModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([20.0, 0.0]))

    def forward(self, x):
        return self.bias.expand(x.shape[0], 2) + 0 * x.flatten(1)[:, :1]


def test_the_fast_guard_restores_the_last_good_weights_when_pgd_accuracy_collapses():
    recipe = create_recipe("fast", eps=0.1, guard_size=8, guard_steps=2)
    model = _ConstantModel()
    recipe.set_holdout(torch.rand(8, 1, 2, 2), torch.zeros(8, dtype=torch.long))
    first = recipe.on_epoch_end(model, 0)
    assert first["guard_pgd_acc"] == 1.0 and not recipe.stop_training
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, 20.0]))  # collapsed: every point misclassified
    second = recipe.on_epoch_end(model, 1)
    assert second["guard_pgd_acc"] == 0.0 and second["guard_restored_epoch"] == 1.0
    assert recipe.stop_training
    assert torch.equal(model.bias, torch.tensor([20.0, 0.0]))  # the last good weights are back


def test_the_trainer_holds_the_guard_images_out_of_training(tiny_config):
    cfg = tiny_config("epochs=1", SYNTH, "recipe.name=fast",
                      "recipe.options={eps: 0.1, guard_size: 40}")  # fmt: skip
    trainer = Trainer(cfg)
    assert len(trainer.train_data) == 256 - 40
    guard = trainer.recipe.guard
    train_x = trainer.train_data.float_images()
    for image in guard.x.cpu():
        assert not (train_x == image).flatten(1).all(1).any()


def test_the_guard_state_survives_a_checkpoint_round_trip():
    from robustlab.train.trainer import decode_state, encode_state

    recipe = create_recipe("fast", eps=0.1, guard_size=8, guard_steps=2)
    model = _ConstantModel()
    recipe.set_holdout(torch.rand(8, 1, 2, 2), torch.zeros(8, dtype=torch.long))
    recipe.on_epoch_end(model, 0)
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(encode_state(recipe.state_dict(), tensors, "recipe")))
    resumed = create_recipe("fast", eps=0.1, guard_size=8, guard_steps=2)
    resumed.load_state_dict(decode_state(encoded, tensors))
    assert resumed.guard.last_acc == 1.0 and resumed.guard.last_epoch == 1
    assert torch.equal(resumed.guard.last_state["bias"], torch.tensor([20.0, 0.0]))


def test_smooth_grad_round_trip_of_an_untraceable_model():
    """prepare() swaps in the smooth-gradient ReLU and export() swaps plain ReLU back; on a
    model torch.fx cannot trace both swaps are verified by running the example batch."""
    from torch import nn

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc(x.flatten(1))
            if h.abs().sum() >= 0:  # data-dependent control flow: fx cannot trace it
                h = self.act(h)
            return self.out(h)

    torch.manual_seed(0)
    model, x = Untraceable(), torch.rand(4, 1, 4, 4)
    recipe = create_recipe("standard", smooth_grad="both")
    prepared = recipe.prepare(model, example=x[:2])
    assert type(prepared.act).__name__ == "SmoothGradReLU"
    exported = recipe.export(prepared)
    assert type(exported.act) is nn.ReLU
    assert torch.equal(exported(x), model(x))  # the same function as the original network

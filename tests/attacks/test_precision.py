"""Reduced precision in attacks: faster passes, but success is decided in fp32.

The model below has logits near 100, where bf16 represents only every 0.5: fp32 says
the point is correctly classified (z1 - z0 = 0.1), bf16 rounds both logits to 100 (a
tie, argmax 0: "fooled"). Moving the pixels down by 0.03 fools it for real (z1 - z0 =
-0.02 in fp32).
An attack that trusted bf16 would report a false success, or freeze the point where
bf16 called it fooled; the fp32 confirmation does neither.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustlab.attacks import APGD, CW, FGSM, PGD, DeepFool, Square, base
from robustlab.attacks.base import AttackError


def near_tie() -> nn.Module:
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[25.0] * 4, [26.0] * 4]))
        lin.bias.copy_(torch.tensor([0.0, -3.9]))
    return nn.Sequential(nn.Flatten(), lin).eval()


X = torch.ones(3, 1, 2, 2)
Y = torch.ones(3, dtype=torch.long)


def fp32_fooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.double().clamp(0, 1)).argmax(1) != Y  # float64: the exact answer


def test_the_model_ties_in_bf16_and_not_in_fp32():
    model = near_tie()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(X)
    assert torch.equal(z[:, 0], z[:, 1])  # bf16 would call every point fooled
    assert not fp32_fooled(model.double(), X.double()).any()


def test_a_bf16_false_success_is_not_reported():
    model = near_tie()
    for attack in (  # neither can move; FGSM leaves the judging to the base class
        PGD(model, eps=0.0, steps=3, precision="bf16"),
        FGSM(model, eps=0.0, precision="bf16"),
    ):
        assert not attack.run(X, Y).success.any(), type(attack).__name__


@pytest.mark.parametrize("early_stop", [True, False])
def test_a_bf16_false_success_does_not_stop_the_attack(early_stop):
    model = near_tie()
    attack = PGD(model, eps=0.1, steps=10, step_size=0.03, random_start=False,
                 early_stop=early_stop, precision="bf16")  # fmt: skip
    result = attack.run(X, Y)
    truth = fp32_fooled(copy.deepcopy(model).double(), result.x_adv.double())
    assert result.success.all() and truth.all()


def test_apgd_and_square_confirm_in_fp32_too():
    model = near_tie()
    for attack in (
        APGD(model, eps=0.1, steps=10, early_stop=True, precision="bf16", seed=0),
        Square(model, eps=0.1, n_queries=50, precision="bf16", seed=0),
    ):
        result = attack.run(X, Y)
        truth = fp32_fooled(copy.deepcopy(model).double(), result.x_adv.double())
        assert torch.equal(result.success, truth), type(attack).__name__
    frozen = APGD(model, eps=0.0, steps=5, early_stop=True, precision="bf16", seed=0).run(X, Y)
    assert not frozen.success.any()


def test_auto_precision_only_where_it_was_measured(monkeypatch):
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3)).eval()
    conv(torch.rand(1, 1, 5, 5))
    x = torch.rand(2, 1, 5, 5)
    monkeypatch.setattr(base, "_CPU_BF16", True)
    assert PGD(conv, eps=0.1)._reduced_dtype(x) == torch.bfloat16
    assert PGD(conv, eps=0.1, precision="fp32")._reduced_dtype(x) is None
    assert PGD(conv, eps=0.1, model_mode="train")._reduced_dtype(x) is None
    assert DeepFool(conv)._reduced_dtype(x) is None  # boundary distances: fp32
    assert CW(conv)._reduced_dtype(x) is None
    assert Square(conv, eps=0.1)._reduced_dtype(x) is None  # close losses compared: fp32
    assert PGD(conv.double(), eps=0.1)._reduced_dtype(x.double()) is None
    assert PGD(lambda t: t.flatten(1)[:, :3], eps=0.1)._reduced_dtype(x) is None
    monkeypatch.setattr(base, "_CPU_BF16", False)
    assert PGD(conv.float(), eps=0.1)._reduced_dtype(x) is None


def test_precision_is_checked():
    model = near_tie()
    with pytest.raises(AttackError, match="unknown precision 'bf61'"):
        PGD(model, eps=0.1, precision="bf61")
    with pytest.raises(AttackError, match="CUDA"):
        PGD(model, eps=0.1, precision="fp16")(X, Y)
    with pytest.raises(AttackError, match="model_mode='eval'"):
        PGD(model, eps=0.1, precision="bf16", model_mode="train")
    for minimum_norm in (DeepFool, CW):  # the distance to the boundary is the answer
        with pytest.raises(AttackError, match="smallest perturbation"):
            minimum_norm(model, precision="bf16")


def test_the_model_and_the_input_layout_are_left_as_they_were():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(5, 1, 4, 4), torch.zeros(5, dtype=torch.long)
    out = PGD(model, eps=0.1, steps=3, precision="bf16", channels_last=True)(x, y)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous(), k


@pytest.mark.parametrize("recipe", ["pgd", "fgsm", "nfgsm", "trades", "fast", "advprop"])
def test_training_attacks_stay_in_fp32_where_bf16_would_be_auto(recipe, monkeypatch):
    """bf16 attacks are measured for evaluation, not for what they do to a trained model."""
    from robustlab.train.recipes import create_recipe

    monkeypatch.setattr(base, "_CPU_BF16", True)
    seen: list = []
    resolve = base.Attack._reduced_dtype
    monkeypatch.setattr(base.Attack, "_reduced_dtype",
                        lambda self, x: seen.append(resolve(self, x)) or seen[-1])  # fmt: skip
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 3))  # fmt: skip
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
    assert PGD(net.eval(), eps=0.1)._reduced_dtype(x) == torch.bfloat16  # auto would pick it
    seen.clear()
    r = create_recipe(recipe, eps=0.1)
    model = r.prepare(net.train())
    out = r.loss(model, x, y)
    assert torch.isfinite(out["loss"])
    assert seen and all(d is None for d in seen), seen

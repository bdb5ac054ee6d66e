"""AdvProp routes each batch through the right batch norms.

Every norm (main and each auxiliary one) is given its own affine parameters and running
statistics, so a batch routed to the wrong norm gives different numbers. References are
plain copies of the network whose BatchNorms hold one norm's state:

- the adversarial examples for strength i equal PGD's (same settings and seed) on the
  copy holding auxiliary norm i, run with batch statistics as the recipe does, and the
  attack moves no running statistic;
- the training pass sends the clean rows through the main norms and the rows of
  strength i through auxiliary norm i (logits, loss and the running statistics each
  norm ends with all match the references).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks import PGD
from robustlab.nn import AuxBatchNorm
from robustlab.train.recipes.advprop import AdvProp

LEVELS = [0.05, 0.1, 0.2]  # one auxiliary norm per strength
STEPS = 3


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4),
    )  # fmt: skip


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _norm_state(r: int, layer: int, c: int) -> dict[str, torch.Tensor]:
    """Distinct state for norm r (0 main, i + 1 auxiliary i) of batch-norm layer ``layer``."""
    g = torch.Generator().manual_seed(100 * r + layer)
    return {
        "weight": 0.5 + 0.5 * r + 0.3 * torch.rand(c, generator=g),
        "bias": 0.4 * r - 0.5 + 0.2 * torch.randn(c, generator=g),
        "running_mean": 0.3 * r + torch.randn(c, generator=g),
        "running_var": 0.5 + r + torch.rand(c, generator=g),
        "num_batches_tracked": torch.tensor(10 + r),
    }


def _load(bn: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in state.items():
            getattr(bn, k).copy_(v)


def _setup():
    recipe = AdvProp(eps=LEVELS, steps=STEPS)
    model = recipe.prepare(net())
    aux_bns = [m for m in model.modules() if isinstance(m, AuxBatchNorm)]
    assert len(aux_bns) == 2 and all(len(m.aux) == len(LEVELS) for m in aux_bns)
    for layer, m in enumerate(aux_bns):
        for r, bn in enumerate([m.main, *m.aux]):
            _load(bn, _norm_state(r, layer, bn.num_features))
    model.train()
    return recipe, model, aux_bns


def _reference(model: nn.Module, r: int) -> nn.Module:
    """A plain network: the prepared model's other weights, norm r's state in its BatchNorms."""
    ref = net()
    shared = {k: v for k, v in model.state_dict().items() if k in ref.state_dict()}
    missing = ref.load_state_dict(shared, strict=False).missing_keys
    assert all(k.split(".")[0] in ("1", "5") for k in missing)  # only the norms come apart
    for layer, bn in enumerate(_bns(ref)):
        _load(bn, _norm_state(r, layer, bn.num_features))
    return ref.train()


def _snapshot(aux_bns):
    return [{k: v.clone() for k, v in bn.state_dict().items()} for m in aux_bns for bn in m.norms()]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(12, 1, 6, 6, generator=g), torch.arange(12) % 4


def _pgd(ref: nn.Module, eps: float, x, y):
    """PGD with the recipe's settings: random-target, 1.25 eps / steps, batch statistics."""
    attack = PGD(ref, eps=eps, steps=STEPS, step_size=1.25 * eps / STEPS, targeted="random",
                 model_mode="train")  # fmt: skip
    return attack(x, y)


@pytest.mark.parametrize("i", range(len(LEVELS)))
def test_adversarial_examples_are_made_through_auxiliary_norm_i(i):
    recipe, model, aux_bns = _setup()
    refs = [_reference(model, r) for r in range(len(LEVELS) + 1)]
    x, y = _batch()
    before = _snapshot(aux_bns)
    torch.manual_seed(7)
    x_adv = recipe.make_adversarial(model, x, y, i)
    after = _snapshot(aux_bns)
    for b, a in zip(before, after):  # the attack moves no statistic of any norm
        for k in b:
            assert torch.equal(a[k], b[k]), k
    assert model.training
    torch.manual_seed(7)
    expected = _pgd(refs[i + 1], LEVELS[i], x, y)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)
    # the norms are distinguishable: the same attack through any other norm differs
    for r, ref in enumerate(refs):
        if r != i + 1:
            torch.manual_seed(7)
            assert (_pgd(ref, LEVELS[i], x, y) - x_adv).abs().max() > 1e-3, r


def test_training_pass_routes_clean_rows_to_main_and_strength_i_to_auxiliary_i():
    recipe, model, aux_bns = _setup()
    refs = [_reference(model, r) for r in range(len(LEVELS) + 1)]
    x, y = _batch()
    torch.manual_seed(11)  # the adversarial batches the training pass will see
    expected_adv = [_pgd(refs[i + 1], eps, x, y) for i, eps in enumerate(LEVELS)]
    refs = [_reference(model, r) for r in range(len(LEVELS) + 1)]  # fresh statistics
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out)))
    torch.manual_seed(11)
    out = recipe.loss(model, x, y)
    rows, logits = seen[-1]  # the training pass: one forward over every batch
    b = x.shape[0]
    chunks, parts = rows.split(b), logits.split(b)
    assert len(chunks) == len(LEVELS) + 1
    assert torch.equal(chunks[0], x)
    for i, eps in enumerate(LEVELS):
        torch.testing.assert_close(chunks[i + 1], expected_adv[i], rtol=0, atol=1e-6)
        linf = (chunks[i + 1] - x).abs().amax()
        assert abs(float(linf) - eps) < 1e-5  # strength i, not another one
    # each part equals its own plain network on its own rows (train mode: batch statistics)
    ref_logits = [ref(chunk) for ref, chunk in zip(refs, chunks)]
    for r, (part, ref_part) in enumerate(zip(parts, ref_logits)):
        torch.testing.assert_close(part, ref_part, rtol=1e-5, atol=1e-5, msg=f"norm {r}")
    torch.testing.assert_close(out["logits"], ref_logits[0], rtol=1e-5, atol=1e-5)
    ref_loss = sum(F.cross_entropy(z, y) for z in ref_logits)
    torch.testing.assert_close(out["loss"], ref_loss, rtol=1e-5, atol=1e-6)
    # and each norm's running statistics moved with its own rows only
    for layer, m in enumerate(aux_bns):
        for r, bn in enumerate(m.norms()):
            ref_bn = _bns(refs[r])[layer]
            for k in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(bn, k), getattr(ref_bn, k), msg=f"{r} {k}")

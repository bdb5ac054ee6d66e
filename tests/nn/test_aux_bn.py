"""Auxiliary batch norms (AdvProp surgery)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.nn import (
    AuxBatchNorm,
    AuxBNError,
    aux_bn_state,
    convert_aux_bn,
    split_bn,
    strip_aux_bn,
    use_bn,
)


def bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def test_every_kind_of_batch_norm_is_converted_and_stripping_restores_the_architecture():
    net = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3),
                        nn.SyncBatchNorm(3), nn.Sequential(nn.BatchNorm2d(3)))  # fmt: skip
    keys = set(net.state_dict())
    converted = convert_aux_bn(copy.deepcopy(net), num_aux=2)
    assert sum(isinstance(m, AuxBatchNorm) for m in converted.modules()) == 5
    plain = strip_aux_bn(converted)
    assert set(plain.state_dict()) == keys
    assert not any(isinstance(m, AuxBatchNorm) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in net.modules()]


def test_routing_uses_the_chosen_norm_and_strip_keeps_the_main_one():
    torch.manual_seed(0)
    net = bn_net()
    net.eval()
    x = torch.rand(6, 1, 6, 6)
    reference = net(x)
    model = convert_aux_bn(copy.deepcopy(net), num_aux=2)
    for m in model.modules():
        if isinstance(m, AuxBatchNorm):
            for aux in m.aux:
                aux.running_mean.add_(1.0)
    model.eval()
    torch.testing.assert_close(model(x), reference)  # main by default
    with use_bn(model, "aux", 1):
        assert not torch.allclose(model(x), reference)
    torch.testing.assert_close(strip_aux_bn(model)(x), reference)
    with pytest.raises(AuxBNError, match="out of range"):
        use_bn(model, "aux", 2)


def test_split_bn_equals_separate_passes_through_each_norm():
    torch.manual_seed(0)
    net = bn_net()
    model = convert_aux_bn(copy.deepcopy(net))
    for m in model.modules():  # make the aux norms differ from the main ones
        if isinstance(m, AuxBatchNorm):
            m.aux[0].weight.data.mul_(3.0)
    clean, adv = torch.rand(5, 1, 6, 6), torch.rand(7, 1, 6, 6)
    main_ref, aux_ref = copy.deepcopy(model), copy.deepcopy(model)
    with split_bn(model, [5, 7]):
        out = model(torch.cat([clean, adv]))
    torch.testing.assert_close(out[:5], main_ref(clean))
    with use_bn(aux_ref, "aux", 0):
        torch.testing.assert_close(out[5:], aux_ref(adv))
    # and each norm's running statistics moved with its own rows only
    for m, m_main, m_aux in zip(model.modules(), main_ref.modules(), aux_ref.modules()):
        if isinstance(m, AuxBatchNorm):
            torch.testing.assert_close(m.main.running_mean, m_main.main.running_mean)
            torch.testing.assert_close(m.aux[0].running_mean, m_aux.aux[0].running_mean)


def test_frozen_statistics_use_the_batch_and_leave_running_stats_alone():
    model = convert_aux_bn(bn_net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with use_bn(model, "aux", 0, freeze_stats=True):
        model(torch.rand(4, 1, 6, 6) * 5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_models_without_batch_norm_and_double_conversion_are_refused():
    with pytest.raises(AuxBNError, match="no batch norm"):
        convert_aux_bn(rl.create_model("small_cnn", in_channels=1))
    model = convert_aux_bn(rl.create_model("small_cnn", in_channels=1, bn=True))
    with pytest.raises(AuxBNError, match="already"):
        convert_aux_bn(model)
    with pytest.raises(AuxBNError, match="convert_aux_bn first"):
        use_bn(rl.create_model("mlp", in_channels=1), "main").__enter__()


def test_aux_state_holds_only_auxiliary_entries():
    model = convert_aux_bn(bn_net(), num_aux=2)
    state = aux_bn_state(model)
    assert state and all(".aux." in f".{k}" for k in state)
    assert len(state) == 2 * 2 * 5  # 2 layers x 2 aux norms x (weight, bias, mean, var, count)

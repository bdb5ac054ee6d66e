"""The model zoo: every registered model, parameter counts against published figures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.models import MODELS, Normalize, create_model
from robustlab.nn import ACTIVATIONS

# Small but valid configurations so the whole zoo runs in seconds.
SMALL = {
    "mlp": dict(in_channels=1, input_size=8, hidden=[16]),
    "small_cnn": dict(in_channels=1, input_size=12),
    "lenet": dict(in_channels=1, input_size=16),
    "preact_resnet18": dict(in_channels=3, input_size=8),
    "resnet18": dict(in_channels=3, input_size=8),
    "resnet34": dict(in_channels=3, input_size=8),
    "resnet50": dict(in_channels=3, input_size=8),
    "wide_resnet": dict(in_channels=3, input_size=8, depth=10, width=1),
}


def test_every_registered_model_has_a_test_configuration():
    assert set(MODELS.names()) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_backward_shapes(name):
    kw = SMALL[name]
    model = create_model(name, num_classes=7, **kw)
    size = kw["input_size"]
    x = torch.rand(2, kw["in_channels"], size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_activation_is_a_constructor_argument_everywhere(name, act):
    relu_model = create_model(name, **SMALL[name])
    model = create_model(name, act=act, **SMALL[name])
    expected = type(ACTIVATIONS.get(act)())
    n_relu = sum(isinstance(m, nn.ReLU) for m in relu_model.modules())
    assert n_relu > 0
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, expected) for m in model.modules()) == n_relu
    # one instance per use, so surgery can replace each independently
    acts = [m for m in model.modules() if isinstance(m, expected)]
    assert len({id(m) for m in acts}) == len(acts)


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet18", "resnet50", "wide_resnet"])
def test_batch_norms_are_plain_batchnorm2d(name):
    model = create_model(name, **SMALL[name])
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_published_architectures():
    # Madry et al.'s MNIST network, counted by hand from the paper's description.
    by_hand = (32 * 25 + 32) + (64 * 32 * 25 + 64) + (7 * 7 * 64 * 1024 + 1024) + (1024 * 10 + 10)
    assert _n_params(create_model("small_cnn", in_channels=1, input_size=28)) == by_hand
    # torchvision's ImageNet ResNets (published parameter counts).
    assert _n_params(create_model("resnet18", num_classes=1000, input_size=224)) == 11_689_512
    assert _n_params(create_model("resnet34", num_classes=1000, input_size=224)) == 21_797_672
    assert _n_params(create_model("resnet50", num_classes=1000, input_size=224)) == 25_557_032
    # WRN-34-10 as used by TRADES: 46.16M parameters.
    assert _n_params(create_model("wide_resnet", depth=34, width=10)) == 46_160_474


def test_imagenet_stem_downsamples():
    model = create_model("resnet18", input_size=64)
    assert isinstance(model.stem[0], nn.Conv2d) and model.stem[0].kernel_size == (7, 7)
    assert create_model("resnet18", input_size=32).stem[0].kernel_size == (3, 3)


def test_normalize_layer_matches_manual_formula():
    x = torch.rand(4, 3, 5, 5)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(Normalize(mean, std)(x), expected)
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize([0.0], [0.0])


def test_create_model_with_normalization_puts_it_first():
    model = create_model("mlp", in_channels=1, input_size=4, mean=[0.5], std=[0.25], hidden=[8])
    assert isinstance(model.normalize, Normalize)
    x = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(model(x), model.net((x - 0.5) / 0.25))
    assert "normalize.mean" in model.state_dict()


def test_bad_model_arguments_are_named():
    with pytest.raises(ValueError, match="unknown model 'small_cn'; did you mean 'small_cnn'"):
        create_model("small_cn")
    with pytest.raises(
        ValueError, match="model 'wide_resnet' has no option 'dept'; did you mean 'depth'"
    ):
        create_model("wide_resnet", dept=16)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        create_model("wide_resnet", depth=12)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        create_model("mlp", act="swish")
    with pytest.raises(ValueError, match="too small"):
        create_model("small_cnn", in_channels=1, input_size=3)

"""Normalize refuses inputs it would silently broadcast; flat_features leaves modules as found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.models import Normalize, create_model
from robustlab.models.registry import flat_features
from robustlab.nn import swap_activations

MEAN3, STD3 = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]


def test_three_means_on_a_one_channel_input_is_an_error_naming_both_counts():
    norm = Normalize(MEAN3, STD3)
    with pytest.raises(ValueError, match=r"3 channel means/stds but the input has 1 channels"):
        norm(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"3 channel means/stds but the input has 4 channels"):
        norm(torch.rand(2, 4, 4, 4))


def test_a_mismatch_known_at_construction_is_refused_there():
    with pytest.raises(ValueError, match=r"3 channel means/stds for a model with 1 input"):
        Normalize(MEAN3, STD3, in_channels=1)
    with pytest.raises(ValueError, match=r"3 channel means/stds for a model with 1 input"):
        create_model("small_cnn", in_channels=1, input_size=8, mean=MEAN3, std=STD3)


def test_one_mean_broadcasts_to_every_channel():
    x = torch.rand(2, 3, 4, 4)
    out = Normalize([0.5], [0.25], in_channels=3)(x)
    torch.testing.assert_close(out, (x - 0.5) * 4.0)


@pytest.mark.parametrize(
    "shape, hint",
    [((2, 784), "flattened batch must be reshaped"), ((1, 28, 28), "needs a batch dimension")],
)
def test_a_non_nchw_input_to_a_conv_model_is_a_one_line_error(shape, hint):
    model = create_model("small_cnn", in_channels=1, input_size=28, mean=[0.13], std=[0.31])
    with pytest.raises(ValueError) as info:
        model(torch.rand(*shape))
    message = str(info.value)
    assert "\n" not in message
    assert f"(B, C, H, W), got an input of shape {shape}" in message and hint in message


def test_the_check_survives_torch_fx():
    torch.manual_seed(0)
    kw = dict(in_channels=3, input_size=8, mean=MEAN3, std=STD3)
    model = create_model("small_cnn", **kw)
    swapped = swap_activations(model, "silu", example=torch.rand(2, 3, 8, 8))
    reference = create_model("small_cnn", act="silu", **kw)
    reference.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(swapped(x), reference(x))
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    with pytest.raises(ValueError, match="3 channel means/stds but the input has 1 channels"):
        traced(torch.rand(2, 1, 8, 8))


def test_flat_features_restores_every_submodule_mode_and_keeps_statistics():
    features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(), nn.Flatten())
    features.train()
    features[2].eval()  # a submodule in its own mode must stay so
    before = {k: v.clone() for k, v in features.state_dict().items()}
    assert flat_features(features, 1, 6) == 2 * 4 * 4
    assert features.training and features[1].training and not features[2].training
    for key, value in features.state_dict().items():
        assert torch.equal(value, before[key]), key

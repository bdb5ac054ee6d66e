"""swap_activations verifies a swap by running the model: no ReLU is ever silently left.

Every model here calls a ReLU-family op a different way. A model torch.fx can trace must
come back fully swapped: its output equals a reference written by hand with SiLU. A
model it cannot trace (data-dependent control flow) must be refused, naming the call
site (file:line and the code line, checked against this file's own text).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import relu as r

from robustlab.nn import SmoothGradReLU, SwapError, count_activations, swap_activations

HERE = Path(__file__)


def line_of(code: str) -> int:
    """The line of this file whose stripped text is ``code`` (it must be unique)."""
    lines = [i + 1 for i, text in enumerate(HERE.read_text().splitlines()) if text.strip() == code]
    assert len(lines) == 1, (code, lines)
    return lines[0]


class Base(nn.Module):
    """Two linear layers with a ReLU between them, called in ways subclasses choose."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same network written by hand with SiLU (an independent computation)."""
        h = x * 2.0 - 1.0
        h = h @ self.a.weight.t() + self.a.bias
        h = h * torch.sigmoid(h)
        return h @ self.b.weight.t() + self.b.bias

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x * 2.0 - 1.0)


class FRelu(Base):
    def forward(self, x):
        h = self.pre(x)
        h = F.relu(h)
        return self.b(h)


class TorchRelu(Base):
    def forward(self, x):
        h = self.pre(x)
        h = torch.relu(h)
        return self.b(h)


class MethodRelu(Base):
    def forward(self, x):
        h = self.pre(x)
        h = h.relu()
        return self.b(h)


class AliasRelu(Base):
    def forward(self, x):
        h = self.pre(x)
        h = r(h)
        return self.b(h)


class HelperRelu(Base):
    def act(self, h):
        return torch.nn.functional.relu(h)

    def forward(self, x):
        return self.b(self.act(self.pre(x)))


class InPlaceRelu(Base):
    def forward(self, x):
        h = self.pre(x)
        torch.relu_(h)
        return self.b(h)


class InPlaceMethodRelu(Base):
    def forward(self, x):
        h = self.pre(x)
        h.relu_()
        return self.b(h)


class InPlaceFlagRelu(Base):
    def forward(self, x):
        h = self.pre(x)
        F.relu(h, inplace=True)
        return self.b(h)


class LeakyRelu(Base):
    def forward(self, x):
        h = self.pre(x)
        h = F.leaky_relu(h, 0.2)
        return self.b(h)


# name -> (traceable class, the code line that calls the activation)
CASES = {
    "F.relu": (FRelu, "h = F.relu(h)"),
    "torch.relu": (TorchRelu, "h = torch.relu(h)"),
    "x.relu()": (MethodRelu, "h = h.relu()"),
    "aliased import": (AliasRelu, "h = r(h)"),
    "helper method": (HelperRelu, "return torch.nn.functional.relu(h)"),
    "torch.relu_": (InPlaceRelu, "torch.relu_(h)"),
    "x.relu_()": (InPlaceMethodRelu, "h.relu_()"),
    "inplace=True": (InPlaceFlagRelu, "F.relu(h, inplace=True)"),
    "F.leaky_relu": (LeakyRelu, "h = F.leaky_relu(h, 0.2)"),
}


def untraceable(cls: type[Base]) -> Base:
    """``cls`` with a data-dependent branch in front: torch.fx cannot trace it."""

    class Untraceable(cls):
        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow
                x = x * 0
            return super().forward(x)

    torch.manual_seed(0)
    return Untraceable()


@pytest.mark.parametrize("case", list(CASES))
def test_a_traceable_model_is_swapped_fully_whatever_the_call(case):
    cls, _ = CASES[case]
    torch.manual_seed(0)
    model = cls()
    x = torch.rand(5, 6)
    with torch.no_grad():
        before = model(x)
    for example in (None, x[:2]):
        swapped = swap_activations(model, "silu", example=example)
        with torch.no_grad():
            torch.testing.assert_close(swapped(x), model.reference(x))
            torch.testing.assert_close(model(x), before)  # the original is untouched


@pytest.mark.parametrize("case", list(CASES))
def test_an_untraceable_model_is_refused_naming_the_call_site(case):
    cls, code = CASES[case]
    model = untraceable(cls)
    with pytest.raises(SwapError) as info:
        swap_activations(model, "silu", example=torch.rand(2, 6))
    assert f"test_swap_verify.py:{line_of(code)}: {code}" in str(info.value)


@pytest.mark.parametrize("case", ["F.relu", "helper method"])
def test_an_untraceable_model_without_an_example_is_refused(case):
    with pytest.raises(SwapError, match="pass example="):
        swap_activations(untraceable(CASES[case][0]), "silu")


class UntraceableModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.b(self.act(self.bn(self.a(x))))


def test_an_untraceable_model_with_modules_only_is_swapped_and_left_as_found():
    torch.manual_seed(0)
    model = UntraceableModules()
    model.train()
    model.bn.eval()  # a submodule in its own mode must stay so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(5, 6) * 3
    swapped = swap_activations(model, "silu", example=x)
    assert count_activations(swapped) == {"SiLU": 1}
    # the verification run changed nothing: modes, running statistics, batch counter
    assert swapped.training and swapped.a.training and not swapped.bn.training
    for key, value in swapped.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert count_activations(model) == {"ReLU": 1}
    model.eval()
    swapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model.b(F.silu(model.bn(model.a(x)))))


class Mixed(UntraceableModules):
    """An activation module and one functional ReLU: half a swap is still a refusal."""

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        h = self.act(self.a(x))
        return self.b(torch.relu(h - 0.5))


def test_a_partly_swappable_untraceable_model_is_refused():
    with pytest.raises(SwapError, match=r"return self\.b\(torch\.relu\(h - 0\.5\)\)"):
        swap_activations(Mixed(), "silu", example=torch.rand(2, 6))


@pytest.mark.parametrize("act", ["relu", "softplus"])
def test_activations_inside_the_new_modules_are_not_reported(act):
    # the new modules themselves call F.relu / F.softplus: that is the swap, not a leftover
    model = nn.Sequential(nn.Linear(6, 8), SmoothGradReLU(), nn.Linear(8, 3))
    swapped = swap_activations(model, act, example=torch.rand(2, 6))
    assert count_activations(swapped) == {"ReLU" if act == "relu" else "Softplus": 1}
    # an untraceable model too: module swapped, the check passes
    swapped = swap_activations(UntraceableModules(), act, example=torch.rand(2, 6))
    assert count_activations(swapped) == {"ReLU" if act == "relu" else "Softplus": 1}


class Encoder(nn.Module):
    def __init__(self, activation) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, activation=activation, batch_first=True
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("with_example", [False, True])
def test_a_transformer_layer_activation_is_swapped_including_the_eval_fast_path(with_example):
    torch.manual_seed(0)
    model = Encoder("relu").eval()
    reference = Encoder(F.silu).eval()  # built by hand with the new activation
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 8)
    swapped = swap_activations(model, "silu", example=x[:2] if with_example else None).eval()
    with torch.no_grad():  # eval + no_grad: torch's fused fast path, if it were taken
        out, expected, original = swapped(x), reference(x), model(x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, original)
    torch.testing.assert_close(swapped(x), reference(x))  # the slow path agrees


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 4, nonlinearity="relu", batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


def test_a_relu_inside_a_fused_recurrent_kernel_is_refused():
    with pytest.raises(SwapError, match=r"rnn \(RNN, nonlinearity='relu'\)"):
        swap_activations(Recurrent(), "silu", example=torch.rand(2, 3, 4))


class DiscardsModuleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        self.act(h)
        return self.b(h)


def test_a_model_relying_on_an_in_place_relu_module_is_refused():
    with pytest.raises(SwapError, match="act.*in place"):
        swap_activations(DiscardsModuleOutput(), "silu")


def test_an_example_the_model_cannot_take_is_a_swap_error():
    with pytest.raises(SwapError, match=r"example input of shape \(2, 5\)"):
        swap_activations(untraceable(FRelu), "silu", example=torch.rand(2, 5))

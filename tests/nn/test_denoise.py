"""Feature-denoising blocks and their insertion (robustlab.nn.denoise)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.nn.denoise import KINDS, DenoiseError, DenoisingBlock, insert_denoising
from robustlab.train import create_recipe


def embed(conv: nn.Conv2d | None, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution (no bias) of one feature vector, by hand."""
    return v if conv is None else conv.weight[:, :, 0, 0] @ v


def brute_force(block: DenoisingBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-local weights and output by a double loop over positions (image 0)."""
    c, h, w = x.shape[1:]
    pos = [(i, j) for i in range(h) for j in range(w)]
    n = len(pos)
    f = torch.zeros(n, n, dtype=x.dtype)
    for a, (i, j) in enumerate(pos):
        ti = embed(block.theta, x[0, :, i, j])
        for b, (k, m) in enumerate(pos):
            dot = ti @ embed(block.phi, x[0, :, k, m])
            if block.kind == "nonlocal_gaussian":
                f[a, b] = torch.exp(dot / math.sqrt(ti.numel()))
            else:
                f[a, b] = dot
        f[a] /= f[a].sum() if block.kind == "nonlocal_gaussian" else n
    y = torch.zeros(c, h, w, dtype=x.dtype)
    for a, (i, j) in enumerate(pos):
        for b, (k, m) in enumerate(pos):
            y[:, i, j] += f[a, b] * x[0, :, k, m]
    return f, y


def filter_by_hand(x: torch.Tensor, reduce) -> torch.Tensor:
    """3x3 filter with replicated edges, pixel by pixel (image 0)."""
    c, h, w = x.shape[1:]
    y = torch.zeros(c, h, w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            rows = [min(max(i + d, 0), h - 1) for d in (-1, 0, 1)]
            cols = [min(max(j + d, 0), w - 1) for d in (-1, 0, 1)]
            patch = torch.stack([x[0, :, r, q] for r in rows for q in cols], dim=1)
            y[:, i, j] = reduce(patch)
    return y


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_block_is_exactly_the_identity(kind):
    torch.manual_seed(0)
    block = DenoisingBlock(6, kind)
    assert torch.equal(block.bn.weight, torch.zeros(6))
    x = torch.randn(3, 6, 5, 4)
    for training in (True, False):
        block.train(training)
        assert torch.equal(block(x), x)
    with torch.no_grad():
        block.bn.weight.fill_(1.0)
    block.eval()
    assert not torch.allclose(block(x), x)  # gamma != 0: the block acts


@pytest.mark.parametrize("embedded", [True, False])
def test_gaussian_weights_sum_to_one_and_match_the_brute_force(embedded):
    torch.manual_seed(1)
    block = DenoisingBlock(4, "nonlocal_gaussian", embed=embedded).double()
    if embedded:  # larger embeddings than the N(0, 0.01) start, so the weights differ
        nn.init.normal_(block.theta.weight)
        nn.init.normal_(block.phi.weight)
        assert block.theta.out_channels == 2
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    w = block.weights(x)
    assert torch.allclose(w.sum(dim=-1), torch.ones(1, 9, dtype=torch.float64))
    f, y = brute_force(block, x)
    assert torch.allclose(w[0], f) and f.std() > 0.01
    assert torch.allclose(block.denoise(x)[0], y)


@pytest.mark.parametrize(
    "channels, size, embedded",
    [(4, 3, True), (4, 3, False), (16, 2, True)],  # both orders of the matrix products
)
def test_dot_product_version_matches_the_brute_force(channels, size, embedded):
    torch.manual_seed(2)
    block = DenoisingBlock(channels, "nonlocal_dot", embed=embedded).double()
    if embedded:
        nn.init.normal_(block.theta.weight)
        nn.init.normal_(block.phi.weight)
    x = torch.randn(1, channels, size, size, dtype=torch.float64)
    f, y = brute_force(block, x)
    assert torch.allclose(block.weights(x)[0], f)
    assert torch.allclose(block.denoise(x)[0], y)


def test_mean_and_median_filters_match_the_definition():
    torch.manual_seed(3)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    mean = filter_by_hand(x, lambda p: p.mean(dim=1))
    median = filter_by_hand(x, lambda p: p.sort(dim=1).values[:, 4])
    assert torch.allclose(DenoisingBlock(2, "mean").denoise(x)[0], mean)
    assert torch.equal(DenoisingBlock(2, "median").denoise(x)[0], median)


def test_block_output_is_the_residual_sum():
    torch.manual_seed(4)
    block = DenoisingBlock(4, "mean").eval()
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 5, 5)
    inner = block.denoise(x)
    assert torch.allclose(block(x), x + block.bn(block.conv(inner)))


def test_bad_blocks_are_clear_errors():
    with pytest.raises(DenoiseError, match="did you mean 'median'"):
        DenoisingBlock(4, "medain")
    for bad in (0, 2.0, True):
        with pytest.raises(DenoiseError, match="channels"):
            DenoisingBlock(bad)
    with pytest.raises(DenoiseError, match="expects features \\(B, 4, H, W\\)"):
        DenoisingBlock(4)(torch.zeros(1, 3, 2, 2))


def _gammas_on(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DenoisingBlock):
                m.bn.weight.fill_(1.0)


@pytest.mark.parametrize("example", [False, True])
def test_insert_into_small_cnn_after_the_right_modules(example):
    torch.manual_seed(5)
    model = rl.create_model("small_cnn", in_channels=1, input_size=28).eval()
    x = torch.rand(4, 1, 28, 28)
    new = insert_denoising(model, ["0", "3"], kind="mean", example=x if example else None)
    assert torch.equal(new(x), model(x))  # identity at insertion
    before = model.state_dict()
    after = new.state_dict()
    assert set(before) < set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k.split(".")[1] for k in set(after) - set(before)} == {"denoise"}
    assert {k.split(".")[0] for k in set(after) - set(before)} == {"0", "3"}
    assert not any(isinstance(m, DenoisingBlock) for m in model.modules())  # a copy
    # each block denoises the output of the module it follows: composed by hand
    _gammas_on(new)
    b0, b3 = new.get_submodule("0.denoise"), new.get_submodule("3.denoise")
    h = b0(model[0](x))
    h = b3(model[3](model[2](model[1](h))))
    for layer in list(model)[4:]:
        h = layer(h)
    assert torch.allclose(new(x), h) and not torch.allclose(new(x), model(x))


def test_insert_into_preact_resnet_stages_and_a_sequential():
    torch.manual_seed(6)
    model = rl.create_model("preact_resnet18", input_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    new = insert_denoising(model, ["layers.1", "layers.3", "layers"], example=x)
    assert torch.equal(new(x), model(x))
    added = set(new.state_dict()) - set(model.state_dict())
    assert set(model.state_dict()) < set(new.state_dict())
    assert {k.rsplit(".denoise.", 1)[0] for k in added} == {"layers.1", "layers.3", "layers"}
    assert new.get_submodule("layers.3.denoise").channels == 128
    assert new.get_submodule("layers.denoise").channels == 512
    # without an example the channels come from the block's convolutions
    guessed = insert_denoising(model, ["layers.5"], kind="nonlocal_dot")
    assert guessed.get_submodule("layers.5.denoise").channels == 256
    _gammas_on(new)
    m = model
    h = m.layers[1](m.layers[0](m.conv1(x)))
    h = new.get_submodule("layers.1.denoise")(h)
    h = new.get_submodule("layers.3.denoise")(m.layers[3](m.layers[2](h)))
    for i in range(4, 8):
        h = m.layers[i](h)
    h = new.get_submodule("layers.denoise")(h)
    h = m.fc(m.flatten(m.pool(m.act(m.bn(h)))))
    assert torch.allclose(new(x), h, atol=1e-5)


def test_insertion_errors_name_the_problem():
    model = rl.create_model("small_cnn", in_channels=1, input_size=28)
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(DenoiseError, match="no submodule 'layers.1'"):
        insert_denoising(model, ["layers.1"])
    pre = rl.create_model("preact_resnet18", input_size=32)
    with pytest.raises(DenoiseError, match="did you mean 'layers.1'"):
        insert_denoising(pre, "layer.1")
    with pytest.raises(DenoiseError, match=r"output of '7' is \(2, 1024\), not a feature map"):
        insert_denoising(model, ["7"], example=x)
    with pytest.raises(DenoiseError, match="pass example="):
        insert_denoising(model, ["7"])
    with pytest.raises(DenoiseError, match="twice"):
        insert_denoising(model, ["0", "0"])
    with pytest.raises(DenoiseError, match="did you mean 'mean'"):
        insert_denoising(model, ["0"], kind="maen")
    holder = nn.Module()
    holder.blocks = nn.ModuleList([nn.Conv2d(1, 2, 1)])
    with pytest.raises(DenoiseError, match="ModuleList"):
        insert_denoising(holder, ["blocks"])

    class Chain(nn.Module):  # a forward that runs every child: the block would run twice
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            for child in self.children():
                x = child(x)
            return x

    with pytest.raises(DenoiseError, match="ran 2 times for 1 calls"):
        insert_denoising(nn.Sequential(Chain()), ["0"], example=x)


def test_blocks_follow_the_model_dtype():
    model = rl.create_model("small_cnn", in_channels=1, input_size=28).double()
    new = insert_denoising(model, ["3"])
    assert new.get_submodule("3.denoise").conv.weight.dtype == torch.float64
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    assert torch.equal(new.eval()(x), model.eval()(x))


def test_one_sgd_step_trains_the_blocks():
    torch.manual_seed(7)
    model = rl.create_model("small_cnn", in_channels=1, input_size=28)
    new = insert_denoising(model, ["0"])
    block = new.get_submodule("0.denoise")
    start = copy.deepcopy(block.state_dict())
    opt = torch.optim.SGD(new.parameters(), lr=0.1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for step in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(new(x), y).backward()
        if step == 0:  # gamma = 0 blocks the gradient to conv, theta, phi at first
            assert block.bn.weight.grad.abs().sum() > 0
            assert new[0].weight.grad.abs().sum() > 0  # through the block to the module
        opt.step()
    assert not torch.equal(block.bn.weight, start["bn.weight"])
    for key in ("conv.weight", "theta.weight", "phi.weight"):
        assert not torch.equal(block.state_dict()[key], start[key]), key


def test_works_with_a_training_recipe():
    torch.manual_seed(8)
    model = rl.create_model("small_cnn", in_channels=1, input_size=28)
    new = insert_denoising(model, ["3"], kind="nonlocal_gaussian").train()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    out = create_recipe("pgd", eps=0.1, steps=2).loss(new, x, y)
    out["loss"].backward()
    assert new.get_submodule("3.denoise").bn.weight.grad.abs().sum() > 0

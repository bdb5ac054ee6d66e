"""resize_pad (Xie et al. 2018): sizes, offsets, content and padding checked against an
independent nearest-neighbour resize, reproducibility, randomness, gradients, EOT."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import robustlab.defenses.resize_pad  # noqa: F401  (registers resize_pad)
from robustlab.defenses.base import DEFENSES, DefendedModel, create_defense, defend
from robustlab.defenses.resize_pad import ResizePad
from robustlab.errors import ConfigError


def boxes(out: torch.Tensor, pad: float) -> list[tuple[int, int, int]]:
    """(size, top, left) of the non-pad square of each image (the images never hold `pad`)."""
    found = []
    for img in out:
        rows = (img != pad).any(0).any(1).nonzero()[:, 0]
        cols = (img != pad).any(0).any(0).nonzero()[:, 0]
        s = int(rows[-1] - rows[0]) + 1
        assert int(cols[-1] - cols[0]) + 1 == s, "the image part is not square"
        found.append((s, int(rows[0]), int(cols[0])))
    return found


def nearest_resize(img: np.ndarray, s: int) -> np.ndarray:
    """Nearest neighbour (C, H, W) -> (C, s, s) with source index floor(i * H / s)."""
    rows = [(i * img.shape[1]) // s for i in range(s)]
    cols = [(j * img.shape[2]) // s for j in range(s)]
    return img[:, rows][:, :, cols]


def images(b: int, c: int, n: int, lo: float, hi: float, dtype=torch.float32) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, c, n, n, dtype=dtype)


def test_registered_and_declared():
    assert DEFENSES.get("resize_pad") is ResizePad and ResizePad.name == "resize_pad"
    assert ResizePad.randomized and ResizePad.differentiable


@pytest.mark.parametrize("pad_value", [0.0, 0.25])
@pytest.mark.parametrize("channels", [1, 3])
def test_content_at_offset_and_pad_elsewhere(pad_value, channels):
    torch.manual_seed(0)
    x = images(40, channels, 8, 0.5, 1.0)  # never equal to the pad value
    d = ResizePad(size_min=8, size_max=12, out_size=14, pad_value=pad_value)
    out = d(x)
    assert out.shape == (40, channels, 14, 14) and out.dtype == x.dtype
    for img, src, (s, top, left) in zip(out, x, boxes(out, pad_value)):
        assert 8 <= s <= 12 and 0 <= top <= 14 - s and 0 <= left <= 14 - s
        inside = img[:, top : top + s, left : left + s].numpy()
        np.testing.assert_array_equal(inside, nearest_resize(src.numpy(), s))
        mask = torch.ones(14, 14, dtype=torch.bool)
        mask[top : top + s, left : left + s] = False
        assert (img[:, mask] == pad_value).all()


def test_every_size_and_offset_reachable():
    torch.manual_seed(1)
    x = images(400, 1, 8, 0.5, 1.0)
    found = boxes(ResizePad(size_min=8, size_max=12, out_size=14)(x), 0.0)
    assert {s for s, _, _ in found} == set(range(8, 13))  # both bounds included
    for size in range(8, 13):
        tops = {t for s, t, _ in found if s == size}
        lefts = {c for s, _, c in found if s == size}
        assert tops == lefts == set(range(0, 14 - size + 1)), size


def test_defaults_follow_the_input_size():
    torch.manual_seed(0)
    d = ResizePad()
    assert d.sizes(28, 28) == (28, 31, 31) and d.sizes(299, 299) == (299, 331, 331)
    assert d.sizes(32, 32) == (32, 35, 35)
    found = boxes(d(images(200, 1, 28, 0.5, 1.0)), 0.0)
    assert {s for s, _, _ in found} == {28, 29, 30, 31}
    with pytest.raises(ValueError, match="square input"):
        d(torch.rand(1, 1, 28, 30))
    # a non-square input with explicit sizes is resized to s x s
    assert ResizePad(size_min=20, size_max=24)(torch.rand(2, 3, 28, 30)).shape == (2, 3, 24, 24)


def test_randomness_reproducible_and_per_image():
    x = images(16, 3, 8, 0.5, 1.0)[:1].expand(16, -1, -1, -1).contiguous()  # 16 equal images
    d = ResizePad(size_min=8, size_max=12, out_size=14)
    torch.manual_seed(5)
    a = d(x)
    b = d(x)
    torch.manual_seed(5)
    c = d(x)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert len(set(boxes(a, 0.0))) > 4  # per image: the equal images land differently
    batch = ResizePad(size_min=8, size_max=12, out_size=14, per_image=False)
    same = batch(x)
    assert (same == same[:1]).all()  # one draw for the whole batch


def test_gradients_flow():
    torch.manual_seed(0)
    x = images(6, 3, 8, 0.5, 1.0, dtype=torch.float64).requires_grad_(True)
    out = ResizePad(size_min=8, size_max=12, out_size=14)(x)
    out.sum().backward()
    sizes = torch.tensor([s for s, _, _ in boxes(out.detach(), 0.0)], dtype=torch.float64)
    # nearest upsampling copies every source pixel at least once: d sum / dx >= 1, and the
    # copies add up to s*s per channel
    assert (x.grad >= 1).all()
    torch.testing.assert_close(x.grad.sum((1, 2, 3)), 3 * sizes**2)
    xb = images(2, 1, 8, 0.5, 1.0).requires_grad_(True)
    ResizePad(size_min=9, size_max=10, mode="bilinear")(xb).sum().backward()
    assert xb.grad.abs().sum() > 0


def test_bilinear_keeps_constants_range_and_dtype():
    torch.manual_seed(0)
    x = torch.full((4, 3, 10, 10), 0.7, dtype=torch.float64)
    out = ResizePad(size_min=10, size_max=13, out_size=16, mode="bilinear", pad_value=0.1)(x)
    assert out.dtype == torch.float64 and out.shape == (4, 3, 16, 16)
    for img, (s, top, left) in zip(out, boxes(out, 0.1)):
        torch.testing.assert_close(
            img[:, top : top + s, left : left + s],
            torch.full_like(img[:, top : top + s, left : left + s], 0.7),
        )
    y = ResizePad(size_min=10, size_max=13, mode="bilinear")(torch.rand(4, 1, 10, 10))
    assert y.min() >= 0 and y.max() <= 1


def test_spec_round_trip_and_options():
    for d in [
        ResizePad(),
        ResizePad(
            size_min=299,
            size_max=330,
            out_size=331,
            pad_value=0.5,
            mode="bilinear",
            per_image=False,
        ),
    ]:
        again = create_defense(d.spec())
        assert type(again) is ResizePad and again.options() == d.options()
    assert ResizePad().options() == {"pad_value": 0.0, "mode": "nearest", "per_image": True}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resize_pad:size_min=0", "size_min must be a positive integer"),
        ("resize_pad:size_min=10:size_max=9", "size_max (9) must be >= size_min (10)"),
        ("resize_pad:size_min=10:size_max=12:out_size=11", "out_size (11) must be >="),
        ("resize_pad:size_min=28:out_size=30", "the default size_max"),
        ("resize_pad:pad_value=1.5", "pad_value must be a number in [0, 1]"),
        ("resize_pad:mode=bicubic", "mode must be 'nearest' or 'bilinear'"),
        ("resize_pad:sizemin=3", "did you mean 'size_min'"),
    ],
)
def test_bad_options(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_defense(spec)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(3, 8, 8), "expects a batch of images"),
        (torch.rand(1, 1, 8, 8) + 1.0, "expects pixels in \\[0, 1\\]"),
        (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_input(x, message):
    with pytest.raises(ValueError, match=message):
        ResizePad()(x)


def test_empty_batch():
    assert ResizePad()(torch.zeros(0, 3, 28, 28)).shape == (0, 3, 31, 31)


def test_eot_attack_through_defended_model(trained_mnist_model):
    """Behind resize_pad (shrink 28 -> 24..28, pad to 28) the trained model keeps most of its
    accuracy; PGD with EOT through the (differentiable, randomized) defense breaks it."""
    from robustlab.attacks import PGD

    model, test = trained_mnist_model
    x, y = test.float_images(slice(0, 32)), test.y[:32]
    defended = defend(model, ["resize_pad:size_min=24:size_max=28:out_size=28"])
    assert isinstance(defended, DefendedModel) and defended.randomized and defended.differentiable
    torch.manual_seed(0)
    with torch.no_grad():
        clean = (defended(x).argmax(1) == y).float().mean()
    x_adv = PGD(defended, eps=0.3, steps=10, eot_samples=2, seed=0)(x, y)
    with torch.no_grad():
        robust = (defended(x_adv).argmax(1) == y).float().mean()
    assert clean >= 0.7 and robust <= 0.2, (clean, robust)

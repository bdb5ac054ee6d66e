"""JPEG (Guo et al. 2018): the forward is Pillow's round trip bit for bit, the quantisation
tables are libjpeg's, the differentiable surrogate (Shin & Song 2017) tracks the real codec
on smooth images and MNIST digits, and BPDA through it breaks what the naive attack cannot."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import robustlab as rl
import robustlab.defenses.jpeg  # registers jpeg
from robustlab.defenses.base import DEFENSES, bpda_mode, create_defense, defend
from robustlab.defenses.jpeg import JPEG, jpeg_approx, quantization_table
from robustlab.errors import ConfigError


def pil_round_trip(x: torch.Tensor, quality: int) -> np.ndarray:
    """Pillow directly: uint8 HWC, save at quality (default subsampling), load, NCHW / 255."""
    u8 = np.rint(x.double().numpy() * 255).astype(np.uint8)
    out = []
    for img in u8:
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        dec = np.array(Image.open(io.BytesIO(buf.getvalue())))
        out.append(dec[None] if dec.ndim == 2 else dec.transpose(2, 0, 1))
    return np.stack(out).astype(np.float64) / 255


def smooth_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blurred uniform noise (9x9 box), stretched to [0, 1] per channel, on the 8-bit grid."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, channels, size + 8, size + 8, generator=g)
    x = F.avg_pool2d(noise, 9, stride=1)
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.round((x - lo) / (hi - lo) * 255) / 255


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return rl.load_dataset("mnist5k", "test").float_images(slice(0, 48))


def test_registered_and_declared():
    assert DEFENSES.get("jpeg") is JPEG and JPEG.name == "jpeg"
    assert not JPEG.differentiable and not JPEG.randomized


def test_quantization_tables_are_pillows():
    for quality in range(1, 101):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="JPEG", quality=quality)
        tables = Image.open(io.BytesIO(buf.getvalue())).quantization
        for index, chroma in ((0, False), (1, True)):
            ours = [v for row in quantization_table(quality, chroma) for v in row]
            assert list(tables[index]) == ours, (quality, chroma)


@pytest.mark.parametrize("quality", [10, 50, 90])
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 32, 32), (2, 3, 19, 26)])
def test_forward_is_pillow_bit_for_bit(quality, shape):
    torch.manual_seed(quality)
    x = torch.rand(*shape, dtype=torch.float64)
    out = JPEG(quality)(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    np.testing.assert_array_equal(out.numpy(), pil_round_trip(x, quality))
    assert out.min() >= 0 and out.max() <= 1


def test_forward_keeps_float32_and_grid():
    x = smooth_images(2, 3, 16)
    out = JPEG(75)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out * 255, torch.round(out * 255), rtol=0, atol=1e-4)


# Mean |surrogate - Pillow| in 1/255 units. Measured at 50/75/90: cubic 0.24-0.58 on
# digits, 1.3-1.5 on smooth RGB; straight-through 0.11-0.14 on digits, 0.5-1.2 on RGB.
BOUNDS = {("digits", "cubic"): 1.0, ("digits", "straight_through"): 0.5,
          ("smooth", "cubic"): 2.0, ("smooth", "straight_through"): 1.5}  # fmt: skip


@pytest.mark.parametrize("quality", [50, 75, 90])
@pytest.mark.parametrize("rounding", ["cubic", "straight_through"])
def test_surrogate_tracks_pillow(quality, rounding, digits):
    for name, x in [("digits", digits), ("smooth", smooth_images(12, 3, 32))]:
        real = JPEG(quality).transform(x)
        approx = jpeg_approx(x, quality, rounding)
        assert approx.shape == x.shape and approx.min() >= 0 and approx.max() <= 1
        err = float((approx - real).abs().mean()) * 255
        assert err < BOUNDS[name, rounding], (name, err)
        # and it is much closer to the codec than the identity is
        assert err < 0.5 * float((x - real).abs().mean()) * 255, (name, err)


@pytest.mark.parametrize("rounding", ["cubic", "straight_through"])
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 19, 26)])
def test_surrogate_gradient_nonzero_and_finite(rounding, shape):
    x = smooth_images(shape[0], shape[1], 28)[..., : shape[2], : shape[3]]
    x = x.clamp(0.05, 0.95).requires_grad_(True)  # inside the 8-bit range: no clipping
    (grad,) = torch.autograd.grad(jpeg_approx(x, 75, rounding).square().sum(), x)
    assert torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.9


def test_cubic_rounding_suppresses_what_jpeg_removes():
    """A coefficient rounded to 0 barely moves under the cubic rounding: the surrogate's
    response to a high-frequency ripple is far weaker than straight-through's."""
    x = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    ripple = torch.tensor([(-1.0) ** (i + j) for i in range(8) for j in range(8)]).view(1, 1, 8, 8)
    x = x.requires_grad_(True)
    response = {}
    for rounding in ("cubic", "straight_through"):
        (g,) = torch.autograd.grad((jpeg_approx(x, 50, rounding) * ripple).sum(), x)
        response[rounding] = float((g * ripple).sum())
    assert response["straight_through"] > 10 and abs(response["cubic"]) < 0.01


def test_pgd_naive_versus_bpda(trained_mnist_model):
    from robustlab.attacks import PGD

    model, test = trained_mnist_model
    x, y = test.float_images(slice(0, 32)), test.y[:32]
    defended = defend(model, ["jpeg:quality=75"])
    assert not defended.differentiable

    def accuracy(z):
        with torch.no_grad():
            return float((defended(z).argmax(1) == y).float().mean())

    naive = PGD(defended, eps=0.3, steps=10, random_start=False)(x, y)
    assert torch.equal(naive, x)  # the gradient through Pillow is zero: nothing moves
    with bpda_mode(defended):
        adaptive = PGD(defended, eps=0.3, steps=10, random_start=False)(x, y)
    assert accuracy(x) >= 0.8 and accuracy(adaptive) <= accuracy(x) - 0.5


@pytest.mark.parametrize("d", [JPEG(), JPEG(10, rounding="straight_through")])
def test_spec_round_trip(d):
    again = create_defense(d.spec())
    assert type(again) is JPEG and again.options() == d.options()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("jpeg:quality=0", "quality must be an integer in 1..100"),
        ("jpeg:quality=101", "quality must be an integer in 1..100"),
        ("jpeg:rounding=floor", "rounding must be 'cubic' or 'straight_through'"),
        ("jpeg:qualty=50", "did you mean 'quality'"),
    ],
)
def test_bad_options(spec, message):
    with pytest.raises(ConfigError, match=message):
        create_defense(spec)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(1, 2, 8, 8), "supports 1 or 3 channels, got 2"),
        (torch.rand(1, 4, 8, 8), "supports 1 or 3 channels, got 4"),
        (torch.rand(1, 8, 8), "expects a batch of images"),
        (torch.rand(1, 3, 8, 8) * 2, r"expects pixels in \[0, 1\]"),
    ],
)
def test_bad_input(x, message):
    with pytest.raises(ValueError, match=message):
        JPEG()(x)


def test_empty_batch():
    assert JPEG()(torch.zeros(0, 3, 16, 16)).shape == (0, 3, 16, 16)

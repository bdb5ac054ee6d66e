"""MNIST-C corruptions: geometry against scipy's affine resampling, Canny against
scikit-image, the drawn lines and stripes against hand computations, and the contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import robustlab as rl
from robustlab.corruptions import MNIST_C, corrupt
from robustlab.corruptions.mnist_c import canny


@pytest.fixture(scope="module")
def digits():
    return rl.load_dataset("mnist5k", "test").float_images(slice(0, 16)).double()


@pytest.mark.parametrize("name", list(MNIST_C))
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (3, 1, 8, 8), (2, 3, 32, 32)])
def test_contracts(name, shape):
    x = torch.rand(shape)
    y = corrupt(x, name, suite="mnist-c", seed=1)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all() and float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(y, corrupt(x, name, suite="mnist-c", seed=1))
    with pytest.raises(rl.ConfigError, match="severity"):
        corrupt(x, name, 2, suite="mnist-c")


def _scipy_affine(img: np.ndarray, matrix_cr: np.ndarray) -> np.ndarray:
    """``out(p) = img(A p + t)`` about the centre with scipy (row, column order)."""
    from scipy.ndimage import affine_transform

    swap = np.array([[0, 1], [1, 0]])
    m = swap @ matrix_cr @ swap
    centre = np.array([(img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2])
    return affine_transform(img, m, offset=centre - m @ centre, order=1, mode="constant", cval=0)


@pytest.mark.parametrize("name", ["rotate", "shear", "scale"])
def test_geometry_against_scipy(digits, name):
    pytest.importorskip("scipy")
    out = corrupt(digits, name, suite="mnist-c", seed=0)
    for img, got in zip(digits[:, 0].numpy(), out[:, 0].numpy()):
        candidates = []
        for sign in (1, -1):
            c = 0.4 * sign
            if name == "rotate":
                a = np.array([[math.cos(c), -math.sin(c)], [math.sin(c), math.cos(c)]])
            elif name == "shear":
                a = np.array([[1, -math.sin(c)], [0, math.cos(c)]])
            else:
                a = np.eye(2) / 0.7
            candidates.append(np.abs(_scipy_affine(img, a) - got).max())
        assert min(candidates) < 1e-6, (name, candidates)


def test_translate_is_a_shift_of_three_pixels(digits):
    out = corrupt(digits, "translate", suite="mnist-c", seed=0)
    for img, got in zip(digits[:, 0], out[:, 0]):
        errors = []
        for dy in (-3, 3):
            for dx in (-3, 3):
                want = torch.zeros_like(img)  # out[r, c] = img[r + dy, c + dx], zero outside
                r0, r1 = max(0, -dy), min(28, 28 - dy)
                c0, c1 = max(0, -dx), min(28, 28 - dx)
                want[r0:r1, c0:c1] = img[r0 + dy : r1 + dy, c0 + dx : c1 + dx]
                errors.append(float((want - got).abs().max()))
        assert min(errors) < 1e-6


def test_stripe_and_dotted_line_by_hand(digits):
    out = corrupt(digits, "stripe", suite="mnist-c")
    want = digits.clone()
    want[..., :7], want[..., 21:] = 1 - digits[..., :7], 1 - digits[..., 21:]
    torch.testing.assert_close(out, want)
    black = torch.zeros(8, 1, 28, 28)
    dotted = corrupt(black, "dotted_line", suite="mnist-c", seed=2)[:, 0]
    cols = dotted.sum(1)  # (8, 28): ink per column
    gaps = (torch.arange(28) // 2) % 2 == 0  # columns 0-1, 4-5, ... are gaps
    dashes = ~gaps
    dashes[27] = False  # the line ends before column ceil(27) (as the benchmark draws it)
    assert float(cols[:, gaps].sum()) == 0 and float(cols[:, 27].sum()) == 0
    assert bool((cols[:, dashes] > 0).all())
    zig = corrupt(black, "zigzag", suite="mnist-c", seed=2)[:, 0]
    ink = zig.sum(1) > 0  # the zigzag runs from column 2 to 25 (parts may leave the image)
    assert not ink[:, :2].any() and not ink[:, 26:].any()
    assert float(ink[:, 2:26].float().mean()) > 0.8


def test_canny_against_scikit_image(digits):
    feature = pytest.importorskip("skimage.feature")
    ref = torch.from_numpy(np.stack([feature.canny(im[0].numpy()) for im in digits])).double()
    ours = canny(digits, 1.0)[:, 0]
    iou = float((ours * ref).sum() / ((ours + ref) > 0).sum())
    assert iou > 0.85, iou
    assert set(corrupt(digits, "canny_edges", suite="mnist-c").unique().tolist()) <= {0.0, 1.0}
    # smooth fractal images have edges of every strength, so the two thresholds and the
    # hysteresis between them matter (scikit-image interpolates in its non-maximum
    # suppression, hence the lower agreement)
    from robustlab.corruptions.imagenet_c import plasma_fractal

    fractal = plasma_fractal(16, 32, 1.5, torch.Generator().manual_seed(0), digits)[:, None]
    for amplitude, agreement in ((0.5, 0.7), (0.25, 0.6)):  # fainter: more weak edges
        smooth = amplitude * fractal
        ref = torch.from_numpy(np.stack([feature.canny(im[0].numpy()) for im in smooth]))
        ours = canny(smooth, 1.0)[:, 0]
        assert float((ours * ref).sum() / ((ours + ref) > 0).sum()) > agreement
        assert abs(float(ours.sum() / ref.sum()) - 1) < 0.1  # as many edge pixels


def test_each_corruption_changes_the_digits(digits):
    for name in MNIST_C:
        y = corrupt(digits, name, suite="mnist-c", seed=0)
        assert float((y - digits).abs().mean()) > 0.005, name

"""JPEG compression as a defense (Guo, Rana, Cisse & van der Maaten, ICLR 2018; Das et
al. 2017), with a differentiable JPEG for BPDA (Shin & Song, "JPEG-resistant
adversarial images", NeurIPS 2017 ML and Security workshop).

Guo et al. report that JPEG, like bit-depth reduction, falls to BPDA (Athalye, Carlini &
Wagner, ICML 2018); :class:`JPEG` therefore declares itself non-differentiable and
offers :func:`jpeg_approx` as its surrogate.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robustlab.defenses.base import DEFENSES, Defense, check_pixels
from robustlab.errors import ConfigError

#: ITU-T T.81 Annex K.1 quantisation tables (natural row-major order), the tables
#: libjpeg (and so Pillow) scales by quality
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)
ROUNDINGS = ("cubic", "straight_through")


def quantization_table(quality: int, chroma: bool = False) -> list[list[int]]:
    """The quantisation table libjpeg uses at ``quality`` (``jpeg_set_quality`` with
    baseline tables): scale ``5000 / q`` below 50, ``200 - 2q`` from 50, entries
    ``(base * scale + 50) // 100`` clipped to 1..255."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = CHROMA_TABLE if chroma else LUMA_TABLE
    return [[min(max((b * scale + 50) // 100, 1), 255) for b in row] for row in base]


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II: ``D[u, n] = c(u) cos((2n + 1) u pi / 16)`` (JPEG's FDCT)."""
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d.to(dtype=dtype, device=device)


def _round(y: torch.Tensor, rounding: str) -> torch.Tensor:
    r = torch.round(y).detach()
    if rounding == "cubic":  # Shin & Song: round(y) + (y - round(y))**3, slope 3 (y - round(y))**2
        return r + (y - r) ** 3
    return y + (r - y).detach()  # the value of round(y), the gradient of y


def _block_codec(plane: torch.Tensor, table: torch.Tensor, rounding: str) -> torch.Tensor:
    """Level-shifted 8x8 block DCT, quantise, dequantise, inverse DCT of (B, C, H, W)
    planes whose sides are multiples of 8."""
    B, C, H, W = plane.shape
    d = _dct_matrix(plane.dtype, plane.device)
    blocks = (plane - 128).reshape(B, C, H // 8, 8, W // 8, 8).transpose(3, 4)
    coef = d @ blocks @ d.T
    coef = _round(coef / table, rounding) * table
    blocks = d.T @ coef @ d
    return blocks.transpose(3, 4).reshape(B, C, H, W) + 128


def _upsample2(c: torch.Tensor) -> torch.Tensor:
    """libjpeg's "fancy" 2x upsampling of (B, C, h, w): each output pixel is 3/4 of its
    nearest input sample and 1/4 of the next one out, per axis (edges replicated)."""
    for dim in (2, 3):
        n = c.shape[dim]
        pad = (0, 0, 1, 1) if dim == 2 else (1, 1, 0, 0)
        p = F.pad(c, pad, mode="replicate")
        prev, nxt = p.narrow(dim, 0, n), p.narrow(dim, 2, n)
        lo, hi = 0.75 * c + 0.25 * prev, 0.75 * c + 0.25 * nxt
        c = torch.stack((lo, hi), dim=dim + 1).flatten(dim, dim + 1)
    return c


def _samples(v: torch.Tensor) -> torch.Tensor:
    """8-bit samples as libjpeg stores them: rounded and clipped to 0..255 in value,
    straight-through in gradient (inside 0..255)."""
    v = v.clamp(0, 255)
    return v + (torch.round(v) - v).detach()


def jpeg_approx(x: torch.Tensor, quality: int, rounding: str = "cubic") -> torch.Tensor:
    """Differentiable JPEG round trip of pixels in [0, 1] (Shin & Song 2017), written to
    follow libjpeg's default pipeline as Pillow runs it.

    Steps: pixels to 8-bit samples; edges replicated to a multiple of 16 (libjpeg's MCU
    padding); RGB -> YCbCr (JFIF); chroma subsampled 4:2:0 by 2x2 averaging (Pillow's
    default at every quality); per plane: level shift, orthonormal 8x8 block DCT,
    division by the quality-scaled Annex K table, differentiable rounding,
    dequantisation, inverse DCT; chroma upsampled with libjpeg's "fancy" triangle
    filter; YCbCr -> RGB; / 255. Grayscale (C = 1) is one luminance plane. Wherever
    libjpeg stores 8-bit samples the values are rounded and clipped to 0..255, with a
    straight-through gradient.

    Differences from libjpeg: floating point instead of its integer DCT and colour
    arithmetic (a coefficient near a rounding boundary may round the other way; the
    downsampling's alternating tie-break is plain rounding), and the rounding of the
    coefficients: ``cubic`` (Shin & Song: ``round(y) + (y - round(y))**3``, within 1/8 of
    a quantisation step; its slope ``3 (y - round(y))**2`` vanishes where a coefficient
    sits on a level, as the real rounding's does) or ``straight_through`` (the exact
    rounding forward, slope 1).

    Shapes: (B, C, H, W) with C in {1, 3} -> (B, C, H, W) in [0, 1].
    """
    _, C, H, W = x.shape
    Hp, Wp = -(-H // 16) * 16, -(-W // 16) * 16
    v = F.pad(_samples(x * 255), (0, Wp - W, 0, Hp - H), mode="replicate")
    luma = torch.tensor(quantization_table(quality), dtype=x.dtype, device=x.device)
    if C == 1:
        return _samples(_block_codec(v, luma, rounding))[..., :H, :W] / 255
    chroma = torch.tensor(quantization_table(quality, True), dtype=x.dtype, device=x.device)
    r, g, b = v[:, 0:1], v[:, 1:2], v[:, 2:3]
    y = _samples(0.299 * r + 0.587 * g + 0.114 * b)
    cb = _samples(-0.168735892 * r - 0.331264108 * g + 0.5 * b + 128)
    cr = _samples(0.5 * r - 0.418687589 * g - 0.081312411 * b + 128)
    y = _samples(_block_codec(y, luma, rounding))[..., :H, :W]
    c = _samples(F.avg_pool2d(torch.cat((cb, cr), 1), 2))
    c = _samples(_block_codec(c, chroma, rounding))[..., : -(-H // 2), : -(-W // 2)]
    c = _samples(_upsample2(c))[..., :H, :W] - 128
    cb, cr = c[:, 0:1], c[:, 1:2]
    rgb = torch.cat(
        (y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb), dim=1
    )
    return _samples(rgb) / 255


def pillow_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 (H, W) or (H, W, 3) array with Pillow at ``quality`` (its default
    subsampling and tables) and decode it back to the same shape."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded)


@DEFENSES.register("jpeg")
class JPEG(Defense):
    """JPEG compression and decompression of each image at ``quality`` (Guo et al. 2018).

    Forward: pixels to 8 bits (``round(x * 255)``), a real JPEG round trip through Pillow
    (libjpeg; its defaults: Annex K tables scaled by quality, 4:2:0 chroma subsampling for
    RGB, integer DCT), back to ``uint8 / 255`` in the input's dtype and device. Grayscale
    (C = 1) is encoded as a one-channel JPEG, RGB (C = 3) as YCbCr; other channel counts
    are refused. Guo et al. used quality 75 (the default here; from memory of the paper,
    not recorded in REFERENCES.md).

    Non-differentiable (Pillow runs outside autograd): the BPDA surrogate is
    :func:`jpeg_approx`, a differentiable JPEG whose mean distance to the real one is
    below 1/255 on MNIST digits and 2/255 on smooth RGB images (tested at qualities 50,
    75 and 90).

    Args:
        quality: JPEG quality, 1..100.
        rounding: the surrogate's rounding: ``"cubic"`` (Shin & Song) or
            ``"straight_through"``.

    Shapes: (B, C, H, W) in [0, 1], C in {1, 3} -> (B, C, H, W) in [0, 1], values k/255.

    Example:
        >>> defended = defend(model, ["jpeg:quality=75"])
        >>> with bpda_mode(defended):
        ...     x_adv = PGD(defended, eps=0.03)(x, y)
    """

    name = "jpeg"
    randomized = False
    differentiable = False

    def __init__(self, quality: int = 75, rounding: str = "cubic") -> None:
        super().__init__()
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ConfigError(f"jpeg: quality must be an integer in 1..100, got {quality!r}")
        if rounding not in ROUNDINGS:
            raise ConfigError(
                f"jpeg: rounding must be 'cubic' or 'straight_through', got {rounding!r}"
            )
        self.quality = quality
        self.rounding = rounding

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        check_pixels(x, self.name, channels=(1, 3))
        pixels = torch.round(x.detach() * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
        images = pixels[:, 0] if x.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)
        out = np.stack([pillow_jpeg(im, self.quality) for im in images]) if len(images) else images
        out = out[:, None] if x.shape[1] == 1 else out.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device, x.dtype) / 255

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        return jpeg_approx(x, self.quality, self.rounding)

    def options(self) -> dict[str, Any]:
        return {"quality": self.quality, "rounding": self.rounding}

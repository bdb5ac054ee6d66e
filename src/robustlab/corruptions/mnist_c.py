"""MNIST-C (Mu & Gilmer, ICML 2019 workshop): 15 corruptions of handwritten digits, each
at the one strength the benchmark fixed, as batched tensor operations.

The parameters are those of the benchmark's generator (google-research/mnist-c), which
works on 28x28 images; for other sizes every length (blur radii, shifts, line widths) is
multiplied by ``min(H, W) / 28``. No ImageMagick (the benchmark's motion blur) and no
OpenCV: the motion blur is the Gaussian-weighted line of shifted copies that
:func:`~robustlab.corruptions.imagenet_c.motion_kernel_blur` implements, and Canny edges
are computed here (Gaussian smoothing, Sobel gradients, non-maximum suppression,
hysteresis, with scikit-image's default thresholds).

Each function takes ``x`` (B, C, H, W) in [0, 1] and a :class:`torch.Generator`; colour
images are handled channel by channel (the benchmark is grayscale).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustlab.corruptions import imagenet_c as inc

MNIST_C: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {}


def _register(fn):
    MNIST_C[fn.__name__] = fn
    return fn


def _scale(x: torch.Tensor) -> float:
    return min(x.shape[-2:]) / 28


def _sign(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.rand(n, generator=gen, device=gen.device) < 0.5).to(like.device).mul(2).sub(1)


def _warp(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``out(p) = x(A p + t)`` with p = (column, row) in pixels, bilinear, zero outside
    (scikit-image's ``warp`` with ``inverse_map``, order 1, constant 0). ``matrix`` (B, 2,
    2), ``offset`` (B, 2)."""
    b, _, h, w = x.shape
    rows, cols = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=x.dtype),
        torch.arange(w, device=x.device, dtype=x.dtype),
        indexing="ij",
    )
    p = torch.stack([cols, rows], -1).view(1, h * w, 2)
    q = p @ matrix.transpose(1, 2).to(x.dtype) + offset[:, None, :].to(x.dtype)
    q = q.view(b, h, w, 2)
    return F.grid_sample(
        x,
        inc.pixel_grid(q[..., 0], q[..., 1]),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )


def _about_centre(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Warp by ``matrix`` keeping the image centre fixed (the benchmark's translation)."""
    h, w = x.shape[-2:]
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=matrix.dtype, device=matrix.device)
    offset = centre - matrix @ centre
    return _warp(x, matrix, offset)


# ----------------------------------------------------------------------------- noise, blur


@_register
def shot_noise(x, gen):
    return inc.shot_noise(x, 5, gen)


@_register
def impulse_noise(x, gen):
    return inc.impulse_noise(x, 4, gen)


@_register
def glass_blur(x, gen):
    """ImageNet-C's glass blur at severity 1 (sigma 0.7, offsets of one pixel, two
    rounds); the benchmark swaps each pixel with probability one half, so half of the
    pixels here keep their place in each round."""
    s = _scale(x)
    return inc.glass(x, 0.7 * s, max(round(s), 1), 2, gen, move=0.5)


@_register
def motion_blur(x, gen):
    """Radius 10, sigma 3 (at 28 px), one angle in [-45, 45] degrees per image."""
    s = _scale(x)
    angle = torch.rand(x.shape[0], generator=gen, device=gen.device, dtype=torch.float64)
    return inc.motion_kernel_blur(x, 10 * s, 3 * s, (90 * angle - 45).cpu()).clamp(0, 1)


# ----------------------------------------------------------------------------- geometry


@_register
def shear(x, gen):
    """Shear of 0.4 rad (a random direction per image) about the centre."""
    c = 0.4 * _sign(x.shape[0], gen, x).double()
    m = torch.zeros(x.shape[0], 2, 2, dtype=torch.float64, device=x.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 1] = 1.0, -torch.sin(c), torch.cos(c)
    return _about_centre(x, m).clamp(0, 1)


@_register
def rotate(x, gen):
    """Rotation by 0.4 rad (random direction) about the centre."""
    c = 0.4 * _sign(x.shape[0], gen, x).double()
    m = torch.stack([torch.cos(c), -torch.sin(c), torch.sin(c), torch.cos(c)], -1).view(-1, 2, 2)
    return _about_centre(x, m).clamp(0, 1)


@_register
def scale(x, gen):
    """Shrink to 70% about the centre (sampling coordinates stretched by 1 / 0.7)."""
    m = torch.eye(2, dtype=torch.float64, device=x.device).expand(x.shape[0], 2, 2) / 0.7
    return _about_centre(x, m).clamp(0, 1)


@_register
def translate(x, gen):
    """A shift of 3 pixels (at 28 px) along each axis, random signs."""
    d = 3 * _scale(x)
    offset = torch.stack([_sign(x.shape[0], gen, x), _sign(x.shape[0], gen, x)], -1) * d
    eye = torch.eye(2, dtype=torch.float64, device=x.device).expand(x.shape[0], 2, 2)
    return _warp(x, eye, offset.double()).clamp(0, 1)


# ----------------------------------------------------------------------------- intensity


@_register
def brightness(x, gen):
    return inc.brightness(x, 5, gen)


@_register
def stripe(x, gen):
    """The outer quarter columns on each side inverted (columns 0-6 and 21-27 at 28 px)."""
    w = x.shape[-1]
    left, right = round(w / 4), w - round(w / 4)
    out = x.clone()
    out[..., :left] = 1 - x[..., :left]
    out[..., right:] = 1 - x[..., right:]
    return out


@_register
def fog(x, gen):
    """ImageNet-C's fog at severity 5, cut from a 256-pixel fractal (as the benchmark
    does: large, smooth patches)."""
    b, _, h, w = x.shape
    top = x.amax((1, 2, 3), keepdim=True)
    side = inc._next_pow2(max(256, h, w))
    cloud = inc.plasma_fractal(b, side, 1.4, gen, x)[:, None, :h, :w]
    return ((x + 3.0 * cloud) * top / (top + 3.0)).clamp(0, 1)


@_register
def spatter(x, gen):
    """Mud: a thresholded, blurred Gaussian field (mean 0.65, sd 0.3, sigma 1, threshold
    0.65, mask blurred by 1.5 and kept above 0.8) darkens the image to grey 63/255."""
    s = _scale(x)
    b, c, h, w = x.shape
    liquid = 0.65 + 0.3 * torch.randn((b, c, h, w), generator=gen, device=gen.device)
    liquid = inc.gaussian_blur(liquid.to(x.device, x.dtype), 1 * s)
    mask = inc.gaussian_blur((liquid > 0.65).to(x.dtype), 1.5 * s)
    mask = torch.where(mask < 0.8, torch.zeros_like(mask), mask)
    return (x * (1 - mask) + 63 / 255 * mask).clamp(0, 1)


# ----------------------------------------------------------------------------- lines


def line_image(
    c0: torch.Tensor, r0: torch.Tensor, c1: torch.Tensor, r1: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """Per image b, a line from (c0, r0) to (c1, r1) (column, row at 28 px units scaled
    to the size): intensity ``1 + log(1 - d / 2.3)`` at vertical distance d < 2.3 pixels
    from it (clipped to [0, 1]), only between the columns floor(c0) and ceil(c1)."""
    s = min(h, w) / 28
    cols = torch.arange(w, dtype=torch.float64, device=c0.device)[None, None, :]
    rows = torch.arange(h, dtype=torch.float64, device=c0.device)[None, :, None]
    c0, r0, c1, r1 = (t.double()[:, None, None] for t in (c0, r0, c1, r1))
    slope = (r1 - r0) / torch.where(c1 == c0, torch.ones_like(c1), c1 - c0)
    dist = (rows - (slope * (cols - c0) + r0)).abs().clamp(max=2.3 * s - 1e-10)
    value = (torch.log(1 - dist / (2.3 * s)) + 1).clamp(0, 1)
    inside = (cols >= torch.floor(c0)) & (cols < torch.ceil(c1)) & (c1 != c0)
    return torch.where(inside, value, torch.zeros_like(value))


@_register
def dotted_line(x, gen):
    """A line across the image between two random heights, drawn in dashes of two
    columns (at 28 px) with gaps of two."""
    b, _, h, w = x.shape
    s = _scale(x)
    r = torch.randint(0, 27, (2, b), generator=gen, device=gen.device).double().cpu() * s
    line = line_image(torch.zeros(b), r[0], torch.full((b,), 27.0 * s), r[1], h, w)
    dash = (torch.arange(w, dtype=torch.float64) / (2 * s)).floor().remainder(2) == 1
    line = line * dash.view(1, 1, -1)
    return (x + line[:, None].to(x.device, x.dtype)).clamp(0, 1)


@_register
def zigzag(x, gen):
    """A zigzag (teeth 2 px long and 2 px high at 28 px) from column 2 to 25 at a random
    height and slope, each tooth a :func:`line_image` segment."""
    b, _, h, w = x.shape
    s = _scale(x)
    out = x.clone()
    r0 = torch.randint(0, 27, (b,), generator=gen, device=gen.device).cpu().double()
    r1 = r0 + torch.randint(-5, 5, (b,), generator=gen, device=gen.device).cpu().double()
    a = tooth = 2.0
    for i in range(b):
        theta = math.atan((float(r1[i]) - float(r0[i])) / 23)
        length = 23 / math.cos(theta)
        points = [(0.0, 0.0)]
        k = 0
        for k in range(int((length - a) // (2 * a)) + 1):
            points.append(((2 * k + 1) * a, (-1) ** k * tooth))
        last = (2 * a) * (length // (2 * a))
        if length != last:
            points.append((length, points[-1][1] / (2 * (length - last))))
        rot = [(2 + math.cos(theta) * pc - math.sin(theta) * pr,
                float(r0[i]) + math.sin(theta) * pc + math.cos(theta) * pr)
               for pc, pr in points]  # fmt: skip
        img = out[i : i + 1]
        for (ca, ra), (cb, rb) in itertools.pairwise(rot):
            seg = line_image(*(torch.tensor([v * s]) for v in (ca, ra, cb, rb)), h, w)
            img = (img + seg[:, None].to(x.device, x.dtype)).clamp(0, 1)
        out[i : i + 1] = img
    return out


# ----------------------------------------------------------------------------- edges


def canny(x: torch.Tensor, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    """Canny edges (B, C, H, W) in {0, 1}: Gaussian smoothing (sigma), Sobel gradients,
    non-maximum suppression along the gradient direction (4 sectors), and hysteresis:
    pixels whose (unnormalised Sobel) gradient magnitude reaches ``high`` start edges,
    connected ones above ``low`` continue them (scikit-image's defaults for images in
    [0, 1]: 0.1 and 0.2). The border pixel is never an edge."""
    b, c, h, w = x.shape
    y = inc.gaussian_blur(x.double(), sigma)
    sx = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64, device=x.device)
    k = torch.stack([sx, sx.T])[:, None].repeat(c, 1, 1, 1)
    g = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k, groups=c).view(b, c, 2, h, w)
    gx, gy = g[:, :, 0], g[:, :, 1]
    mag = torch.hypot(gx, gy)
    angle = torch.rad2deg(torch.atan2(gy, gx)).remainder(180)
    padded = F.pad(mag, (1, 1, 1, 1))
    # neighbours along the gradient: 0 deg (left/right), 45, 90 (up/down), 135
    shifts = {0: ((0, 1), (0, -1)), 45: ((1, 1), (-1, -1)), 90: ((1, 0), (-1, 0)),
              135: ((1, -1), (-1, 1))}  # fmt: skip
    sector = ((angle + 22.5) // 45).remainder(4) * 45
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for deg, ((dr1, dc1), (dr2, dc2)) in shifts.items():
        n1 = padded[..., 1 + dr1 : 1 + dr1 + h, 1 + dc1 : 1 + dc1 + w]
        n2 = padded[..., 1 + dr2 : 1 + dr2 + h, 1 + dc2 : 1 + dc2 + w]
        keep |= (sector == deg) & (mag >= n1) & (mag >= n2)
    mag = torch.where(keep, mag, torch.zeros_like(mag))
    mag[..., 0, :] = mag[..., -1, :] = 0
    mag[..., :, 0] = mag[..., :, -1] = 0
    # thresholds on the magnitude of the unnormalised Sobel response, as scikit-image's
    strong, weak = mag >= high, mag >= low
    edges = strong
    while True:
        grown = F.max_pool2d(edges.double(), 3, 1, 1).bool() & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.to(x.dtype)


@_register
def canny_edges(x, gen):
    """The image replaced by its Canny edges (sigma 1)."""
    return canny(x, 1.0 * _scale(x))

"""Random resizing and padding (Xie, Wang, Zhang, Ren & Yuille, ICLR 2018).

"Mitigating adversarial effects through randomization": resize the image to a random
size, then pad it at a random offset to a fixed, larger size. Athalye, Carlini & Wagner
(ICML 2018) reduced it to 0% accuracy at L-inf 0.031 with EOT, so evaluate it with
``eot_samples`` > 1 (it is declared randomized).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from robustlab.defenses.base import DEFENSES, Defense, DefenseInputError, check_pixels
from robustlab.errors import ConfigError

MODES = ("nearest", "bilinear")
#: the paper's ratio of the largest padded size to the input size (331 / 299)
GROWTH = 331 / 299


def default_size_max(size: int) -> int:
    """The default largest resized side for a smallest side ``size``: ``round(size * 331/299)``."""
    return max(size, round(size * GROWTH))


def _check_size(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"resize_pad: {key} must be a positive integer, got {value!r}")
    return value


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Source index of each output pixel of a nearest-neighbour resize, ``floor(i * n_in /
    n_out)`` in exact integer arithmetic (TensorFlow 1's ``NEAREST_NEIGHBOR`` without
    ``align_corners``, which the authors' code used; PyTorch's ``mode="nearest"``)."""
    return torch.div(torch.arange(n_out, device=device) * n_in, n_out, rounding_mode="floor")


@DEFENSES.register("resize_pad")
class ResizePad(Defense):
    """Resize to a random ``s x s`` (``size_min <= s <= size_max``), then pad with
    ``pad_value`` at a random offset to ``out_size x out_size``.

    Each forward draws, per image (``per_image=True``) or once for the batch, a size
    ``s`` uniformly from ``size_min..size_max`` (both included) and an offset ``(top,
    left)`` uniformly from ``0..out_size - s`` (both included): the image occupies rows
    ``top .. top + s - 1`` and columns ``left .. left + s - 1``; every other pixel is
    ``pad_value``. The draws come from torch's global generator, so ``torch.manual_seed``
    reproduces them. Evaluation averages logits over draws (EOT); this module makes one
    draw per forward.

    Defaults (for a square ``n x n`` input, resolved at the first forward): ``size_min =
    n``, ``size_max = round(n * 331 / 299)`` (28 -> 31, 32 -> 35, 299 -> 331) and
    ``out_size = size_max``. The paper resizes 299 to ``[299, 331)`` and pads to 331; its
    exact setting is ``resize_pad:size_min=299:size_max=330:out_size=331`` (the defaults
    add the unpadded size ``s = out_size``). The authors' competition code drew one size
    and offset per batch (``per_image=false``), sizes in ``[310, 331)``, and averaged 30
    draws. Paper and code do not state a pad value: the code pads with ``tf.pad``'s 0
    *after* scaling pixels to [-1, 1], i.e. 0.5 in robustlab's pixel units (the value
    Athalye et al. assumed); the default here is 0.0 (black, like MNIST's background).

    The resize is nearest-neighbour by default, as in the authors' code
    (``tf.image.resize_images(..., NEAREST_NEIGHBOR)``); ``mode="bilinear"`` uses half-pixel
    centres (``align_corners=False``, no antialiasing). Both are differentiable (the
    defense needs EOT, not BPDA).

    The output is larger than the input: the model behind must take ``out_size`` (a
    zoo model built with ``input_size=out_size``, or one with adaptive pooling). Inputs
    need not be square when ``size_min`` is given; they are resized to ``s x s``.

    Args:
        size_min: smallest resized side (default: the input's side).
        size_max: largest resized side, included (default: ``round(size_min * 331/299)``).
        out_size: side of the padded output, ``>= size_max`` (default: ``size_max``).
        pad_value: value of the padding, in [0, 1].
        mode: ``"nearest"`` or ``"bilinear"``.
        per_image: one draw per image (True) or one per batch (False).

    Shapes: (B, C, H, W) in [0, 1] -> (B, C, out_size, out_size) in [0, 1], same dtype
    and device.

    Example:
        >>> defense = create_defense("resize_pad")              # 28x28 -> 31x31
        >>> model = rl.create_model("small_cnn", in_channels=1, input_size=31)
        >>> logits = DefendedModel(model, [defense])(x)
    """

    name = "resize_pad"
    randomized = True
    differentiable = True

    def __init__(
        self,
        size_min: int | None = None,
        size_max: int | None = None,
        out_size: int | None = None,
        pad_value: float = 0.0,
        mode: str = "nearest",
        per_image: bool = True,
    ) -> None:
        super().__init__()
        self.size_min = _check_size(size_min, "size_min")
        self.size_max = _check_size(size_max, "size_max")
        self.out_size = _check_size(out_size, "out_size")
        if size_min is not None and size_max is not None and size_max < size_min:
            raise ConfigError(f"resize_pad: size_max ({size_max}) must be >= size_min ({size_min})")
        largest = size_max
        if largest is None and size_min is not None:
            largest = default_size_max(size_min)
        if out_size is not None and largest is not None and out_size < largest:
            raise ConfigError(
                f"resize_pad: out_size ({out_size}) must be >= the largest resized size "
                f"({largest}{'' if size_max is not None else ', the default size_max'})"
            )
        if (
            isinstance(pad_value, bool)
            or not isinstance(pad_value, (int, float))
            or not 0.0 <= pad_value <= 1.0
        ):
            raise ConfigError(
                f"resize_pad: pad_value must be a number in [0, 1], got {pad_value!r}"
            )
        if mode not in MODES:
            raise ConfigError(f"resize_pad: mode must be 'nearest' or 'bilinear', got {mode!r}")
        if not isinstance(per_image, bool):
            raise ConfigError(f"resize_pad: per_image must be true or false, got {per_image!r}")
        self.pad_value = float(pad_value)
        self.mode = mode
        self.per_image = per_image

    def sizes(self, height: int, width: int) -> tuple[int, int, int]:
        """``(size_min, size_max, out_size)`` for an input of ``height x width``, with the
        defaults resolved."""
        lo = self.size_min
        if lo is None:
            if height != width:
                raise DefenseInputError(
                    f"resize_pad: the default sizes need a square input, got {height}x{width}; "
                    "set size_min (and size_max, out_size)"
                )
            lo = height
        hi = self.size_max if self.size_max is not None else default_size_max(lo)
        out = self.out_size if self.out_size is not None else hi
        if hi < lo or out < hi:
            raise DefenseInputError(
                f"resize_pad: for a {height}x{width} input the sizes resolve to size_min={lo}, "
                f"size_max={hi}, out_size={out}; need size_min <= size_max <= out_size"
            )
        return lo, hi, out

    def _resize(self, x: torch.Tensor, s: int) -> torch.Tensor:
        if self.mode == "bilinear":
            return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        rows = _nearest_index(x.shape[2], s, x.device)
        cols = _nearest_index(x.shape[3], s, x.device)
        return x.index_select(2, rows).index_select(3, cols)

    def _place(self, x: torch.Tensor, s: int, top: int, left: int, out: int) -> torch.Tensor:
        resized = self._resize(x, s)
        pad = (left, out - s - left, top, out - s - top)  # left, right, top, bottom
        return F.pad(resized, pad, mode="constant", value=self.pad_value)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        check_pixels(x, self.name)
        B, C, H, W = x.shape
        lo, hi, out = self.sizes(H, W)
        if B == 0:
            return x.new_empty(0, C, out, out)
        draws = B if self.per_image else 1
        sizes = torch.randint(lo, hi + 1, (draws,)).tolist()
        placed = []
        for i, s in enumerate(sizes):
            top, left = torch.randint(0, out - s + 1, (2,)).tolist()
            part = x[i : i + 1] if self.per_image else x
            placed.append(self._place(part, s, top, left, out))
        return torch.cat(placed) if self.per_image else placed[0]

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "size_min": self.size_min,
            "size_max": self.size_max,
            "out_size": self.out_size,
        }
        opts = {k: v for k, v in opts.items() if v is not None}  # None: derived from the input
        return {**opts, "pad_value": self.pad_value, "mode": self.mode, "per_image": self.per_image}

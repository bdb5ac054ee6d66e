"""The in-memory image data set every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from robustlab.errors import DataError


@dataclass
class ImageDataset:
    """Images and labels held in memory.

    Pixels are NCHW, either ``uint8`` in 0..255 (kept that way to save memory and
    converted per batch) or floating point in [0, 1]. ``mean`` and ``std`` are the
    per-channel statistics in [0, 1] units that a ``Normalize`` layer inside the model
    should use; they never change the pixels stored here.

    Attributes:
        x: images, shape (N, C, H, W).
        y: integer labels in ``0 .. num_classes - 1``, shape (N,).
        num_classes: number of classes.
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.
        name: the data set's name, for messages and metadata.
        classes: optional class names.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    name: str = ""
    classes: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.x = torch.as_tensor(self.x)
        self.y = torch.as_tensor(self.y)
        where = f"data set {self.name!r}: " if self.name else ""
        if self.x.ndim != 4:
            raise DataError(
                f"{where}images must be NCHW (4 dimensions), got shape {tuple(self.x.shape)}"
            )
        if self.y.ndim != 1 or self.y.shape[0] != self.x.shape[0]:
            raise DataError(
                f"{where}{self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}"
            )
        if self.x.shape[0] == 0:
            raise DataError(f"{where}no images")
        if self.y.is_floating_point() and not torch.equal(self.y, self.y.round()):
            raise DataError(f"{where}labels must be integers")
        self.y = self.y.long()
        if self.num_classes < 1:
            raise DataError(f"{where}num_classes must be >= 1, got {self.num_classes}")
        lo, hi = int(self.y.min()), int(self.y.max())
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"{where}label {bad} is out of range: expected 0..{self.num_classes - 1}"
            )
        if self.x.dtype != torch.uint8:
            if not self.x.is_floating_point():
                raise DataError(
                    f"{where}images must be uint8 or floating point, got {self.x.dtype}"
                )
            if torch.isnan(self.x).any():
                raise DataError(f"{where}images contain NaN")
            xmin, xmax = float(self.x.min()), float(self.x.max())
            if xmin < 0.0 or xmax > 1.0:
                raise DataError(
                    f"{where}float pixels lie in [{xmin:.3g}, {xmax:.3g}]; robustlab expects "
                    "[0, 1] (or uint8 0..255)"
                )
        c = self.x.shape[1]
        if not self.mean or not self.std:
            self.mean, self.std = channel_stats(self.x)
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if len(self.mean) != c or len(self.std) != c:
            raise DataError(
                f"{where}mean/std need {c} values, got {len(self.mean)}/{len(self.std)}"
            )
        if min(self.std) <= 0:
            raise DataError(f"{where}std must be positive, got {self.std}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor | np.ndarray | slice | int) -> ImageDataset:
        """A data set with the selected images (an int keeps the first ``index``)."""
        if isinstance(index, int):
            index = slice(0, index)
        return ImageDataset(
            self.x[index],
            self.y[index],
            self.num_classes,
            self.mean,
            self.std,
            self.name,
            self.classes,
        )

    def float_images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images (all, or ``x[index]``) as float32 in [0, 1]."""
        x = self.x if index is None else self.x[index]
        return to_float(x)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; floating point is returned as float32."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units (float64 accumulation, chunked)."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, x.shape[0], 4096):
        chunk = to_float(x[start : start + 4096]).double()
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.pow(2).sum(dim=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def to_nchw(array: np.ndarray, where: str) -> torch.Tensor:
    """Turn an image array from a file into a valid NCHW tensor.

    Accepts (N, H, W), (N, C, H, W) and (N, H, W, C) with C in {1, 3, 4}; uint8 stays
    uint8, other integer types in 0..255 become uint8, floats must lie in [0, 1].
    """
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[1] not in (1, 3, 4) and a.shape[3] in (1, 3, 4):
            a = a.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where}: images must have 3 or 4 dimensions, got shape {a.shape}")
    if a.dtype.kind in "iu" and a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError(f"{where}: integer pixels must lie in 0..255, got {a.min()}..{a.max()}")
        a = a.astype(np.uint8)
    elif a.dtype.kind == "f" or a.dtype.kind == "b":
        a = a.astype(np.float32)
    elif a.dtype != np.uint8:
        raise DataError(f"{where}: unsupported pixel type {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a))

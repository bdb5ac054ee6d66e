"""Readers of the published corrupted sets, in their own layouts.

- CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich 2019): ``ROOT/<corruption>.npy``
  holds the 5 severities stacked (severity s is rows ``(s - 1) * N .. s * N``), uint8
  NHWC, and ``ROOT/labels.npy`` the labels (stacked the same way).
- ImageNet-C: ``ROOT/<corruption>/<severity>/<class>/<image>``; classes are the sorted
  folder names (the WordNet ids, ImageNet's usual order) unless given.
- MNIST-C (Mu & Gilmer 2019, the static release): ``ROOT/<corruption>/test_images.npy``
  (N, 28, 28, 1) uint8 and ``test_labels.npy`` (also ``train_*``).

:func:`open_corruptions` looks at a directory and returns a :class:`CorruptionSource`
that lists what is there and reads one (corruption, severity) set at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustlab.data.base import ImageDataset
from robustlab.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as err:
        raise DataError(f"{path}: not a plain .npy array ({err})") from None


def _nchw(arr: np.ndarray, where: Path) -> torch.Tensor:
    if arr.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 images, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"{where}: expected images N x H x W x (1 or 3), got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def _pick(count: int, n: int | None, seed: int) -> np.ndarray:
    """``n`` indices of ``count`` (all, in order, when ``n`` is None), spread by a
    seeded permutation and kept in increasing order."""
    if n is None or n >= count:
        return np.arange(count)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(count)[:n])


@dataclass
class CorruptionSource:
    """Corrupted sets on disk: :attr:`available` maps corruption -> severities."""

    root: Path
    layout: str  #: "cifar-c", "imagenet-c" or "mnist-c"
    available: dict[str, tuple[int, ...]]
    num_classes: int | None = None
    classes: list[str] | None = None
    split: str = "test"

    def read(self, name: str, severity: int, n: int | None = None, seed: int = 0) -> ImageDataset:
        """The set of one corruption at one severity (``n`` images at most)."""
        if name not in self.available:
            raise ConfigError(
                f"{self.root} has no corruption {name!r} (it has {', '.join(self.available)})"
            )
        if severity not in self.available[name]:
            raise ConfigError(
                f"{self.root}: {name} has severities {list(self.available[name])}, not {severity}"
            )
        if self.layout == "cifar-c":
            return self._read_cifar(name, severity, n, seed)
        if self.layout == "mnist-c":
            return self._read_mnist(name, n, seed)
        return self._read_imagenet(name, severity, n, seed)

    def _read_cifar(self, name: str, severity: int, n: int | None, seed: int) -> ImageDataset:
        images = _load_npy(self.root / f"{name}.npy")
        labels = _load_npy(self.root / "labels.npy")
        if len(images) % 5 or len(labels) != len(images):
            raise DataError(
                f"{self.root}: {name}.npy has {len(images)} images and labels.npy "
                f"{len(labels)}; expected the same count, 5 severities stacked"
            )
        per = len(images) // 5
        idx = (severity - 1) * per + _pick(per, n, seed)
        x = _nchw(np.asarray(images[idx]), self.root / f"{name}.npy")
        y = torch.from_numpy(np.asarray(labels[idx]).astype(np.int64))
        k = self.num_classes or int(np.asarray(labels).max()) + 1
        return ImageDataset(x, y, num_classes=k, name=f"{self.root.name}/{name}-{severity}")

    def _read_mnist(self, name: str, n: int | None, seed: int) -> ImageDataset:
        folder = self.root / name
        images = _load_npy(folder / f"{self.split}_images.npy")
        labels = _load_npy(folder / f"{self.split}_labels.npy")
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels")
        idx = _pick(len(images), n, seed)
        x = _nchw(np.asarray(images[idx]), folder)
        y = torch.from_numpy(np.asarray(labels[idx]).astype(np.int64))
        return ImageDataset(x, y, num_classes=self.num_classes or 10, name=f"mnist-c/{name}")

    def _read_imagenet(self, name: str, severity: int, n: int | None, seed: int) -> ImageDataset:
        from PIL import Image

        folder = self.root / name / str(severity)
        classes = self.classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
        index = {c: i for i, c in enumerate(classes)}
        files = sorted(
            (p, index[p.parent.name])
            for p in folder.glob("*/*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.parent.name in index
        )
        if not files:
            raise DataError(f"{folder}: no images in class folders")
        chosen = [files[i] for i in _pick(len(files), n, seed)]
        arrays, labels = [], []
        for path, label in chosen:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert("RGB")))
            labels.append(label)
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(f"{folder}: images of different sizes {sorted(shapes)[:3]}")
        x = _nchw(np.stack(arrays), folder)
        return ImageDataset(
            x, torch.tensor(labels), num_classes=self.num_classes or len(classes),
            name=f"imagenet-c/{name}-{severity}", classes=list(classes),
        )  # fmt: skip


def open_corruptions(
    root: str | Path,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    split: str = "test",
) -> CorruptionSource:
    """Recognise the layout of ``root`` (CIFAR-10/100-C, ImageNet-C or MNIST-C) and list
    its corruptions and severities; a clear error if it is none of them."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"corruptions directory {root} does not exist")
    if (root / "labels.npy").is_file():
        names = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
        if not names:
            raise DataError(f"{root}: labels.npy but no <corruption>.npy files")
        return CorruptionSource(root, "cifar-c", {n: (1, 2, 3, 4, 5) for n in names}, num_classes)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    mnist = {p.name: (1,) for p in subdirs if (p / f"{split}_images.npy").is_file()}
    if mnist:
        return CorruptionSource(root, "mnist-c", mnist, num_classes, split=split)
    imagenet = {}
    for p in subdirs:
        sev = tuple(sorted(int(s.name) for s in p.iterdir() if s.is_dir() and s.name.isdigit()))
        if sev:
            imagenet[p.name] = sev
    if imagenet:
        return CorruptionSource(
            root, "imagenet-c", imagenet, num_classes, list(classes) if classes else None
        )
    raise ConfigError(
        f"{root} is not a corruptions directory: expected CIFAR-10-C's <corruption>.npy + "
        "labels.npy, MNIST-C's <corruption>/test_images.npy, or ImageNet-C's "
        "<corruption>/<severity>/<class>/ folders"
    )

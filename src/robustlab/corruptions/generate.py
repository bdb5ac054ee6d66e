"""Corrupting images and whole data sets, seeded and cached.

``corrupt(x, "fog", 3)`` corrupts one batch; :func:`corrupted_set` builds (or reads back
from the cache) the corrupted copy of a data set for one corruption and severity. The
cache key is everything that decides the pixels: a hash of the images, the suite, the
corruption, the severity, the seed, the reference size and :data:`VERSION` (raised when
an implementation changes), so that comparing many models generates each set once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from robustlab.corruptions.imagenet_c import IMAGENET_C
from robustlab.corruptions.mnist_c import MNIST_C
from robustlab.data.base import ImageDataset, to_float
from robustlab.errors import ConfigError, did_you_mean

#: bump when a corruption's output changes, so cached sets are regenerated
VERSION = 2
#: images corrupted per generator seed: the pixels do not depend on any batch size
CHUNK = 256
SUITES = {"imagenet-c": IMAGENET_C, "mnist-c": MNIST_C}
#: severities each suite has (MNIST-C fixes one strength per corruption)
SEVERITIES = {"imagenet-c": (1, 2, 3, 4, 5), "mnist-c": (1,)}


def check_corruption(suite: str, name: str, severity: int) -> None:
    """Raise a :class:`ConfigError` naming what is wrong with (suite, name, severity)."""
    if suite not in SUITES:
        raise ConfigError(
            f"unknown corruption suite {suite!r}{did_you_mean(suite, SUITES)} "
            f"(choose from {', '.join(SUITES)})"
        )
    if name not in SUITES[suite]:
        raise ConfigError(
            f"unknown {suite} corruption {name!r}{did_you_mean(name, SUITES[suite])} "
            f"(choose from {', '.join(SUITES[suite])})"
        )
    if isinstance(severity, bool) or severity not in SEVERITIES[suite]:
        raise ConfigError(
            f"{suite} severity must be one of {list(SEVERITIES[suite])}, got {severity!r}"
        )


def _seed(seed: int, *parts: Any) -> int:
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def corrupt(
    x: torch.Tensor,
    name: str,
    severity: int = 1,
    *,
    suite: str = "imagenet-c",
    seed: int = 0,
    reference_size: int = 224,
) -> torch.Tensor:
    """A corrupted copy of a batch.

    Args:
        x: images (B, C, H, W), C = 1 or 3, floating point in [0, 1] or uint8.
        name: a corruption of the suite (``robustlab.corruptions.IMAGENET_C`` or
            ``MNIST_C``).
        severity: 1..5 (ImageNet-C); MNIST-C has the one strength its benchmark fixed (1).
        suite: ``"imagenet-c"`` or ``"mnist-c"``.
        seed: seed of the corruption's randomness.
        reference_size: the image size the ImageNet-C parameters are meant for; spatial
            parameters are scaled by ``min(H, W) / reference_size``.

    Returns the corrupted batch in the input's dtype (uint8 stays uint8) and device.

    Example:
        >>> foggy = corrupt(x, "fog", 3, seed=0)
    """
    check_corruption(suite, name, severity)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"corrupt needs images (B, 1 or 3, H, W), got {shape}")
    if not isinstance(reference_size, int) or reference_size < 1:
        raise ConfigError(f"reference_size must be a whole number >= 1, got {reference_size!r}")
    as_uint8 = x.dtype == torch.uint8
    xf = to_float(x) if as_uint8 else x
    if not as_uint8:
        if not xf.is_floating_point():
            raise ConfigError(f"images must be uint8 or floating point, got {x.dtype}")
        if xf.numel() and (float(xf.min()) < 0 or float(xf.max()) > 1):
            raise ConfigError("images must hold pixels in [0, 1]")
    gen = torch.Generator(device="cpu").manual_seed(_seed(seed, suite, name, severity))
    work = xf.float() if xf.dtype in (torch.float16, torch.bfloat16) else xf
    if suite == "imagenet-c":
        out = IMAGENET_C[name](work, severity, gen, min(x.shape[-2:]) / reference_size)
    else:
        out = MNIST_C[name](work, gen)
    if as_uint8:
        return (out * 255).round().clamp(0, 255).to(torch.uint8)
    return out.to(x.dtype)


def data_digest(data: ImageDataset) -> str:
    """A hash of a data set's images and labels (what a cached set was made from)."""
    h = hashlib.sha256()
    for t in (data.x, data.y):
        t = t.contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy())
    return h.hexdigest()


def default_cache() -> Path:
    """``$ROBUSTLAB_CACHE/corruptions``, else ``~/.cache/robustlab/corruptions``."""
    root = os.environ.get("ROBUSTLAB_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "robustlab"
    return base / "corruptions"


def corrupted_set(
    data: ImageDataset,
    name: str,
    severity: int = 1,
    *,
    suite: str = "imagenet-c",
    seed: int = 0,
    reference_size: int = 224,
    cache: str | Path | bool | None = None,
) -> ImageDataset:
    """``data`` with every image corrupted (uint8, labels kept), from the cache if there.

    Args:
        data: the clean set (uint8 or float images).
        name, severity, suite, seed, reference_size: see :func:`corrupt`.
        cache: directory of cached sets (default :func:`default_cache`); ``False``
            disables caching. A cached file is used only if its recorded key matches.

    Images are corrupted in chunks of :data:`CHUNK`, each with its own seed, so the
    result does not depend on how the caller batches anything.
    """
    from robustlab.io import load_tensors, save_tensors

    check_corruption(suite, name, severity)
    key = {
        "version": VERSION, "suite": suite, "name": name, "severity": severity, "seed": seed,
        "reference_size": reference_size, "data": data_digest(data),
    }  # fmt: skip
    path = None
    if cache is not False:
        root = Path(cache) if cache not in (None, True) else default_cache()
        tag = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:20]
        path = root / suite / f"{name}-s{severity}-{tag}.safetensors"
        if path.is_file():
            try:
                tensors, meta = load_tensors(path)
            except Exception:  # a damaged cache file is regenerated, never trusted
                tensors, meta = {}, None
            x = tensors.get("x")
            if meta == key and x is not None and x.shape == data.x.shape:
                return _like(data, x, name, severity)
    chunks = [
        corrupt(data.x[i : i + CHUNK], name, severity, suite=suite,
                seed=_seed(seed, "chunk", i), reference_size=reference_size)
        for i in range(0, len(data), CHUNK)
    ]  # fmt: skip
    x = torch.cat(chunks)
    if x.dtype != torch.uint8:
        x = (x * 255).round().clamp(0, 255).to(torch.uint8)
    if path is not None:
        save_tensors(path, {"x": x}, key)
    return _like(data, x, name, severity)


def _like(data: ImageDataset, x: torch.Tensor, name: str, severity: int) -> ImageDataset:
    return ImageDataset(
        x, data.y.clone(), num_classes=data.num_classes, mean=data.mean, std=data.std,
        name=f"{data.name}/{name}-{severity}", classes=data.classes,
    )  # fmt: skip

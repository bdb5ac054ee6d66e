"""An in-memory batch loader that lives on the device and augments whole batches.

Nothing is copied per sample and no worker processes are started: the data set is
moved to the device once, each batch is gathered with one indexing operation and
augmented with batched tensor operations (as in airbench). Shuffling and
augmentation are functions of ``(seed, epoch, batch index)`` only, so an interrupted
run that resumes mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from robustlab.data.base import ImageDataset, to_float


def batch_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed derived from integer keys."""
    return int(
        np.random.SeedSequence([abs(int(k)) for k in keys]).generate_state(2, np.uint64)[0] >> 1
    )


def augment_batch(
    x: torch.Tensor,
    *,
    crop_padding: int = 0,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, in one shot.

    Args:
        x: float images (B, C, H, W).
        crop_padding: pad by this many pixels, then crop back to H x W at a random offset.
        flip: mirror each image left-right with probability 1/2.
        generator: random generator on ``x.device`` (for reproducibility).
    """
    b, _, h, w = x.shape
    dev = x.device
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
        ox = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
        rows = (oy + torch.arange(h, device=dev)).view(b, 1, h, 1)
        cols = (ox + torch.arange(w, device=dev)).view(b, 1, 1, w)
        batch = torch.arange(b, device=dev).view(b, 1, 1, 1)
        chans = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
        x = padded[batch, chans, rows, cols]
    if flip:
        mask = torch.rand(b, generator=generator, device=dev) < 0.5
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(3), x)
    return x


class BatchLoader:
    """Batches of ``(x, y)`` from an :class:`ImageDataset`, on ``device``, pixels float in [0, 1].

    Args:
        data: the data set (moved to ``device`` once).
        batch_size: images per batch on this process.
        shuffle: reshuffle every epoch (call :meth:`set_epoch`).
        drop_last: drop the last incomplete batch.
        crop_padding: random-crop augmentation padding in pixels (0: off).
        flip: random horizontal flips.
        seed: seed of shuffling and augmentation.
        device: where batches live (default: CPU).
        rank: this process's rank under data parallelism.
        world_size: number of processes; each rank sees a disjoint shard
            (``torch.utils.data.DistributedSampler`` when shuffling, equal sizes).

    Example:
        >>> loader = BatchLoader(load_dataset("digits"), 64, shuffle=True, flip=True)
        >>> for x, y in loader: ...
    """

    def __init__(
        self,
        data: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or "cpu")
        self.x = data.x.to(self.device)
        self.y = data.y.to(self.device)
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_padding, self.flip = crop_padding, flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._sampler = (
            DistributedSampler(range(len(data)), world_size, rank, shuffle=True, seed=seed)
            if shuffle
            else None
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation the next iteration uses."""
        self.epoch = epoch
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        if self._sampler is not None:
            return torch.tensor(list(iter(self._sampler)), dtype=torch.long)
        return torch.arange(self.rank, len(self.y), self.world_size)

    def __len__(self) -> int:
        n = (
            len(self._sampler)
            if self._sampler is not None
            else len(range(self.rank, len(self.y), self.world_size))
        )
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate from batch number ``start`` (to resume mid-epoch)."""
        idx = self.indices().to(self.device)
        augment = self.crop_padding > 0 or self.flip
        for i in range(start, len(self)):
            sel = idx[i * self.batch_size : (i + 1) * self.batch_size]
            x = to_float(self.x[sel])
            if augment:
                g = torch.Generator(device=self.device)
                g.manual_seed(batch_seed(self.seed, self.rank, self.epoch, i))
                x = augment_batch(x, crop_padding=self.crop_padding, flip=self.flip, generator=g)
            yield x, self.y[sel]

"""The on-device batch loader and batched augmentation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from robustlab.data import BatchLoader, ImageDataset, augment_batch


def _data(n=50, c=2, h=6, w=5):
    x = torch.rand(n, c, h, w)
    x[:, 0, 0, 0] = torch.arange(n) / n  # pixel (0,0,0) encodes the index
    return ImageDataset(x, torch.arange(n) % 3, 3)


def test_each_epoch_is_a_permutation_and_reproducible():
    data = _data()
    loader = BatchLoader(data, 8, shuffle=True, seed=3)
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        ys = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
        assert sorted((ys * 50).round().long().tolist()) == list(range(50))
        seen.append(ys)
    assert not torch.equal(seen[0], seen[1])
    again = BatchLoader(data, 8, shuffle=True, seed=3)
    again.set_epoch(1)
    assert torch.equal(torch.cat([x[:, 0, 0, 0] for x, _ in again]), seen[1])


def test_len_and_drop_last():
    assert len(BatchLoader(_data(), 8)) == 7
    loader = BatchLoader(_data(), 8, drop_last=True)
    assert len(loader) == 6 and all(len(y) == 8 for _, y in loader)


def test_ranks_get_disjoint_equal_shards_that_cover_the_data():
    data = _data(n=49)
    shards = []
    for rank in range(2):
        loader = BatchLoader(data, 5, shuffle=True, seed=0, rank=rank, world_size=2)
        loader.set_epoch(4)
        shards.append(loader.indices())
    assert len(shards[0]) == len(shards[1]) == 25  # DistributedSampler pads to equal sizes
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(49))
    # eval sharding (no shuffle): disjoint, no padding
    ev = [BatchLoader(data, 5, rank=r, world_size=2).indices().tolist() for r in range(2)]
    assert sorted(ev[0] + ev[1]) == list(range(49))


def test_resume_mid_epoch_gives_the_same_remaining_batches():
    loader = BatchLoader(_data(), 8, shuffle=True, crop_padding=2, flip=True, seed=5)
    loader.set_epoch(2)
    full = list(loader)
    tail = list(loader.batches(start=3))
    assert len(tail) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_uint8_images_become_float_in_unit_range():
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    batch, _ = next(iter(BatchLoader(ImageDataset(x, torch.zeros(10), 1), 10)))
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, x.float() / 255)


@pytest.mark.parametrize("pad", [1, 3])
def test_random_crop_is_a_window_of_the_padded_image(pad):
    """Brute force: every output equals padded[:, oy:oy+H, ox:ox+W] for some offset."""
    x = torch.rand(16, 3, 7, 6)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, crop_padding=pad, generator=g)
    padded = F.pad(x, (pad,) * 4)
    offsets = set()
    for i in range(len(x)):
        matches = [
            (oy, ox)
            for oy, ox in itertools.product(range(2 * pad + 1), repeat=2)
            if torch.equal(out[i], padded[i, :, oy : oy + 7, ox : ox + 6])
        ]
        assert matches, f"sample {i} is not a crop"
        offsets.add(matches[0])
    assert len(offsets) > 1  # offsets vary per sample


def test_flip_mirrors_about_half():
    x = torch.rand(400, 1, 3, 4)
    out = augment_batch(x, flip=True, generator=torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250

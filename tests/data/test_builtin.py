"""Built-in data sets: sizes, determinism, disjoint splits, learnability."""

from __future__ import annotations

import torch

from robustlab.data import load_dataset


def test_mnist5k_split_is_fixed_and_disjoint():
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.x.dtype == torch.uint8 and train.shape == (1, 28, 28)
    assert set(train.y.unique().tolist()) == set(range(10)) == set(test.y.unique().tolist())
    # No test image also appears in train (compare images as byte strings).
    train_set = {bytes(img.numpy().tobytes()) for img in train.x}
    assert not any(bytes(img.numpy().tobytes()) in train_set for img in test.x)
    again = load_dataset("mnist5k", "test")
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    # Real handwritten digits: mostly-black background, a few bright strokes.
    assert 0.08 < train.float_images().mean() < 0.2
    assert train.mean == (0.1307,) and train.std == (0.3081,)
    # The source is sorted by class; a split's first images must still mix the classes.
    assert len(test.y[:50].unique()) >= 8 and len(train.y[:50].unique()) >= 8


def test_digits_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360) and train.shape == (1, 8, 8)
    assert float(train.x.max()) == 1.0 and float(train.x.min()) == 0.0


def test_synthetic_shapes_seeds_and_determinism():
    a = load_dataset("synthetic", "train", num_classes=3, channels=3, size=16, n_train=60, seed=1)
    b = load_dataset("synthetic", "train", num_classes=3, channels=3, size=16, n_train=60, seed=1)
    c = load_dataset("synthetic", "train", num_classes=3, channels=3, size=16, n_train=60, seed=2)
    assert a.x.shape == (60, 3, 16, 16) and a.num_classes == 3
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert float(a.x.min()) >= 0.0 and float(a.x.max()) <= 1.0


def test_synthetic_is_learnable_but_not_trivial():
    """Nearest class mean (fit on train) must beat chance clearly on test, but not be perfect."""
    kw = dict(num_classes=10, size=16, n_train=1000, n_test=500)
    train, test = load_dataset("synthetic", "train", **kw), load_dataset("synthetic", "test", **kw)
    flat = train.x.flatten(1)
    means = torch.stack([flat[train.y == k].mean(0) for k in range(10)])
    pred = torch.cdist(test.x.flatten(1), means).argmin(1)
    acc = float((pred == test.y).float().mean())
    assert 0.5 < acc < 0.999, acc

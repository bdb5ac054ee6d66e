"""File-format readers, each tested on small files written here in that exact format."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from robustlab.data import load_dataset, read_idx, safe_load
from robustlab.errors import DataError, DataNotFoundError

RNG = np.random.default_rng(0)


def _images(n, c=3, h=32, w=32):
    return RNG.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ----------------------------------------------------------------------------- CIFAR


def _write_cifar10_binary(root, per_batch=4):
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = _images(per_batch), RNG.integers(0, 10, per_batch).astype(np.uint8)
        records = np.concatenate([y[:, None], x.reshape(per_batch, -1)], axis=1)
        (root / f"{name}.bin").write_bytes(records.tobytes())
        written[name] = (x, y)
    return written


def test_cifar10_binary_reads_what_was_written(tmp_path):
    written = _write_cifar10_binary(tmp_path)
    train = load_dataset("cifar10", "train", str(tmp_path))
    test = load_dataset("cifar10", "test", str(tmp_path))
    x_expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    y_expected = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert train.x.dtype == torch.uint8 and train.x.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(train.x.numpy(), x_expected)
    np.testing.assert_array_equal(train.y.numpy(), y_expected)
    np.testing.assert_array_equal(test.x.numpy(), written["test_batch"][0])
    assert train.num_classes == 10 and train.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_cifar10_python_version_in_its_subfolder(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = _images(3), RNG.integers(0, 10, 3)
        # Like the original files: bytes keys, flat uint8 rows, labels as a list.
        batch = {b"batch_label": b"x", b"data": x.reshape(3, -1), b"labels": [int(v) for v in y]}
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (x, y)
    test = load_dataset("cifar10", "test", str(tmp_path))
    np.testing.assert_array_equal(test.x.numpy(), written["test_batch"][0])
    np.testing.assert_array_equal(test.y.numpy(), written["test_batch"][1])
    assert len(load_dataset("cifar10", "train", str(tmp_path))) == 15


@pytest.mark.parametrize("fmt", ["binary", "python"])
@pytest.mark.parametrize("label", ["fine", "coarse"])
def test_cifar100_fine_and_coarse_labels(tmp_path, fmt, label):
    x = _images(5)
    fine, coarse = RNG.integers(0, 100, 5), RNG.integers(0, 20, 5)
    for split in ("train", "test"):
        if fmt == "binary":
            rows = np.concatenate([coarse[:, None], fine[:, None], x.reshape(5, -1)], axis=1)
            (tmp_path / f"{split}.bin").write_bytes(rows.astype(np.uint8).tobytes())
        else:
            batch = {
                b"data": x.reshape(5, -1),
                b"fine_labels": list(fine),
                b"coarse_labels": list(coarse),
            }
            (tmp_path / split).write_bytes(pickle.dumps(batch, protocol=4))
    data = load_dataset("cifar100", "test", str(tmp_path), label=label)
    np.testing.assert_array_equal(data.x.numpy(), x)
    np.testing.assert_array_equal(data.y.numpy(), fine if label == "fine" else coarse)
    assert data.num_classes == (100 if label == "fine" else 20)


def test_cifar_truncated_binary_is_named(tmp_path):
    _write_cifar10_binary(tmp_path)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"test_batch\.bin.*not a whole number.*truncated"):
        load_dataset("cifar10", "test", str(tmp_path))


def test_cifar_missing_batch_and_missing_root(tmp_path):
    _write_cifar10_binary(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3.bin"):
        load_dataset("cifar10", "train", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("cifar10", "train", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="root=PATH"):
        load_dataset("cifar10", "train")
    with pytest.raises(DataNotFoundError, match="no train files"):
        load_dataset("cifar100", "train", str(tmp_path))


# ----------------------------------------------------------------------------- pickles


class _Exploit:
    """Unpickling this would create a directory (the payload we must never run)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_restricted_unpickler_refuses_code(tmp_path):
    target = str(tmp_path / "pwned")
    payload = pickle.dumps({b"data": _Exploit(target)}, protocol=2)
    with pytest.raises(
        DataError, match=r"refusing to unpickle posix\.mkdir|refusing to unpickle os\.mkdir"
    ):
        safe_load(payload)
    assert not os.path.exists(target)


def test_malicious_cifar_file_is_refused(tmp_path):
    target = str(tmp_path / "pwned")
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(target), b"labels": []}))
    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(b"")
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", "test", str(tmp_path))
    assert not os.path.exists(target)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_admits_arrays_and_containers(protocol):
    obj = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": [1, 2.5, "s", b"x", None],
        "c": (True,),
    }
    out = safe_load(pickle.dumps(obj, protocol=protocol), encoding="latin1")
    np.testing.assert_array_equal(out["a"], obj["a"])
    assert out["b"] == obj["b"] and out["c"] == obj["c"]


def test_garbage_pickle_is_a_data_error():
    with pytest.raises(DataError, match="not a valid pickle"):
        safe_load(b"\x80\x04this is not a pickle")


# ----------------------------------------------------------------------------- IDX


def _idx_bytes(array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_plain_and_gzip(tmp_path, gz):
    arrays = {}
    for prefix, n in (("train", 7), ("t10k", 5)):
        x = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = RNG.integers(0, 10, n).astype(np.uint8)
        for kind, arr, rank in (("images", x, 3), ("labels", y, 1)):
            data = _idx_bytes(arr)
            name = f"{prefix}-{kind}-idx{rank}-ubyte"
            if gz:
                (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (tmp_path / name).write_bytes(data)
        arrays[prefix] = (x, y)
    test = load_dataset("mnist", "test", str(tmp_path))
    assert test.x.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(test.x[:, 0].numpy(), arrays["t10k"][0])
    np.testing.assert_array_equal(test.y.numpy(), arrays["t10k"][1])
    assert len(load_dataset("mnist", "train", str(tmp_path))) == 7


def test_idx_other_types_big_endian(tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(a, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)


def test_idx_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 10)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")
    good = _idx_bytes(np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "short").write_bytes(good[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_mnist_missing_files_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", "train", str(tmp_path))


# ----------------------------------------------------------------------------- folders


def _write_folder(root, classes, n, size=(9, 7), fmt="PNG", mode="RGB"):
    from PIL import Image

    written = {}
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            array = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).convert(mode).save(root / cls / f"{i}.{fmt.lower()}", format=fmt)
            written[(cls, i)] = array
    return written


def test_imagefolder_png_exact_pixels_and_splits(tmp_path):
    written = _write_folder(tmp_path / "train", ["cat", "dog"], 3)
    _write_folder(tmp_path / "val", ["cat", "dog"], 1)
    train = load_dataset("imagefolder", "train", str(tmp_path))
    assert train.classes == ["cat", "dog"] and train.shape == (3, 7, 9)
    assert train.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(train.x[3].permute(1, 2, 0).numpy(), written[("dog", 0)])
    assert len(load_dataset("imagefolder", "test", str(tmp_path))) == 2  # falls back to val/


def test_imagefolder_jpeg_grey_and_resize(tmp_path):
    _write_folder(tmp_path, ["a", "b", "c"], 2, size=(10, 12), fmt="JPEG")
    data = load_dataset("imagefolder", "train", str(tmp_path), channels=1, size=8)
    assert data.shape == (1, 8, 8) and data.num_classes == 3 and len(data) == 6


def test_imagefolder_errors(tmp_path):
    _write_folder(tmp_path, ["a"], 1, size=(8, 8))
    _write_folder(tmp_path / "x", ["b"], 1, size=(6, 6))  # nested, ignored
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_dataset("imagefolder", "train", str(tmp_path))
    (tmp_path / "a" / "broken.png").unlink()
    _write_folder(tmp_path / "more", ["c"], 1, size=(5, 5))
    from PIL import Image

    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "a" / "small.png")
    with pytest.raises(DataError, match="pass size=N"):
        load_dataset("imagefolder", "train", str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset("imagefolder", "train", str(empty))


# ----------------------------------------------------------------------------- NPZ


def test_npz_nhwc_uint8_and_split_keys(tmp_path):
    x_train = RNG.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    x_test = RNG.random((4, 3, 5, 5)).astype(np.float32)
    np.savez(
        tmp_path / "d.npz",
        x_train=x_train,
        y_train=np.arange(6) % 3,
        x_test=x_test,
        y_test=np.arange(4) % 3,
    )
    train = load_dataset("npz", "train", str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(train.x.numpy(), x_train.transpose(0, 3, 1, 2))
    test = load_dataset("npz", "test", str(tmp_path / "d.npz"), num_classes=3)
    np.testing.assert_array_equal(test.x.numpy(), x_test)
    assert train.num_classes == 3 and test.y.tolist() == [0, 1, 2, 0]


def test_npz_directory_and_greyscale(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 1]))
    data = load_dataset("npz", "train", str(tmp_path))
    assert data.shape == (1, 4, 4)
    with pytest.raises(DataNotFoundError, match="test.npz"):
        load_dataset("npz", "test", str(tmp_path))


@pytest.mark.parametrize(
    "x, y, kwargs, message",
    [
        (
            np.zeros((2, 1, 4, 4), np.uint8),
            np.array([0, 12]),
            {"num_classes": 10},
            r"label 12 is out of range.*0\.\.9",
        ),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0, -1]), {}, "label -1 is out of range"),
        (
            np.full((2, 1, 4, 4), 3.0, np.float32),
            np.array([0, 1]),
            {},
            r"float pixels lie in \[3, 3\]",
        ),
        (np.full((2, 1, 4, 4), np.nan, np.float32), np.array([0, 1]), {}, "contain NaN"),
        (np.zeros((2, 16), np.uint8), np.array([0, 1]), {}, "must have 3 or 4 dimensions"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1, 1]), {}, "2 images but labels of shape"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0.5, 1.0]), {}, "labels 'y' must be integers"),
        (
            np.full((2, 1, 4, 4), 300, np.int32),
            np.array([0, 1]),
            {},
            r"integer pixels must lie in 0\.\.255",
        ),
    ],
)
def test_npz_bad_contents_are_named(tmp_path, x, y, kwargs, message):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataError, match=message):
        load_dataset("npz", "train", str(tmp_path / "d.npz"), **kwargs)


def test_npz_missing_keys_and_corrupt_file(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match=r"needs arrays 'x'/'y'.*has \['images'\]"):
        load_dataset("npz", "train", str(tmp_path / "d.npz"))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("npz", "train", str(tmp_path / "bad.npz"))


def test_unknown_dataset_split_and_option():
    with pytest.raises(ValueError, match="unknown dataset 'mnist5'; did you mean 'mnist5k'"):
        load_dataset("mnist5")
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_dataset("digits", "valid")
    with pytest.raises(ValueError, match="has no option 'sise'; did you mean 'size'"):
        load_dataset("synthetic", sise=8)

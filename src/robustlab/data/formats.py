"""Data sets read from files users bring: CIFAR-10/100, MNIST IDX, image folders, NPZ.

Each reader validates what it reads and names the file and the problem when a file
is missing, truncated or not in the expected format.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from robustlab.data.base import ImageDataset, to_nchw
from robustlab.data.builtin import MNIST_MEAN, MNIST_STD
from robustlab.data.registry import DATASETS
from robustlab.data.safe_pickle import safe_load
from robustlab.errors import DataError, DataNotFoundError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _root(root: str | None, name: str) -> Path:
    if root is None:
        raise DataError(f"dataset {name!r} is read from disk: give its location with root=PATH")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataNotFoundError(f"dataset {name!r}: {path} does not exist")
    return path


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.exists()), None)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DataError(f"{path}: cannot read ({err})") from None


# ----------------------------------------------------------------------------- CIFAR


def _cifar_files(base: Path, split: str, variant: int, fmt: str) -> list[Path]:
    if variant == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        names = [split]
    return [base / (n + ".bin" if fmt == "binary" else n) for n in names]


def _find_cifar(root: Path, split: str, variant: int) -> tuple[str, list[Path]]:
    subdirs = (
        ("cifar-10-batches-bin", "cifar-10-batches-py")
        if variant == 10
        else ("cifar-100-binary", "cifar-100-python")
    )
    for base in (root, root / subdirs[0], root / subdirs[1]):
        for fmt in ("binary", "python"):
            files = _cifar_files(base, split, variant, fmt)
            if files[0].is_file():
                missing = [str(f) for f in files if not f.is_file()]
                if missing:
                    raise DataNotFoundError(f"cifar{variant}: missing {', '.join(missing)}")
                return fmt, files
    expected = _cifar_files(root, split, variant, "binary")[0].name
    raise DataNotFoundError(
        f"cifar{variant}: no {split} files under {root} (looked for {expected} or its python "
        f"version, also in {subdirs[0]}/ and {subdirs[1]}/)"
    )


def _read_cifar_binary(path: Path, variant: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    label_bytes = 1 if variant == 10 else 2
    record = label_bytes + 3072
    raw = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR-{variant} "
            "records (truncated or not a CIFAR binary file)"
        )
    rows = raw.reshape(-1, record)
    y = rows[:, 0 if variant == 10 or label == "coarse" else 1].astype(np.int64)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), y


def _read_cifar_python(path: Path, variant: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load(_read_bytes(path), where=str(path))
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    key = "labels" if variant == 10 else f"{label}_labels"
    if "data" not in batch or key not in batch:
        raise DataError(f"{path}: expected keys 'data' and {key!r}, found {sorted(batch)}")
    x = np.asarray(batch["data"], dtype=np.uint8)
    y = np.asarray(batch[key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{path}: data of shape {x.shape} and {len(y)} labels is not CIFAR")
    return x.reshape(-1, 3, 32, 32), y


def _cifar(root: str | None, split: str, variant: int, label: str = "fine") -> ImageDataset:
    name = f"cifar{variant}"
    if label not in ("fine", "coarse"):
        raise DataError(f"{name}: label must be 'fine' or 'coarse', got {label!r}")
    fmt, files = _find_cifar(_root(root, name), split, variant)
    reader = _read_cifar_binary if fmt == "binary" else _read_cifar_python
    parts = [reader(f, variant, label) for f in files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    num_classes = 10 if variant == 10 else (100 if label == "fine" else 20)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if variant == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return ImageDataset(
        torch.from_numpy(x.copy()), torch.from_numpy(y), num_classes, mean, std, name
    )


@DATASETS.register("cifar10")
def cifar10(split: str = "train", root: str | None = None) -> ImageDataset:
    """CIFAR-10 from its binary (``*.bin``) or python (pickled) version under ``root``."""
    return _cifar(root, split, 10)


@DATASETS.register("cifar100")
def cifar100(split: str = "train", root: str | None = None, label: str = "fine") -> ImageDataset:
    """CIFAR-100 from its binary or python version under ``root``.

    Args:
        label: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    """
    return _cifar(root, split, 100, label)


# ----------------------------------------------------------------------------- MNIST IDX

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped), the format of the original MNIST files."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header promises {expected} bytes of data for shape {dims}, "
            f"found {len(data) - header} (truncated or corrupt)"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="))
    )


def _find_idx(root: Path, prefix: str, kind: str) -> Path:
    rank = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
    candidates = [root / (n + ext) for n in names for ext in ("", ".gz")]
    found = _first_existing(candidates)
    if found is None:
        raise DataNotFoundError(f"mnist: no {candidates[0].name} (or .gz) under {root}")
    return found


@DATASETS.register("mnist")
def mnist(split: str = "train", root: str | None = None) -> ImageDataset:
    """MNIST (or Fashion-MNIST) from the IDX files (``train-images-idx3-ubyte[.gz]`` ...)."""
    base = _root(root, "mnist")
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = _find_idx(base, prefix, "images"), _find_idx(base, prefix, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"mnist: {images_path.name} has shape {images.shape} and {labels_path.name} "
            f"{labels.shape}; expected (N, H, W) images and N labels"
        )
    x = to_nchw(images, str(images_path))
    return ImageDataset(
        x, torch.from_numpy(labels.astype(np.int64)), 10, MNIST_MEAN, MNIST_STD, "mnist"
    )


# ----------------------------------------------------------------------------- folders


def _class_folders(directory: Path) -> list[str]:
    """Sorted names of the class folders in ``directory``; hidden folders (``.git``,
    ``.ipynb_checkpoints``, anything starting with '.') are not classes."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _imagefolder_splits(base: Path, split: str) -> tuple[Path, Path]:
    """``(training split folder, folder of the split asked for)``."""
    split_names = ("train", "test", "val")
    if not any((base / n).is_dir() for n in split_names):
        return base, base  # root itself holds the class folders, for every split
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DataNotFoundError(
            f"imagefolder: {train_dir} does not exist; class labels are numbered by the "
            "class folder names of the training split, so it must be present"
        )
    if split == "train":
        return train_dir, train_dir
    split_dir = _first_existing([base / "test", base / "val"])
    if split_dir is None or not split_dir.is_dir():
        raise DataNotFoundError(f"imagefolder: no test/ or val/ folder next to {train_dir}")
    return train_dir, split_dir


@DATASETS.register("imagefolder")
def imagefolder(
    split: str = "train", root: str | None = None, channels: int = 3, size: int | None = None
) -> ImageDataset:
    """Images in class sub-folders (ImageNet layout): ``root/[split/]CLASS/IMAGE``.

    ``root/train`` and ``root/test`` (or ``root/val``) are used when present; otherwise
    ``root`` itself holds the class folders and is used for whichever split is asked.
    Labels number the training split's class folders in sorted order; the test split's
    folders are matched to them *by name*, and a class missing from or extra in it is an
    error. Hidden folders and files (names starting with '.') are ignored.

    Args:
        channels: 1 (grey) or 3 (RGB); images are converted.
        size: resize every image to ``size`` x ``size``; required if sizes differ.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise DataError(f"imagefolder: channels must be 1 or 3, got {channels}")
    base = _root(root, "imagefolder")
    train_dir, split_dir = _imagefolder_splits(base, split)
    classes = _class_folders(train_dir)
    if not classes:
        raise DataError(f"imagefolder: no class sub-folders in {train_dir}")
    if split_dir != train_dir:
        present = _class_folders(split_dir)
        missing = [c for c in classes if c not in present]
        extra = [c for c in present if c not in classes]
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"missing class folder(s) {', '.join(map(repr, missing))}")
            if extra:
                problems.append(
                    f"class folder(s) {', '.join(map(repr, extra))} that {train_dir} lacks"
                )
            raise DataError(
                f"imagefolder: {split_dir} has {' and '.join(problems)}; every split must "
                f"hold the training split's classes, by name: {', '.join(classes)}"
            )
    images, labels, first_size = [], [], None
    for label, cls in enumerate(classes):
        files = sorted(
            p
            for p in (split_dir / cls).iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert("L" if channels == 1 else "RGB")
                    if size is not None:
                        im = im.resize((size, size), Image.BILINEAR)
                    array = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"imagefolder: cannot read image {path} ({err})") from None
            if first_size is None:
                first_size = (array.shape[:2], path)
            elif array.shape[:2] != first_size[0]:
                raise DataError(
                    f"imagefolder: {path} is {array.shape[1]}x{array.shape[0]} but "
                    f"{first_size[1]} is {first_size[0][1]}x{first_size[0][0]}; pass size=N"
                )
            images.append(array if channels == 3 else array[..., None])
            labels.append(label)
    if not images:
        raise DataError(
            f"imagefolder: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {split_dir}"
        )
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    return ImageDataset(x, torch.tensor(labels), len(classes), name="imagefolder", classes=classes)


# ----------------------------------------------------------------------------- NPZ


@DATASETS.register("npz")
def npz(
    split: str = "train", root: str | None = None, num_classes: int | None = None
) -> ImageDataset:
    """Arrays in a ``.npz``: keys ``x_train``/``y_train`` and ``x_test``/``y_test``, or ``x``/``y``.

    ``root`` is the ``.npz`` file, or a directory holding ``train.npz`` and ``test.npz``.
    Images may be (N, H, W), NCHW or NHWC, uint8 0..255 or float in [0, 1].

    Args:
        num_classes: number of classes (default: largest label + 1).
    """
    path = _root(root, "npz")
    if path.is_dir():
        path = path / f"{split}.npz"
        if not path.is_file():
            raise DataNotFoundError(f"npz: {path} does not exist")
    errors = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:  # never unpickle: an object array or a pickle file is refused by numpy itself
        arrays = np.load(path, allow_pickle=False)
    except errors as err:
        raise DataError(f"npz: cannot read {path} ({err})") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise DataError(f"npz: {path} is a single .npy array, not an .npz archive")
    with arrays:
        keys = set(arrays.files)
        xk, yk = (f"x_{split}", f"y_{split}") if f"x_{split}" in keys else ("x", "y")
        if xk not in keys or yk not in keys:
            raise DataError(
                f"npz: {path} needs arrays 'x'/'y' or 'x_{split}'/'y_{split}', has {sorted(keys)}"
            )
        loaded = {}
        for key in (xk, yk):
            try:
                loaded[key] = arrays[key]
            except errors as err:
                raise DataError(f"npz: cannot read array {key!r} of {path} ({err})") from None
    x_arr, y_arr = loaded[xk], loaded[yk]
    if y_arr.dtype.kind not in "iu":
        raise DataError(f"npz: labels {yk!r} must be integers, got {y_arr.dtype}")
    x = to_nchw(x_arr, f"npz {path}:{xk}")
    k = int(num_classes) if num_classes is not None else int(y_arr.max()) + 1
    return ImageDataset(x, torch.from_numpy(y_arr.astype(np.int64)), k, name="npz")

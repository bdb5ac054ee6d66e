"""Image folders: classes are matched by name across splits, hidden folders are not classes.

Every image written here is a flat PNG whose grey level encodes its class folder, so a
label can be checked against the folder the image was actually read from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from robustlab.data import load_dataset
from robustlab.errors import DataError, DataNotFoundError

# grey level of the images written into each class folder
LEVEL = {"ant": 10, "bee": 60, "cat": 110, "dog": 160, "eel": 210, ".ipynb_checkpoints": 250}


def write(folder: Path, classes: list[str], n: int = 2) -> None:
    from PIL import Image

    for cls in classes:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            array = np.full((4, 5), LEVEL[cls], np.uint8)
            Image.fromarray(array, mode="L").save(folder / cls / f"{i}.png")


def labels_by_folder(data) -> dict[str, set[int]]:
    """Folder name (from the pixels) -> the labels its images were given."""
    out: dict[str, set[int]] = {}
    level_to_class = {v: k for k, v in LEVEL.items()}
    for x, y in zip(data.x, data.y):
        out.setdefault(level_to_class[int(x[0, 0, 0])], set()).add(int(y))
    return out


def test_test_split_labels_follow_the_training_split_by_name(tmp_path):
    write(tmp_path / "train", ["ant", "bee", "cat"])
    write(tmp_path / "test", ["ant", "bee", "cat"], n=1)
    # a notebook's checkpoint folder in the test split only: sorted first, it would shift
    # every test label by one if it were a class
    write(tmp_path / "test", [".ipynb_checkpoints"], n=1)
    train = load_dataset("imagefolder", "train", str(tmp_path), channels=1)
    test = load_dataset("imagefolder", "test", str(tmp_path), channels=1)
    expected = {"ant": {0}, "bee": {1}, "cat": {2}}
    assert labels_by_folder(train) == expected
    assert labels_by_folder(test) == expected
    assert train.classes == test.classes == ["ant", "bee", "cat"]
    assert test.num_classes == 3 and len(test) == 3


def test_a_renamed_test_class_folder_is_an_error_naming_both_names(tmp_path):
    write(tmp_path / "train", ["ant", "bee", "cat"])
    write(tmp_path / "test", ["ant", "bee", "dog"])  # 'cat' renamed to 'dog'
    with pytest.raises(DataError, match=r"missing class folder\(s\) 'cat'.*'dog'") as info:
        load_dataset("imagefolder", "test", str(tmp_path), channels=1)
    assert str(tmp_path / "test") in str(info.value)


def test_a_missing_or_extra_test_class_is_an_error_naming_it(tmp_path):
    write(tmp_path / "train", ["ant", "bee", "cat"])
    write(tmp_path / "val", ["ant", "cat"])
    with pytest.raises(DataError, match=r"missing class folder\(s\) 'bee'"):
        load_dataset("imagefolder", "test", str(tmp_path), channels=1)
    write(tmp_path / "val", ["bee", "eel"])
    with pytest.raises(DataError, match=r"class folder\(s\) 'eel' that .*train lacks"):
        load_dataset("imagefolder", "test", str(tmp_path), channels=1)


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    write(tmp_path, ["bee", "cat", ".ipynb_checkpoints"])
    (tmp_path / ".git").mkdir()
    (tmp_path / "bee" / "._0.png").write_bytes(b"AppleDouble, not a PNG")
    data = load_dataset("imagefolder", "train", str(tmp_path), channels=1)
    assert data.classes == ["bee", "cat"] and data.num_classes == 2
    assert labels_by_folder(data) == {"bee": {0}, "cat": {1}}
    assert len(data) == 4


def test_a_split_layout_needs_its_training_split_and_a_test_split(tmp_path):
    write(tmp_path / "test", ["ant", "bee"])
    with pytest.raises(DataNotFoundError, match=r"train does not exist"):
        load_dataset("imagefolder", "test", str(tmp_path), channels=1)
    other = tmp_path / "other"
    write(other / "train", ["ant", "bee"])
    with pytest.raises(DataNotFoundError, match=r"no test/ or val/ folder"):
        load_dataset("imagefolder", "test", str(other), channels=1)

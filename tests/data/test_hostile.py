"""Hostile data files: pickles and NPZ archives that would run code must run nothing.

The pickles are written opcode by opcode (see ``pickletools``), so each one has exactly
the shape under test. Each payload, if it ran, would create ``tmp_path / "pwned"``
(or change numpy); every test asserts the refusal *and* that the side effect did not
happen, and that the error names the file.
"""

from __future__ import annotations

import copyreg
import importlib
import os
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from robustlab.data import load_dataset, safe_load
from robustlab.errors import DataError

# ----------------------------------------------------------------------------- opcodes


def text(value: str) -> bytes:
    """SHORT_BINUNICODE / BINUNICODE: push a str."""
    raw = value.encode()
    if len(raw) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def glob(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0-3): push module.name, named in the opcode's argument."""
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4): push module.name, both names taken from the stack."""
    return text(module) + text(name) + pickle.STACK_GLOBAL


def call(fn: bytes, *args: bytes) -> bytes:
    """fn(*args) with REDUCE."""
    return fn + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def proto(n: int, body: bytes) -> bytes:
    return pickle.PROTO + bytes([n]) + body + pickle.STOP


def mkdir_code(target: str) -> str:
    return f"__import__('os').mkdir({target!r})"


# name -> payload builder(target directory) ; every payload would create ``target``
PAYLOADS = {
    "GLOBAL os.mkdir": lambda t: proto(2, call(glob("os", "mkdir"), text(t))),
    "STACK_GLOBAL os.mkdir": lambda t: proto(4, call(stack_glob("os", "mkdir"), text(t))),
    "STACK_GLOBAL posix.mkdir": lambda t: proto(4, call(stack_glob("posix", "mkdir"), text(t))),
    # a name that is not allowed, in a module that is
    "numpy.save": lambda t: proto(2, call(glob("numpy", "save"), text(t), pickle.EMPTY_LIST)),
    # protocol 4 dotted names under allowed modules, each a real path to os or builtins
    "numpy + _pytesttester.os.mkdir": lambda t: proto(
        4, call(stack_glob("numpy", "_pytesttester.os.mkdir"), text(t))
    ),
    "numpy._core.numeric + builtins.eval": lambda t: proto(
        4, call(stack_glob("numpy._core.numeric", "builtins.eval"), text(mkdir_code(t)))
    ),
    "numpy.core.numeric + builtins.exec": lambda t: proto(
        4, call(stack_glob("numpy.core.numeric", "builtins.exec"), text(mkdir_code(t)))
    ),
    "builtins.eval": lambda t: proto(2, call(glob("builtins", "eval"), text(mkdir_code(t)))),
    "__builtin__.eval (Python 2 name)": lambda t: proto(
        2, call(glob("__builtin__", "eval"), text(mkdir_code(t)))
    ),
    "builtins.__import__ + getattr chain, nested REDUCE": lambda t: proto(
        2,
        call(
            call(  # getattr(__import__("os"), "mkdir"): a callable made by a REDUCE
                glob("builtins", "getattr"),
                call(glob("builtins", "__import__"), text("os")),
                text("mkdir"),
            ),
            text(t),
        ),
    ),
    "INST os.mkdir": lambda t: proto(1, pickle.MARK + text(t) + pickle.INST + b"os\nmkdir\n"),
    "OBJ os.mkdir": lambda t: proto(1, pickle.MARK + glob("os", "mkdir") + text(t) + pickle.OBJ),
    "NEWOBJ pathlib.Path + BUILD": lambda t: proto(
        2,
        glob("pathlib", "PosixPath")
        + text(t)
        + pickle.TUPLE1
        + pickle.NEWOBJ
        + pickle.EMPTY_DICT
        + pickle.BUILD,
    ),
}


def cifar_root(tmp_path: Path, payload: bytes) -> Path:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "test_batch").write_bytes(payload)
    return base / "test_batch"


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_a_hostile_pickle_runs_nothing_and_is_named(tmp_path, name):
    target = tmp_path / "pwned"
    path = cifar_root(tmp_path, PAYLOADS[name](str(target)))
    with pytest.raises(DataError, match="refusing to unpickle") as info:
        load_dataset("cifar10", "test", str(tmp_path))
    assert str(path) in str(info.value)
    assert not target.exists() and not Path(str(target) + ".npy").exists()
    with pytest.raises(DataError, match="refusing to unpickle"):
        safe_load(PAYLOADS[name](str(target)), where="direct")
    assert not target.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("numpy", "_pytesttester.os.mkdir"),
        ("numpy._core.numeric", "builtins.eval"),
        ("numpy", "core.multiarray._reconstruct"),  # even a path to an allowed function
        ("collections", "OrderedDict.fromkeys"),
    ],
)
def test_a_dotted_name_is_refused_as_such(module, name):
    payload = proto(4, stack_glob(module, name))
    with pytest.raises(DataError, match=rf"{module}\.{name}: a dotted attribute path"):
        safe_load(payload, where="dotted.pkl")


def test_an_extension_code_resolves_through_the_same_check(tmp_path):
    target = tmp_path / "pwned"
    code = 0xF1
    copyreg.add_extension("os", "mkdir", code)
    try:
        payload = proto(2, pickle.EXT1 + bytes([code]) + text(str(target)) + pickle.TUPLE1
                        + pickle.REDUCE)  # fmt: skip
        with pytest.raises(DataError, match=r"ext\.pkl: refusing to unpickle os\.mkdir"):
            safe_load(payload, where="ext.pkl")
    finally:
        copyreg.remove_extension("os", "mkdir", code)
    assert not target.exists()


def _real_frombuffer():
    for module in ("numpy._core.numeric", "numpy.core.numeric"):
        try:
            return importlib.import_module(module)._frombuffer
        except (ImportError, AttributeError):
            continue
    raise AssertionError("numpy has no _frombuffer")


@pytest.mark.parametrize("module", ["numpy.core.numeric", "numpy._core.numeric"])
def test_build_cannot_modify_an_allowed_numpy_function(module):
    # BUILD sets attributes on its target: aimed at the global itself it would change
    # numpy's function for the whole process (here its defaults and a marker)
    state = (
        pickle.NONE + pickle.EMPTY_DICT
        + text("__defaults__") + pickle.BININT1 + bytes([7]) + pickle.TUPLE1 + pickle.SETITEM
        + text("pwned") + pickle.NEWTRUE + pickle.SETITEM
        + pickle.TUPLE2
    )  # fmt: skip
    payload = proto(2, glob(module, "_frombuffer") + state + pickle.BUILD)
    real = _real_frombuffer()
    defaults = real.__defaults__
    try:
        safe_load(payload, where="build.pkl")
    except DataError as err:
        assert "build.pkl" in str(err)
    assert real.__defaults__ == defaults and not hasattr(real, "pwned")
    # and numpy arrays still round-trip (protocol 5 rebuilds through _frombuffer)
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.testing.assert_array_equal(safe_load(pickle.dumps(array, protocol=5)), array)


@pytest.mark.parametrize("module, name", [("numpy", "ndarray"), ("numpy", "dtype"),
                                          ("collections", "OrderedDict")])  # fmt: skip
def test_build_cannot_modify_an_allowed_class(module, name):
    state = pickle.NONE + pickle.EMPTY_DICT + text("pwned") + pickle.NEWTRUE + pickle.SETITEM
    payload = proto(2, glob(module, name) + state + pickle.TUPLE2 + pickle.BUILD)
    with pytest.raises(DataError, match="cls.pkl: not a valid pickle"):
        safe_load(payload, where="cls.pkl")
    assert not hasattr(getattr(importlib.import_module(module), name), "pwned")


def test_codecs_encode_admits_latin1_only():
    payload = proto(2, call(glob("_codecs", "encode"), text("abc"), text("rot13")))
    with pytest.raises(DataError, match=r"codec\.pkl: refusing _codecs\.encode.*'rot13'"):
        safe_load(payload, where="codec.pkl")
    ok = proto(2, call(glob("_codecs", "encode"), text("\xe9t\xe9"), text("latin1")))
    assert safe_load(ok) == b"\xe9t\xe9"


def test_an_object_array_cannot_be_forged_from_raw_bytes():
    # _frombuffer(b"AAAA...", dtype("O"), (2,), "C") would turn bytes into pointers
    dtype_o = call(glob("numpy", "dtype"), text("O8"), pickle.NEWFALSE, pickle.NEWTRUE)
    payload = proto(2, call(glob("numpy.core.numeric", "_frombuffer"),
                            pickle.SHORT_BINBYTES + bytes([16]) + b"A" * 16, dtype_o,
                            pickle.BININT1 + bytes([2]) + pickle.TUPLE1, text("C")))  # fmt: skip
    with pytest.raises(DataError, match="forged.pkl: not a valid pickle"):
        safe_load(payload, where="forged.pkl")


def test_plain_containers_and_arrays_still_load():
    obj = OrderedDict(a=np.arange(6, dtype=np.uint8).reshape(2, 3), b=[1, b"x"])
    for protocol in (2, 4, 5):
        out = safe_load(pickle.dumps(obj, protocol=protocol))
        assert isinstance(out, OrderedDict) and out["b"] == [1, b"x"]
        np.testing.assert_array_equal(out["a"], obj["a"])


# ----------------------------------------------------------------------------- NPZ


class Exploit:
    """Unpickling this would create ``target`` (the pickle refers to os.mkdir)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("key", ["x", "y"])
def test_an_npz_object_array_is_refused_without_unpickling(tmp_path, key):
    target = tmp_path / "pwned"
    arrays = {"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.array([0, 1])}
    arrays[key] = np.array([Exploit(str(target)), 0], dtype=object)
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)  # saving pickles the object array; loading must not
    with pytest.raises(DataError, match=rf"array '{key}' of .*data\.npz.*allow_pickle=False"):
        load_dataset("npz", "train", str(path))
    assert not target.exists()


def test_a_pickle_named_npz_is_refused_without_unpickling(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "data.npz"
    path.write_bytes(pickle.dumps({"x": Exploit(str(target))}))
    with pytest.raises(DataError, match=r"cannot read .*data\.npz.*pickled"):
        load_dataset("npz", "train", str(path))
    assert not target.exists()
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError, match=r"one\.npz is a single \.npy array"):
        load_dataset("npz", "train", str(tmp_path / "one.npz"))

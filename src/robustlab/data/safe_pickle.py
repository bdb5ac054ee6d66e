"""A restricted unpickler for data files that are pickles (CIFAR's python version).

Unpickling runs code named by the file. This unpickler resolves only the few globals
needed to rebuild plain containers and numpy arrays, and refuses everything else, so
a malicious file raises instead of executing:

- a global must be one of the exact ``(module, name)`` pairs in :data:`_ALLOWED`; a
  dotted name (protocol 4's ``numpy`` + ``ctypeslib.os.system``) is refused outright;
- the allowed *functions* are handed out as fresh wrappers, so a ``BUILD`` opcode aimed
  at one (which sets attributes on its target) cannot modify numpy's real function for
  the rest of the process; the allowed classes are immutable C types;
- ``_codecs.encode`` (how protocol 2 stores bytes) is admitted with latin-1 only.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Callable
from typing import Any

from robustlab.errors import DataError

# (module, name) pairs a CIFAR-style pickle legitimately needs: numpy array and dtype
# reconstruction (numpy 1 and 2 module paths) and the bytes codec of protocol 2.
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes: latin-1 and nothing else."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise DataError(
            f"refusing _codecs.encode with encoding {encoding!r}: data pickles use latin1"
        )
    return text.encode("latin1", errors)


def _wrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A new function that calls ``fn``: what the pickle may modify is this copy only."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return call


def _resolve(module: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; try the new path first (no warning).
    rest = module.split("core.", 1)[1] if module.startswith(("numpy.core.", "numpy._core.")) else ""
    candidates = [f"numpy._core.{rest}", f"numpy.core.{rest}"] if rest else [module]
    for candidate in candidates:
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"cannot resolve {module}.{name} with this numpy version")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if "." in name:
            raise DataError(
                f"refusing to unpickle {module}.{name}: a dotted attribute path reaches "
                "past the allowed names"
            )
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"refusing to unpickle {module}.{name}: data pickles may hold only plain "
                "containers and numpy arrays"
            )
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        obj = _resolve(module, name)
        return obj if isinstance(obj, type) else _wrapped(obj)


def safe_load(data: bytes, *, encoding: str = "bytes", where: str = "pickle") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    Args:
        data: the pickle's bytes.
        encoding: how Python 2 strings are decoded (``"bytes"`` keeps them as bytes).
        where: the file name, for error messages.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    except Exception as err:  # any failure of a hostile or broken file is a data error
        raise DataError(f"{where}: not a valid pickle ({type(err).__name__}: {err})") from None

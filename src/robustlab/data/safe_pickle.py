"""A restricted unpickler for data files that are pickles (CIFAR's python version).

Unpickling runs code named by the file. This unpickler resolves only the few globals
needed to rebuild plain containers and numpy arrays, and refuses everything else, so
a malicious file raises instead of executing.
"""

from __future__ import annotations

import io
import pickle
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


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"refusing to unpickle {module}.{name}: data pickles may hold only plain "
                "containers and numpy arrays"
            )
        # numpy 2 moved numpy.core to numpy._core; try the new path first (no warning).
        rest = (
            module.split("core.", 1)[1]
            if module.startswith(("numpy.core.", "numpy._core."))
            else ""
        )
        candidates = [f"numpy._core.{rest}", f"numpy.core.{rest}"] if rest else [module]
        for candidate in candidates:
            try:
                return super().find_class(candidate, name)
            except (ImportError, AttributeError):
                continue
        raise DataError(f"cannot resolve {module}.{name} with this numpy version")


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
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(f"{where}: not a valid pickle ({err})") from None

"""Exceptions raised by robustlab.

Every error names the problem in its message. The classes also derive from the
built-in exception a caller would expect (``ValueError`` for bad values,
``FileNotFoundError`` for missing paths), so generic handlers keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RobustlabError(Exception):
    """Base class of all robustlab errors."""


class ConfigError(RobustlabError, ValueError):
    """A configuration key or value is invalid."""


class DataError(RobustlabError, ValueError):
    """A data set is missing, malformed or inconsistent."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or directory does not exist."""


class CheckpointError(RobustlabError, ValueError):
    """A run directory or checkpoint is missing, truncated or inconsistent."""


class UnknownNameError(RobustlabError, ValueError):
    """A name is not in a registry."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""

"""A small name -> object registry shared by models, datasets and recipes.

One registry per kind drives the factory functions, ``robustlab list`` and the
parametrised tests at once, so adding an entry is one decorator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from robustlab.errors import UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builders (classes or functions).

    Args:
        kind: what the entries are, used in error messages ("model", "dataset").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers its target under ``name`` (default: its ``__name__``)."""

        def wrap(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            return obj

        return wrap

    def get(self, name: str) -> T:
        """Return the entry called ``name``; unknown names raise with a suggestion."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)} "
                f"(available: {', '.join(sorted(self._entries))})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def summary(self, name: str) -> str:
        """First line of the entry's docstring."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Raise a clear error when ``kwargs`` holds a name ``fn`` does not accept.

    Args:
        fn: the builder that will receive the keyword arguments.
        kwargs: the keyword arguments taken from a config or a caller.
        what: how to call the builder in the message ("model 'small_cnn'").
    """
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    check_options(accepted, kwargs, what)
    check_types(_hints(fn), kwargs, what)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: no type check rather than a crash
        return {}


def check_types(hints: dict[str, Any], kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """``kwargs`` with values converted to their annotated types (``"8/255"`` -> float);
    a :class:`~robustlab.errors.ConfigError` names the first option whose value does not
    fit its annotation (int, float, bool, str, lists and unions of them)."""
    from robustlab.config import _coerce
    from robustlab.errors import ConfigError

    out = dict(kwargs)
    for key, value in kwargs.items():
        tp = hints.get(key)
        if tp is None:
            continue
        try:
            out[key] = _coerce(value, tp, f"{what} option {key!r}")
        except ConfigError as err:
            if "unsupported type" in str(err):
                continue  # callables, modules ...: left to the builder
            raise
    return out


def init_hints(cls: type, base: type) -> dict[str, Any]:
    """Type hints of the keyword options of ``cls`` and its ancestors up to ``base``."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and issubclass(klass, base):
            hints.update(_hints(klass.__init__))
    return hints


def init_options(cls: type, base: type) -> list[str]:
    """Keyword options ``cls`` accepts: its own ``__init__``'s and every ancestor's up to
    ``base`` (subclasses pass the rest on with ``**kwargs``), in MRO order, no ``self``."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or not issubclass(klass, base):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            kinds = (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            if p.kind in kinds and p.name != "self" and p.name not in names:
                names.append(p.name)
    return names


def check_options(
    accepted: Iterable[str],
    kwargs: Iterable[str],
    what: str,
    error: type[Exception] = UnknownNameError,
) -> None:
    """Raise ``error`` naming the first key of ``kwargs`` not in ``accepted``, with a suggestion."""
    accepted = list(accepted)
    for key in kwargs:
        if key not in accepted:
            raise error(
                f"{what} has no option {key!r}{did_you_mean(key, accepted)} "
                f"(options: {', '.join(accepted)})"
            )

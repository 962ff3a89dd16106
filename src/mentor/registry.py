"""A small generic registry: things users pick by name (losses, students, datasets, recipes)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Raised for an unknown or duplicate registry name; the message lists valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly instead
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """Return a ' Did you mean ...?' hint for ``name`` among ``choices`` (empty if none is close)."""
    close = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


class Registry(Generic[T]):
    """Map names to objects, with did-you-mean errors.

    >>> students = Registry("student builder")
    >>> @students.register("mlp")
    ... def build_mlp(**kw): ...
    >>> students.get("mpl")  # raises: unknown student builder 'mpl'. Did you mean 'mlp'? ...
    """

    def __init__(self, kind: str) -> None:
        """Create an empty registry; ``kind`` names its entries in error messages."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(
        self, name: str, obj: T | None = None, *, description: str | None = None
    ) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable directly or as a decorator."""

        def _add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            doc = description or (getattr(o, "__doc__", None) or "").strip().splitlines()
            self._descriptions[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return o

        if obj is not None:
            return _add(obj)
        return _add

    def get(self, name: str) -> T:
        """Return the entry called ``name`` or raise an error listing the valid names."""
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, self.names())} "
                f"Valid names: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Sorted list of registered names."""
        return sorted(self._items)

    def describe(self, name: str) -> str:
        """One-line description of an entry."""
        self.get(name)
        return self._descriptions.get(name, "")

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

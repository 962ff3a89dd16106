"""Hyperparameter value checks shared by the losses (clear errors for invalid values)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Rule = Callable[[str, Any], None]


def positive(name: str, v: Any) -> None:
    """v must be a number > 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name} must be a number > 0, got {v!r}")


def non_negative(name: str, v: Any) -> None:
    """v must be a number >= 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {v!r}")


def unit(name: str, v: Any) -> None:
    """v must be a number in [0, 1]."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


def optional_unit(name: str, v: Any) -> None:
    """v must be None or a number in [0, 1]."""
    if v is not None:
        unit(name, v)


def boolean(name: str, v: Any) -> None:
    """v must be a bool."""
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")


def positive_int(name: str, v: Any) -> None:
    """v must be an int >= 1."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def chunk(name: str, v: Any) -> None:
    """v must be None or an int >= 1."""
    if v is not None:
        positive_int(name, v)


def choice(*options: Any) -> Rule:
    """v must be one of ``options``."""

    def rule(name: str, v: Any) -> None:
        if v not in options:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {v!r}")

    return rule


def checker(**rules: Rule) -> Callable[..., None]:
    """Build a ``check(**hp)`` that applies ``rules`` to the hyperparameters present."""

    def check(**hp: Any) -> None:
        for k, rule in rules.items():
            if k in hp:
                rule(k, hp[k])

    return check

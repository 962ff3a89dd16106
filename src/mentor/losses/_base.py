"""Base class and registry for distillation losses."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from torch import nn

from mentor.registry import Registry, RegistryError, did_you_mean

F = TypeVar("F", bound=Callable[..., Any])

LOSSES: Registry[type[Loss]] = Registry("loss")


class Loss(nn.Module):
    """A distillation loss: a thin module holding hyperparameters around a pure function.

    Subclasses set ``fn`` (the functional form), ``inputs`` (``"logits"``, ``"features"``,
    ``"batch"`` or ``"ranking"``) and ``defaults`` (hyperparameter name -> default value).
    """

    fn: ClassVar[Callable[..., Any]]
    inputs: ClassVar[str] = "logits"
    defaults: ClassVar[dict[str, Any]] = {}
    extras: ClassVar[tuple[str, ...]] = ()  # per-batch inputs it takes (see register_loss)
    name: ClassVar[str] = ""

    def __init__(self, **hp: Any) -> None:
        """Validate and store hyperparameters (unknown names raise, listing the valid ones)."""
        super().__init__()
        unknown = [k for k in hp if k not in self.defaults]
        if unknown:
            k = unknown[0]
            valid = ", ".join(sorted(self.defaults)) or "(none)"
            raise ValueError(
                f"loss {self.name!r} has no hyperparameter {k!r}.{did_you_mean(k, list(self.defaults))}"
                f" Valid hyperparameters: {valid}"
            )
        self.hp: dict[str, Any] = {**self.defaults, **hp}
        type(self).check(**self.hp)
        for k, v in self.hp.items():  # e.g. a learned projector: train it with the owner
            if isinstance(v, nn.Module):
                self.add_module(k, v)

    @staticmethod
    def check(**hp: Any) -> None:
        """Validate hyperparameter values (raise ValueError); overridden per loss."""

    def forward(self, student: Any, teacher: Any, **kwargs: Any) -> Any:
        """Compute the loss; keyword arguments (labels, mask, t, ...) override stored ones."""
        return type(self).fn(student, teacher, **{**self.hp, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hp.items())


def register_loss(
    name: str,
    *,
    inputs: str = "logits",
    check: Callable[..., None] | None = None,
    extras: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """Register a functional loss under ``name``, deriving defaults from its keyword-only args.

    The function itself is returned unchanged (it stays the pure functional form); the module
    class wrapping it is in the registry and on ``fn.module``. ``check(**hp)`` (optional)
    validates hyperparameter values when the module is built. ``extras`` name keyword-only
    arguments that are per-batch inputs, not hyperparameters (e.g. ``groups``, ``rewards``):
    they get no default and are listed on the class as ``extras``, so an ``Objective`` passes
    them only to the terms that take them.
    """

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)
        defaults = {
            p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.name not in {"labels", "mask", *extras}
        }
        doc = (fn.__doc__ or "").strip()
        cls = type(
            "".join(part.title() for part in name.split("_")) + "Loss",
            (Loss,),
            {
                "fn": staticmethod(fn),
                "inputs": inputs,
                "defaults": defaults,
                "name": name,
                "extras": tuple(extras),
                "__doc__": doc,
                "__module__": fn.__module__,
                **({"check": staticmethod(check)} if check is not None else {}),
            },
        )
        LOSSES.register(name, cls, description=doc.splitlines()[0] if doc else name)
        fn.module = cls  # type: ignore[attr-defined]
        return fn

    return deco


def list_losses() -> list[str]:
    """Sorted list of registered loss names."""
    return LOSSES.names()


def get_loss(name: str, **hp: Any) -> Loss:
    """Build the loss module ``name`` with hyperparameters ``hp`` (errors list valid choices)."""
    try:
        cls = LOSSES.get(name)
    except RegistryError as e:
        raise ValueError(str(e)) from None
    return cls(**hp)

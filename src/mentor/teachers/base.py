"""The teacher-source interface and its registry.

A teacher source turns a batch into the teacher's signal (``TeacherOutput``). Each source is
one class registered by name with :func:`register_source`; the recipe picks it with
``teacher.source``. The class declares, in one place:

* ``Options``: its own recipe keys under ``teacher:`` (a pydantic model; unknown keys get
  did-you-mean errors), e.g. ``cache`` and ``cache_check`` for ``source: cache``;
* ``from_config(ctx)``: how it is built from a :class:`SourceContext` (the recipe, the data,
  the student, the teacher module built once by the assembly layer);
* ``plan_parameters(ctx)``: the teacher parameter count ``mentor plan`` uses;
* ``uses_module`` / ``cacheable``: whether it runs ``teacher.builder``/``teacher.path`` and
  whether ``mentor cache`` can write its signal to a store.

Adding a source is one new module in ``mentor/teachers/`` (it is imported automatically) plus
its tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mentor.registry import Registry


@dataclass
class TeacherOutput:
    """The teacher's signal for one batch: logits (dense or sparse) and tapped features."""

    logits: Any = None
    features: dict[str, Any] = field(default_factory=dict)


class NoOptions(BaseModel):
    """A source without keys of its own."""

    model_config = ConfigDict(extra="forbid")


class SourceContext(Protocol):
    """What the assembly layer hands a source's ``from_config`` (see ``mentor.assembly``)."""

    cfg: Any  # the RunConfig
    taps: list[str]  # teacher feature taps the objective needs

    @property
    def data(self) -> Any:
        """The run's DataBundle (built once, with the teacher's tokenizer)."""

    @property
    def student(self) -> nn.Module | None:
        """The student module (EMA teachers copy it)."""

    def module(self, tc: Any = None, *, architecture_only: bool = False) -> nn.Module:
        """The teacher module of ``tc`` (default ``cfg.teacher``): loaded or fitted, once
        (``architecture_only``: built without fitting, for estimates)."""

    def expected_provenance(self) -> dict[str, Any]:
        """What a teacher cache must match to train this recipe."""

    def known_outputs(self, tc: Any = None) -> dict[int, Tensor] | None:
        """Outputs of the teacher module already computed per example id (or None)."""


class TeacherSource:
    """Base interface. Subclasses implement ``__call__``; the hooks default to no-ops."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    uses_module: ClassVar[bool] = False  # runs teacher.builder / teacher.path
    cacheable: ClassVar[bool] = False  # `mentor cache` can store its signal
    taps: list[str]

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """Teacher signal for ``batch``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ registry hooks
    @classmethod
    def validate_options(cls, raw: Mapping[str, Any], teacher_config: type[BaseModel]) -> Any:
        """Validate this source's keys of ``teacher:`` (``teacher_config`` for nested ones)."""
        return cls.Options.model_validate(dict(raw))

    @classmethod
    def from_config(cls, ctx: SourceContext) -> TeacherSource:
        """Build the source for a recipe."""
        raise NotImplementedError(f"teacher source {cls.name!r} cannot be built from a recipe")

    @classmethod
    def plan_parameters(cls, ctx: SourceContext) -> int | None:
        """Teacher parameters for ``mentor plan`` (None when unknown)."""
        tc = ctx.cfg.teacher
        if cls.uses_module and (tc.builder or tc.path):
            return sum(p.numel() for p in ctx.module(architecture_only=True).parameters())
        return None

    # ------------------------------------------------------------------ engine hooks
    def to(self, device: torch.device | str) -> TeacherSource:
        """Move to ``device`` (no-op for stores)."""
        return self

    def after_step(self, student: nn.Module) -> None:
        """Called after every optimizer step with the (unwrapped) student."""

    def state_dict(self) -> dict[str, Tensor]:
        """Trainable-state to checkpoint (only EMA teachers have one)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what ``state_dict`` returned."""


SOURCES: Registry[type[TeacherSource]] = Registry("teacher source")


def register_source(name: str) -> Any:
    """Class decorator: register a :class:`TeacherSource` under ``name`` (its ``name``)."""

    def deco(cls: type[TeacherSource]) -> type[TeacherSource]:
        cls.name = name
        SOURCES.register(name, cls)
        return cls

    return deco


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients (teachers are never trained by the engine)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module

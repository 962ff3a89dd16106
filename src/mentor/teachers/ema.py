"""``source: ema``: an exponential moving average of the student (self-distillation)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mentor.teachers.base import SourceContext, register_source
from mentor.teachers.online import OnlineTeacher


class EMAOptions(BaseModel):
    """``teacher.ema_decay``: weight of the old average at each step."""

    model_config = ConfigDict(extra="forbid")
    ema_decay: float = Field(0.999, gt=0, lt=1)


@register_source("ema")
class EMATeacher(OnlineTeacher):
    """Exponential moving average of the student as the teacher (momentum self-distillation).

    ``θ_T ← d·θ_T + (1−d)·θ_S`` after every optimizer step (buffers are copied). Cf. Tarvainen &
    Valpola, "Mean teachers are better role models", 2017; Caron et al., "Emerging Properties in
    Self-Supervised Vision Transformers" (DINO), 2021.
    """

    def __init__(
        self, student: nn.Module, *, decay: float = 0.999, taps: Sequence[str] = ()
    ) -> None:
        """Start from a frozen copy of ``student``."""
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        super().__init__(copy.deepcopy(student), taps=taps)
        self.decay = decay

    Options = EMAOptions
    uses_module = False
    cacheable = False

    @classmethod
    def from_config(cls, ctx: SourceContext) -> EMATeacher:
        """A moving average of the run's student."""
        if ctx.student is None:
            raise ValueError("teacher.source=ema needs the student")
        return cls(ctx.student, decay=ctx.cfg.teacher.options.ema_decay, taps=ctx.taps)

    @classmethod
    def plan_parameters(cls, ctx: SourceContext) -> int | None:
        """As many as the student."""
        return sum(p.numel() for p in ctx.student.parameters()) if ctx.student else None

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        """Move the average towards the student's current weights."""
        s_params = dict(student.named_parameters())
        for name, p in self.module.named_parameters():
            p.mul_(self.decay).add_(s_params[name].detach(), alpha=1 - self.decay)
        s_bufs = dict(student.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(s_bufs[name])

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the averaged weights."""
        self.module.load_state_dict(dict(state))

"""``source: ensemble``: several teachers combined into one signal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mentor.teachers.base import SourceContext, TeacherOutput, TeacherSource, register_source
from mentor.teachers.online import OnlineTeacher


class EnsembleOptions(BaseModel):
    """``teacher.members`` (each a teacher section), how they are combined and weighted."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    members: list[Any] = Field(default_factory=list)
    aggregate: Literal["mean_probs", "mean_logits", "normalized_scores"] = "mean_probs"
    weights: list[float] | None = None


@register_source("ensemble")
class EnsembleTeacher(TeacherSource):
    """Combine several teachers into one signal.

    ``aggregate``: ``mean_probs`` -> log of the weighted mean of probabilities (returned as
    logits; softmax recovers the mixture), ``mean_logits`` -> weighted mean of logits,
    ``normalized_scores`` -> weighted mean of per-teacher standardised scores (each teacher's
    row z-scored first, so teachers with different score scales count equally; cf. Hofstätter
    et al., "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
    Distillation", 2020). Weights default to uniform and are normalised to sum to 1.
    """

    def __init__(
        self,
        teachers: Sequence[TeacherSource],
        *,
        aggregate: str = "mean_probs",
        weights: Sequence[float] | None = None,
    ) -> None:
        """Check the aggregation and weights."""
        if len(teachers) < 1:
            raise ValueError("an ensemble needs at least one teacher")
        if aggregate not in ("mean_probs", "mean_logits", "normalized_scores"):
            raise ValueError(
                f"aggregate={aggregate!r}: choose mean_probs, mean_logits or normalized_scores"
            )
        w = torch.tensor(list(weights) if weights is not None else [1.0] * len(teachers))
        if len(w) != len(teachers) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("ensemble weights must be one non-negative number per teacher")
        self.teachers = list(teachers)
        self.aggregate = aggregate
        self.weights = (w / w.sum()).tolist()
        self.taps = []

    Options = EnsembleOptions
    cacheable = False

    @classmethod
    def validate_options(cls, raw: Mapping[str, Any], teacher_config: type[BaseModel]) -> Any:
        """Each member is validated as a full ``teacher:`` section; at least two of them."""
        o = EnsembleOptions.model_validate(dict(raw))
        o.members = validate_members(o.members, teacher_config, "ensemble")
        if o.weights is not None and len(o.weights) != len(o.members):
            raise ValueError(
                f"teacher.weights has {len(o.weights)} entries for {len(o.members)} members"
            )
        return o

    @classmethod
    def from_config(cls, ctx: SourceContext) -> EnsembleTeacher:
        """Every member's module (each built or fitted once), run online."""
        o = ctx.cfg.teacher.options
        return cls(online_members(ctx, o.members), aggregate=o.aggregate, weights=o.weights)

    @classmethod
    def plan_parameters(cls, ctx: SourceContext) -> int | None:
        """The members' parameters together."""
        return members_parameters(ctx, ctx.cfg.teacher.options.members)

    def to(self, device: torch.device | str) -> EnsembleTeacher:
        """Move every member."""
        for t in self.teachers:
            t.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """Aggregate the members' dense logits."""
        outs = [t(batch).logits for t in self.teachers]
        for o in outs:
            if not isinstance(o, Tensor):
                raise TypeError(
                    "ensembles combine dense logits; sparse cached members are not supported"
                )
        zs = [o.float() for o in outs]
        if self.aggregate == "mean_logits":
            agg = sum(w * z for w, z in zip(self.weights, zs))
        elif self.aggregate == "normalized_scores":
            agg = sum(
                w * (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
                for w, z in zip(self.weights, zs)
            )
        else:
            logp = torch.stack([torch.log_softmax(z, -1) for z in zs])
            logw = torch.tensor(self.weights, dtype=logp.dtype, device=logp.device).log()
            agg = torch.logsumexp(logp + logw.view(-1, *([1] * (logp.dim() - 1))), dim=0)
        return TeacherOutput(logits=agg)


# ----------------------------------------------------------------------------- members
# shared by every source made of several teachers (``ensemble``, ``routed``)


def validate_members(members: Sequence[Any], teacher_config: type[BaseModel], source: str) -> list:
    """``teacher.members`` as full ``teacher:`` sections (each validated); at least two."""
    if len(members) < 2:
        raise ValueError(
            f"teacher.source={source} needs at least two teacher.members (got {len(members)}); "
            "with one teacher use teacher.source=online"
        )
    return [
        m if isinstance(m, teacher_config) else teacher_config.model_validate(m) for m in members
    ]


def online_members(ctx: SourceContext, members: Sequence[Any]) -> list[OnlineTeacher]:
    """Every member's module (each built or fitted once by the assembly), run online."""
    return [OnlineTeacher(ctx.module(m), precision=m.precision) for m in members]


def members_parameters(ctx: SourceContext, members: Sequence[Any]) -> int:
    """The members' parameters together (``mentor plan``)."""
    mods = [ctx.module(m, architecture_only=True) for m in members]
    return sum(p.numel() for m in mods for p in m.parameters())

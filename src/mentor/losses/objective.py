"""Weighted sums of named loss terms, as written in a recipe's ``objective`` section."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mentor.losses._base import LOSSES, get_loss

# Keys of a term spec that are not loss hyperparameters.
TERM_KEYS = ("weight", "loss", "student", "teacher")


class Objective(nn.Module):
    """Named loss terms with explicit weights.

    ``Objective({"kd": {"weight": 0.9, "temperature": 4}, "ce": {"weight": 0.1}})`` returns,
    when called, ``{"kd": ..., "ce": ..., "loss": 0.9*kd + 0.1*ce}``. A term's loss is the
    term name unless ``loss:`` names another (so one loss can appear twice). Feature terms
    name the taps they compare with ``student:`` and ``teacher:``.
    """

    def __init__(self, spec: Mapping[str, Mapping[str, Any]]) -> None:
        """Build each term's loss module; unknown losses or hyperparameters raise."""
        super().__init__()
        if not spec:
            raise ValueError("objective is empty: give at least one term, e.g. {'kd': {'weight': 1}}")
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.taps: dict[str, tuple[str, str]] = {}
        for term, raw in spec.items():
            raw = dict(raw or {})
            loss_name = raw.pop("loss", term)
            self.weights[term] = float(raw.pop("weight", 1.0))
            s_tap, t_tap = raw.pop("student", None), raw.pop("teacher", None)
            try:
                self.terms[term] = get_loss(loss_name, **raw)
            except ValueError as e:
                raise ValueError(f"objective.{term}: {e}") from None
            if self.terms[term].inputs != "logits":
                if not (s_tap and t_tap):
                    raise ValueError(
                        f"objective.{term}: loss {loss_name!r} compares features; name the taps "
                        f"with student: <module path> and teacher: <module path>"
                    )
                self.taps[term] = (s_tap, t_tap)

    def forward(
        self,
        student_logits: Tensor | None = None,
        teacher: Any = None,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        student_features: Mapping[str, Any] | None = None,
        teacher_features: Mapping[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Compute every term and their weighted sum under ``"loss"``."""
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for term, loss in self.terms.items():
            if term in self.taps:
                s_tap, t_tap = self.taps[term]
                value = loss(student_features[s_tap], teacher_features[t_tap], mask=mask)
            else:
                value = loss(student_logits, teacher, labels=labels, mask=mask)
            out[term] = value
            w = self.weights[term]
            total = w * value if total is None else total + w * value
        assert total is not None
        out["loss"] = total
        return out

    def after_step(self, step: int, total_steps: int, values: Mapping[str, float]) -> None:
        """Hook called after each optimizer step (stateful schedules such as TAID use it)."""


def describe_losses() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered loss."""
    return [(n, LOSSES.describe(n)) for n in LOSSES.names()]


__all__ = ["Objective", "describe_losses", "torch"]

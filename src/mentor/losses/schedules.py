"""Learning-rate schedules and linear ramps of loss weights / hyperparameters."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from mentor.registry import did_you_mean


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base LR at step ``s``: linear warm-up then constant/linear/cosine."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def check_schedules(schedules: Mapping[str, Mapping[str, Any]], objective: Any) -> None:
    """Fail at set-up if a schedule names a term or hyperparameter the objective lacks."""
    for term, ramps in schedules.items():
        if term not in objective.terms:
            terms = list(objective.terms)
            raise ValueError(
                f"train.schedules.{term}: no objective term {term!r}.{did_you_mean(term, terms)} "
                f"Terms: {', '.join(terms)}"
            )
        valid = ["weight", *objective.terms[term].hp]
        for name in ramps:
            if name not in valid:
                raise ValueError(
                    f"train.schedules.{term}.{name}: term {term!r} has no {name!r}."
                    f"{did_you_mean(name, valid)} Valid: {', '.join(valid)}"
                )


def apply_schedules(schedules: Mapping[str, Mapping[str, Any]], objective: Any, step: int) -> None:
    """Set every scheduled weight/hyperparameter to its value at ``step`` (linear ramp).

    ``schedules = {"dkd": {"weight": ScheduleConfig(start=0, end=1, steps=200)}}`` ramps the
    DKD weight from 0 to 1 over 200 steps (mdistiller's warm-up), then holds it.
    """
    for term, ramps in schedules.items():
        for name, s in ramps.items():
            value = s.start + (s.end - s.start) * min(1.0, step / s.steps)
            if name == "weight":
                objective.weights[term] = value
            else:
                objective.terms[term].hp[name] = value

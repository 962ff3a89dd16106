"""The adaptive interpolation schedule of TAID (Shing et al., ICLR 2025)."""

from __future__ import annotations

import math

from mentor.losses import _checks as C


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAIDScheduler:
    """Adaptive schedule of TAID's interpolation parameter ``t`` (see METHODS-losses.md).

    Paper: Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025. State ``t = t_start``, ``prev = +inf``,
    ``m = 0``. After each optimizer step call ``update(loss, step, total_steps)`` with the
    detached ``taid`` value of that step, the number of optimizer steps completed before it
    (0-based) and the total number of steps:
    ``δ = (prev − ℓ)/(prev + 1e-15)``, ``m ← β m + (1−β) δ``, ``Δ = α·sigmoid(m)·(1 − t)``,
    ``t ← min(t_end, max(t_lin, t + Δ))`` with ``t_lin = t_start + (t_end − t_start)·g/G``;
    the first call only records ``prev``. ``disable_adaptive=True`` gives ``t ← t_lin``.
    Defaults t_start 0.4, t_end 1.0, alpha 5e-4, beta 0.99.
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        disable_adaptive: bool = False,
    ) -> None:
        """Validate the schedule's hyperparameters and reset its state."""
        if not 0 <= t_start < 1:
            raise ValueError(f"TAID t_start must be in [0, 1), got {t_start!r}")
        if not 0 < t_end <= 1:
            raise ValueError(f"TAID t_end must be in (0, 1], got {t_end!r}")
        C.unit("TAID alpha", alpha)
        C.unit("TAID beta", beta)
        C.boolean("TAID disable_adaptive", disable_adaptive)
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.alpha, self.beta = float(alpha), float(beta)
        self.disable_adaptive = disable_adaptive
        self.t = self.t_start
        self.prev = math.inf
        self.m = 0.0

    def update(self, loss: float, step: int, total_steps: int) -> float:
        """Advance the schedule after one optimizer step; returns the new ``t``."""
        loss = float(loss)
        if math.isinf(self.prev):
            self.prev = loss
            return self.t
        delta = (self.prev - loss) / (self.prev + 1e-15)
        self.m = self.beta * self.m + (1 - self.beta) * delta
        t_lin = self.t_start + (self.t_end - self.t_start) * step / max(total_steps, 1)
        if self.disable_adaptive:
            self.t = t_lin
        else:
            step_up = self.alpha * _sigmoid(self.m) * (1 - self.t)
            self.t = min(self.t_end, max(t_lin, self.t + step_up))
        self.prev = loss
        return self.t

    def state_dict(self) -> dict[str, float]:
        """Serializable state (for checkpoints)."""
        return {"t": self.t, "prev": self.prev, "m": self.m}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.t, self.prev, self.m = float(state["t"]), float(state["prev"]), float(state["m"])

    def __repr__(self) -> str:
        return f"TAIDScheduler(t={self.t:.6f}, t_start={self.t_start}, t_end={self.t_end})"

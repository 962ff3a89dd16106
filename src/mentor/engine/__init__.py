"""The distillation engine: one loop for every teacher mode."""

from mentor.engine.loop import Distiller, DistillModule, count_positions

__all__ = ["DistillModule", "Distiller", "count_positions"]

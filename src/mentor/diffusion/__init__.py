"""Generative (diffusion) distillation: schedules, samplers, denoisers, data and metrics.

The calling convention everywhere is ``denoiser(x_t, t) -> prediction`` with ``t`` a long
``[B]`` tensor of discrete timesteps of a :class:`VPSchedule` (``-1`` = clean data), and the
prediction what ``schedule.target`` returns for its ``prediction_type``. Submodules import
diffusers lazily, so ``import mentor.diffusion`` is cheap.
"""

from mentor.diffusion.schedules import PREDICTION_TYPES, VPSchedule

__all__ = ["PREDICTION_TYPES", "VPSchedule"]

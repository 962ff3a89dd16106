"""Distillation objectives: every loss of the spec as a pure function plus a thin module."""

from mentor.losses import logit  # noqa: F401  (registers the logit losses)
from mentor.losses._base import LOSSES, Loss, get_loss, list_losses, register_loss
from mentor.losses.logit import ce, kd
from mentor.losses.objective import Objective, describe_losses

__all__ = [
    "LOSSES",
    "Loss",
    "Objective",
    "ce",
    "describe_losses",
    "get_loss",
    "kd",
    "list_losses",
    "register_loss",
]

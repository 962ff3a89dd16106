"""mentor: knowledge distillation toolkit — turn a large teacher into a small, fast student."""

from mentor._version import __version__
from mentor.assembly import distill, evaluate_run, fit_on_labels, load_run
from mentor.config import ConfigError, RunConfig, load_config
from mentor.engine import Distiller
from mentor.losses import Objective, get_loss, list_losses
from mentor.registry import Registry

__all__ = [
    "ConfigError",
    "Distiller",
    "Objective",
    "Registry",
    "RunConfig",
    "__version__",
    "distill",
    "evaluate_run",
    "fit_on_labels",
    "get_loss",
    "list_losses",
    "load_config",
    "load_run",
]

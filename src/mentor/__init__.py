"""mentor: knowledge distillation toolkit — turn a large teacher into a small, fast student."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mentor")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from mentor.assembly import distill  # noqa: E402
from mentor.config import ConfigError, RunConfig, load_config  # noqa: E402
from mentor.engine import Distiller  # noqa: E402
from mentor.losses import Objective, get_loss, list_losses  # noqa: E402
from mentor.registry import Registry  # noqa: E402

__all__ = [
    "ConfigError",
    "Distiller",
    "Objective",
    "Registry",
    "RunConfig",
    "__version__",
    "distill",
    "get_loss",
    "list_losses",
    "load_config",
]

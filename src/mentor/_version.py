"""The installed package version (a leaf module, importable from any layer)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mentor")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

"""Named feature taps: forward hooks on module paths that capture outputs for feature losses."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn


def _split(path: str) -> tuple[str, int | None]:
    """``"layers.1:0"`` -> (``"layers.1"``, 0): the suffix picks an element of a tuple output."""
    if ":" in path:
        mod, idx = path.rsplit(":", 1)
        if idx.isdigit():
            return mod, int(idx)
    return path, None


class FeatureTaps:
    """Capture the outputs of modules named by path (``"encoder.layer.1"``, ``"3"``).

    A ``:i`` suffix selects element ``i`` of a tuple output (e.g. attention weights); with no
    suffix a tuple output yields its first element. Bad paths fail at construction and list
    the closest valid paths.
    """

    def __init__(self, model: nn.Module, paths: list[str], *, role: str = "model") -> None:
        """Register hooks on ``model`` for every path (validated now, not at the first step)."""
        self.captured: dict[str, Any] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for path in dict.fromkeys(paths):
            name, idx = _split(path)
            if name not in modules:
                valid = [n for n in modules if n]
                close = difflib.get_close_matches(name, valid, n=5, cutoff=0.3)
                shown = close or valid[:20]
                raise ValueError(
                    f"{role} has no module {name!r} to tap. "
                    f"{'Closest' if close else 'Some'} valid paths: {', '.join(shown)}"
                    f" ({len(valid)} modules; list them with model.named_modules())"
                )
            self._handles.append(modules[name].register_forward_hook(self._hook(path, idx)))

    def _hook(self, path: str, idx: int | None) -> Any:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, (tuple, list)):
                out = out[idx or 0]
            elif idx not in (None, 0):
                raise ValueError(f"tap {path!r}: module output is not a tuple")
            elif hasattr(out, "last_hidden_state") and idx is None:
                out = out.last_hidden_state
            self.captured[path] = out

        return hook

    def pop(self) -> dict[str, Any]:
        """Return and clear what the last forward pass captured."""
        out, self.captured = self.captured, {}
        return out

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

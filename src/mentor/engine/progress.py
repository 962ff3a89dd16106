"""A rich progress bar showing step, ETA and the named loss terms."""

from __future__ import annotations

from collections.abc import Mapping

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress


class Progress:
    """Training progress (disabled on non-main processes or with ``train.progress=false``)."""

    def __init__(
        self, total: int, *, enabled: bool = True, initial: int = 0, label: str = "distil"
    ) -> None:
        """Start the bar at ``initial`` of ``total`` steps."""
        self._bar = None
        if not enabled:
            return
        self._bar = _RichProgress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[terms]}"),
            transient=False,
        )
        self._task = self._bar.add_task(label, total=total, completed=initial, terms="")
        self._bar.start()

    def update(self, step: int, terms: Mapping[str, float]) -> None:
        """Advance to ``step`` and show the latest values of the loss terms."""
        if self._bar is None:
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in terms.items())
        self._bar.update(self._task, completed=step, terms=text)

    def close(self) -> None:
        """Stop drawing."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

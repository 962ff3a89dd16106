"""Progress display shared by every long step (teacher fit, training, cache writing,
evaluation, latency runs): a rich bar (count, ETA, named values) on a terminal, plain periodic
lines when output goes to a log file or CI, so no step is silent for more than ~10 s."""

from __future__ import annotations

import time
from collections.abc import Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress

LOG_EVERY_S = 10.0


class Progress:
    """Progress of ``total`` units of work (disabled on non-main processes, or with
    ``enabled=False``, e.g. ``train.progress=false``)."""

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        initial: int = 0,
        label: str = "distil",
        unit: str = "",
    ) -> None:
        """Start at ``initial`` of ``total`` units (``unit`` names them in plain lines)."""
        self._bar = None
        self._plain = False
        self.total, self.label, self.initial = max(int(total), 1), label, initial
        self.unit = f" {unit}" if unit else ""
        if not enabled:
            return
        console = Console(stderr=True)
        if not console.is_terminal:
            self._plain, self._t0, self._last = True, time.perf_counter(), 0.0
            self._console = console
            return
        self._bar = _RichProgress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[terms]}"),
            console=console,
            transient=False,
        )
        self._task = self._bar.add_task(label, total=total, completed=initial, terms="")
        self._bar.start()

    def update(self, step: int, terms: Mapping[str, float]) -> None:
        """Advance to ``step`` and show the latest values of the loss terms."""
        text = " ".join(f"{k}={v:.4g}" for k, v in terms.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, terms=text)
        elif self._plain:
            now = time.perf_counter() - self._t0
            if now - self._last >= LOG_EVERY_S or step >= self.total:
                self._last = now
                done = max(step - self.initial, 1)
                eta = now / done * (self.total - step)
                self._console.print(
                    f"{self.label} {step}/{self.total}{self.unit} ({100 * step / self.total:.0f}%) "
                    f"elapsed {now:.0f}s eta {eta:.0f}s {text}",
                    highlight=False,
                    soft_wrap=True,
                )

    def close(self) -> None:
        """Stop drawing."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._plain = False

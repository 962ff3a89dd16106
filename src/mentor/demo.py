"""``mentor demo``: teacher, a student trained without the teacher, the distilled student,
then evaluation and a report — end to end on packaged data."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from mentor._console import console
from mentor.config import load_config
from mentor.eval.run_eval import evaluate_run
from mentor.report.build import build_report, summary_rows
from mentor.run import distill

SMOKE = ["train.max_steps=4", "eval.every=2", "train.log_every=2"]


def classifier_demo(
    recipe: str, out: str, smoke: bool = False, extra: list[str] | None = None
) -> dict[str, Any]:
    """Distil ``recipe``; train the same student on labels only; evaluate both; report."""
    t0 = time.perf_counter()
    common = ["output.overwrite=true", *(SMOKE if smoke else []), *(extra or [])]
    cfg = load_config(recipe, [f"output.dir={out}/distilled", *common])
    console.rule(f"[bold]mentor demo: {cfg.name}[/] — 1/4 teacher and distilled student")
    kd = distill(cfg)
    console.rule("2/4 the same student trained without the teacher (same steps)")
    base_cfg = load_config(
        recipe, [f"output.dir={out}/no_kd", "objective={ce: {weight: 1.0}}", *common]
    )
    base = distill(base_cfg, quiet=True)
    console.rule("3/4 evaluation: quality, agreement, calibration, size, latency")
    ev = evaluate_run(kd.run_dir, baseline=base.run_dir)
    console.rule("4/4 report")
    report = build_report(kd.run_dir)
    header, rows = summary_rows(ev)
    table = Table(title=f"{cfg.name}: held-out results ({ev['examples']:,} examples)")
    for col in header:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    m = ev["machine"]
    console.print(
        f"latency/throughput measured on {m['cpu']} ({m['torch_threads']} threads, "
        f"{m['dtype']}, batch 1 / {_tp_batch(ev)}); seed {ev['seed']}"
    )
    console.print(f"report: {report.resolve()}")
    console.print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return ev


def _tp_batch(ev: dict[str, Any]) -> Any:
    for m in ev["models"].values():
        if "cost" in m:
            return m["cost"]["throughput_batch"]
    return "?"


DEMOS: dict[str, tuple[Callable[[str, bool], dict[str, Any]], str]] = {
    "digits": (
        lambda out, smoke: classifier_demo("digits", out, smoke),
        "scikit-learn digits: MLP teacher -> 16-unit MLP student with Hinton KD (~30 s)",
    ),
}
DEFAULT_DEMO = "digits"


def run_demo(
    name: str | None = None, *, out: str = "runs/demo", smoke: bool = False
) -> dict[str, Any]:
    """Run the demo called ``name`` (default: the main demo)."""
    name = name or DEFAULT_DEMO
    if name not in DEMOS:
        raise ValueError(
            f"unknown demo {name!r}; available: {', '.join(DEMOS)} (mentor demo --list)"
        )
    Path(out).mkdir(parents=True, exist_ok=True)
    return DEMOS[name][0](out, smoke)

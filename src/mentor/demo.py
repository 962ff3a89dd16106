"""``mentor demo``: teacher, a student trained without the teacher, and the distilled student."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mentor.config import load_config
from mentor.data import build_data
from mentor.eval.metrics import evaluate_classifier
from mentor.run import distill
from mentor.students.builders import count_parameters

console = Console()


def _classifier_demo(recipe: str, out: str, smoke: bool) -> dict[str, Any]:
    """Distil ``recipe`` and train the same student on labels only; print a comparison."""
    t0 = time.perf_counter()
    extra = ["train.max_steps=5", "teacher.fit.epochs=1", "eval.every=5"] if smoke else []
    common = ["output.overwrite=true", *extra]
    cfg = load_config(recipe, [f"output.dir={out}/distilled", *common])
    console.rule(f"[bold]mentor demo: {cfg.name}[/] — 1/2 distilled student")
    kd = distill(cfg)
    base_cfg = load_config(
        recipe, [f"output.dir={out}/no_kd", "objective={ce: {weight: 1.0}}", *common]
    )
    console.rule("2/2 student trained without the teacher (same steps)")
    base = distill(base_cfg, quiet=True)
    bundle = build_data(
        cfg.data.source, cfg.data.params, cfg.data.val_fraction, cfg.data.split_seed
    )
    teacher = kd.teacher
    rows = {
        "teacher": (teacher, evaluate_classifier(teacher, bundle.val, teacher)),
        "student without KD": (
            base.student,
            evaluate_classifier(base.student, bundle.val, teacher),
        ),
        "distilled student": (kd.student, evaluate_classifier(kd.student, bundle.val, teacher)),
    }
    table = Table(title=f"{cfg.name}: held-out results ({len(bundle.val)} examples)")
    for col in ("model", "accuracy", "agreement w/ teacher", "parameters"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, (model, m) in rows.items():
        table.add_row(
            name, f"{m['accuracy']:.4f}", f"{m['agreement']:.4f}", f"{count_parameters(model):,}"
        )
    console.print(table)
    console.print(f"runs: {Path(out).resolve()}  ·  wall time {time.perf_counter() - t0:.1f} s")
    return {name: m for name, (_, m) in rows.items()}


DEMOS: dict[str, tuple[Callable[[str, bool], dict[str, Any]], str]] = {
    "digits": (
        lambda out, smoke: _classifier_demo("digits", out, smoke),
        "scikit-learn digits: MLP teacher -> small MLP student with Hinton KD (~30 s)",
    ),
}
DEFAULT_DEMO = "digits"


def run_demo(
    name: str | None = None, *, out: str = "runs/demo", smoke: bool = False
) -> dict[str, Any]:
    """Run the demo called ``name`` (default: the main demo)."""
    name = name or DEFAULT_DEMO
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; available: {', '.join(DEMOS)}")
    return DEMOS[name][0](out, smoke)

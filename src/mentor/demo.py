"""``mentor demo``: teacher, a student trained without the teacher, the distilled student,
then evaluation and a report — end to end on packaged data."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from mentor._console import console
from mentor.assembly import distill, evaluate_run, final_metrics_from_eval, write_final_metrics
from mentor.config import load_config
from mentor.recipes import smoke_overrides
from mentor.report.build import build_report, summary_rows


def recipe_demo(
    recipe: str,
    out: str,
    smoke: bool = False,
    extra: list[str] | None = None,
    baseline: str | None = "{ce: {weight: 1.0}}",
) -> dict[str, Any]:
    """Distil ``recipe``; train the same student without the teacher (``baseline`` objective,
    same steps; None skips it); evaluate all; build the report; print the results table."""
    t0 = time.perf_counter()
    smoke_args = smoke_overrides(recipe) if smoke else []
    common = ["output.overwrite=true", *smoke_args, *(extra or [])]
    cfg = load_config(recipe, [f"output.dir={out}/distilled", *common])
    console.rule(f"[bold]mentor demo: {cfg.name}[/] — 1/4 teacher and distilled student")
    kd = distill(cfg, final=False)  # every model is evaluated together in step 3
    base_dir = None
    if baseline is not None:
        console.rule("2/4 the same student trained without the teacher (same steps)")
        base_cfg = load_config(
            recipe,
            [f"output.dir={out}/no_kd", f"objective={baseline}", "generation.mode=off", *common],
        )
        base_dir = distill(base_cfg, quiet=True, final=False).run_dir
    console.rule("3/4 evaluation: quality, agreement, calibration, size, latency")
    ev = evaluate_run(kd.run_dir, baseline=base_dir)
    write_final_metrics(kd.run_dir, {**kd.metrics, **final_metrics_from_eval(ev)})
    if base_dir is not None:
        write_final_metrics(base_dir, final_metrics_from_eval(ev, "student_no_kd"))
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
    "text-classifier": (
        lambda out, smoke: recipe_demo("text-classifier", out, smoke),
        "BBC News: MiniLM-L6 + linear head -> 2-layer layer-drop copy, KD + CE (~4 min)",
    ),
    "digits": (
        lambda out, smoke: recipe_demo("digits", out, smoke),
        "scikit-learn digits: MLP teacher -> 16-unit MLP student with Hinton KD (~30 s)",
    ),
    "vision": (
        lambda out, smoke: recipe_demo("vision", out, smoke),
        "Fashion-MNIST (or digits): CNN teacher -> small student",
    ),
    "lm": (
        lambda out, smoke: recipe_demo("causal-lm", out, smoke),
        "SmolLM2-135M -> 6-layer layer-drop student on BBC text, forward KL (perplexity)",
    ),
    "lm-onpolicy": (
        lambda out, smoke: recipe_demo("causal-lm-onpolicy", out, smoke),
        "SmolLM2-135M -> 6-layer student with mixed on-policy distillation (GKD, JSD) on BBC "
        "prompts; baseline: the same student fine-tuned on the reference completions",
    ),
    "embedding": (
        lambda out, smoke: recipe_demo("embedding-tfidf", out, smoke, baseline=None),
        "MiniLM sentence embeddings -> TF-IDF + MLP student (cosine, linear probe, speed)",
    ),
}
DEFAULT_DEMO = "text-classifier"


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

"""Report plots (matplotlib, Agg backend), each written to a PNG file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "teacher": "teacher",
    "student_no_kd": "student without KD",
    "student": "distilled student",
}
COLORS = {"teacher": "#4c72b0", "student_no_kd": "#999999", "student": "#dd8452"}


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_terms(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Every logged loss term over training steps."""
    train = [r for r in records if r.get("kind", "train") == "train"]
    if not train:
        return None
    skip = {"kind", "step", "epoch", "lr", "elapsed_s"}
    keys = [k for k in train[0] if k not in skip and isinstance(train[0][k], (int, float))]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [r["step"] for r in train]
    for k in keys:
        ax.plot(
            steps, [r.get(k, float("nan")) for r in train], label=k, lw=1.6 if k == "loss" else 1
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("value")
    if all(r.get(k, 1) > 0 for r in train for k in keys):
        ax.set_yscale("log")
    ax.set_title("training loss terms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def eval_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Held-out metrics logged during training."""
    ev = [r for r in records if r.get("kind") == "eval"]
    keys = [k for k in ("accuracy", "agreement", "perplexity") if ev and k in ev[0]]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for k in keys:
        ax.plot([r["step"] for r in ev], [r[k] for r in ev], marker="o", label=k)
    ax.set_xlabel("optimizer step")
    ax.set_title("held-out metrics during training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability(models: dict[str, Any], path: Path) -> Path | None:
    """Reliability diagram: accuracy vs confidence per bin, for every model."""
    curves = {n: m["reliability"] for n, m in models.items() if "reliability" in m}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], ls="--", color="k", lw=0.8, label="perfect calibration")
    for name, curve in curves.items():
        pts = [(c["confidence"], c["accuracy"]) for c in curve if c["count"]]
        ece = models[name].get("ece", float("nan"))
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            color=COLORS.get(name),
            label=f"{LABELS.get(name, name)} (ECE {ece:.3f})",
        )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("reliability (15 bins)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def quality_vs_cost(models: dict[str, Any], metric: str, path: Path) -> Path | None:
    """Task quality against parameter count and latency."""
    pts = {n: m for n, m in models.items() if metric in m and "cost" in m}
    if not pts:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    for ax, (key, label) in zip(
        axes, [("params", "parameters"), ("latency_ms", "latency, batch 1 (ms)")]
    ):
        for name, m in pts.items():
            ax.scatter(
                m["cost"][key],
                m[metric],
                s=60,
                color=COLORS.get(name),
                label=LABELS.get(name, name),
            )
            ax.annotate(LABELS.get(name, name), (m["cost"][key], m[metric]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        xs = [m["cost"][key] for m in pts.values()]
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{metric} vs size")
    axes[1].set_title(f"{metric} vs latency")
    return _save(fig, path)


def confusion(matrix: list[list[int]], class_names: list[str], path: Path) -> Path:
    """Confusion matrix of the distilled student (rows: true class, columns: predicted)."""
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    ax.imshow(matrix, cmap="Blues")
    names = class_names if len(class_names) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    hi = max(max(r) for r in matrix) or 1
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                    color="white" if v > hi / 2 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("distilled student: confusion matrix")
    return _save(fig, path)


def comparison(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """One bar per run for ``metric`` (mentor compare)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows)), 3.6))
    names = [r["run"] for r in rows]
    ax.bar(range(len(rows)), [r.get(metric, float("nan")) for r in rows], color="#dd8452")
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"students compared: {metric}")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)

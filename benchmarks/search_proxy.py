"""Do ``mentor search``'s proxies rank students like their distilled accuracy? At what cost?

For each recipe, 12 candidate students (MLP widths x depths on ``digits``; CNN channels x
head widths on ``vision`` when Fashion-MNIST is present, see
``mentor.data.images.find_fashion_mnist``) are scored by both proxies of ``mentor search``:

* **DisWOT** (Dong et al., "DisWOT: Student Architecture Search for Distillation WithOut
  Training", CVPR 2023; mentor's reconstruction, see docs/search.md): similarity of the
  untrained candidate to the teacher on 4 calibration batches, 3 initialisations;
* **short KD**: 20 steps of the recipe's distillation, then held-out accuracy;

and then **every** candidate is distilled with the recipe's own length (the ground truth).
Reported: Spearman's rank correlation of each proxy (and of DisWOT's two parts) with the final
held-out accuracy, the accuracy of each proxy's top pick vs the best candidate, and each
proxy's wall time as a fraction of training all candidates. The issue's target: Spearman
>= 0.6 at < 1% of the cost.

    .venv/bin/python -m benchmarks.search_proxy [--quick] [--only digits]

``--quick``: 4 digits candidates, short training (seconds; ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as C

NAME = "search_proxy"
TARGET_SPEARMAN, TARGET_COST = 0.6, 0.01
MLP_GRID = "student.params.hidden=[[4],[8],[16],[32],[64],[128],[4,4],[8,8],[16,16],[32,32],[64,64],[128,128]]"  # noqa: E501
CNN_GRID = [
    "student.params.channels=[[4,8],[8,16],[16,32],[32,64]]",
    "student.params.hidden=[16,32,64]",
]  # noqa: E501

FULL: dict[str, dict[str, Any]] = {
    "digits": {"over": [], "grid": [MLP_GRID], "proxy_steps": 20},
    "vision": {"over": [], "grid": CNN_GRID, "proxy_steps": 20},
}
QUICK: dict[str, dict[str, Any]] = {
    "digits": {"over": ["teacher.fit.epochs=2", "train.epochs=2"],
               "grid": ["student.params.hidden=[[4],[16],[64],[32,32]]"], "proxy_steps": 5},
}  # fmt: skip


def run_recipe(recipe: str, s: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Both proxies and the full distillation of every candidate of one recipe."""
    from mentor.search import search

    n = len(_n_candidates(s["grid"]))
    res = search(
        recipe, [*s["over"], "train.progress=false"], grid=s["grid"], proxy="both",
        proxy_steps=s["proxy_steps"], confirm=n, write=False, seeds=2 if quick else 3,
    )  # fmt: skip
    c = res["confirm"]
    rows = res["candidates"]
    best_final = max(c["final"])
    picks = {}
    for p in ("diswot", "short_kd"):
        top = max(range(len(rows)), key=lambda i: rows[i][p]["score"])
        picks[p] = {"label": rows[top]["label"], "final": rows[top]["confirmed"]["score"],
                    "regret": best_final - rows[top]["confirmed"]["score"]}  # fmt: skip
    return {
        "recipe": recipe,
        "settings": s,
        "teacher": res["teacher"],
        "candidates": [
            {
                "label": r["label"],
                "params": r["params"],
                "latency_ms": r.get("latency_ms"),
                "diswot": r["diswot"],
                "short_kd": r["short_kd"],
                "final": r["confirmed"],
            }
            for r in rows
        ],  # fmt: skip
        "spearman": c["spearman"],
        "cost": c["cost_ratio"],
        "train_all_s": c["full_seconds"],
        "best_final": best_final,
        "picks": picks,
        "seconds": res["seconds"],
    }


def _n_candidates(grid: list[str]) -> list[dict[str, Any]]:
    from mentor.search import expand_grid, parse_grid

    return expand_grid(parse_grid(grid))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the JSON, the plot and the docs section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="recipes to run (digits, vision)")
    ap.add_argument("--docs-only", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
    if a.docs_only:
        p = json.loads((C.RESULTS / f"{NAME}.json").read_text())
        publish(p)
        return p
    from mentor.data.images import find_fashion_mnist

    todo = dict(QUICK if a.quick else FULL)
    skipped = {}
    if a.only:
        skipped = {k: f"not in this measurement (--only {' '.join(a.only)})"
                   for k in todo if k not in a.only}  # fmt: skip
        todo = {k: v for k, v in todo.items() if k in a.only}
    if "vision" in todo and find_fashion_mnist() is None:
        todo.pop("vision")
        skipped["vision"] = "Fashion-MNIST not found ($FASHION_MNIST or dataset-fashion-mnist)"
    load0 = C.load_avg()
    t0 = time.perf_counter()
    recipes = {}
    for recipe, s in todo.items():
        recipes[recipe] = run_recipe(recipe, s, a.quick)
        r = recipes[recipe]
        print(f"{recipe}: spearman {r['spearman']}, cost {r['cost']}", flush=True)
    p = {"quick": a.quick, "recipes": recipes, "skipped": skipped, "machine": C.machine_info(),
         "load": C.load_record(load0, C.load_avg()), "seconds": time.perf_counter() - t0}  # fmt: skip
    publish(p)
    return p


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x >= 0.0001 else f"{100 * x:.4f}%"


def _verdict(rho: float | None, cost: float) -> str:
    if rho is None:
        return "–"
    ok_r, ok_c = rho >= TARGET_SPEARMAN, cost < TARGET_COST
    if ok_r and ok_c:
        return "met"
    miss = []
    if not ok_r:
        miss.append(f"ρ {rho - TARGET_SPEARMAN:+.2f} below 0.6")
    if not ok_c:
        miss.append(f"cost {cost / TARGET_COST:.1f}× the 1% budget")
    return "missed: " + ", ".join(miss)


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs section."""
    out = [
        "### (d) Which student: `mentor search`'s proxies vs distilled accuracy",
        "",
        "Each candidate student is scored by `mentor search`'s two proxies — DisWOT (training-"
        "free: the untrained candidate's similarity to the teacher, mentor's reconstruction of "
        "Dong et al., CVPR 2023, see docs/search.md) and short KD (a few steps of the recipe's "
        "distillation, then held-out accuracy) — and then *every* candidate is distilled with "
        "the recipe's own length: the ground truth. Spearman ρ of each proxy with the final "
        "held-out accuracy over all candidates; proxy cost = the proxy's wall time for all "
        "candidates / training all of them (the teacher's fit is shared and not counted). "
        "Target (the issue): ρ ≥ 0.6 at < 1% of the cost.",
        "",
    ]
    for name, r in p["recipes"].items():
        s = r["settings"]
        n = len(r["candidates"])
        t = r["teacher"]
        out += [
            f"**{name}** ({n} candidates: `{' '.join(s['grid'])}`; short KD {s['proxy_steps']} "
            f"steps; teacher {t['params']:,} parameters, held-out accuracy "
            f"{100 * t['quality']:.1f}%; training all candidates took {r['train_all_s']:.0f} s; "
            f"best final accuracy {100 * r['best_final']:.1f}%):",
            "",
            "| proxy | Spearman ρ | proxy time | cost (of training all) | top pick (final acc.) "
            "| target |",
            "|---|---|---|---|---|---|",
        ]
        for proxy in ("diswot", "short_kd"):
            rho, c = r["spearman"][proxy], r["cost"][proxy]
            pick = r["picks"][proxy]
            out.append(
                f"| {proxy} | {rho:+.2f} | {c['seconds']:.2f} s | {_pct(c['search'])} | "
                f"`{pick['label']}` ({100 * pick['final']:.1f}%, "
                f"{100 * pick['regret']:.1f} below the best) | {_verdict(rho, c['search'])} |"
                if rho is not None
                else f"| {proxy} | – | {c['seconds']:.2f} s | {_pct(c['search'])} | – | – |"
            )
        parts = ", ".join(
            f"{k.split('.')[1]} {v:+.2f}" for k, v in r["spearman"].items()
            if k.startswith("diswot.") and v is not None
        )  # fmt: skip
        out += ["", f"DisWOT's parts alone: ρ {parts}.", ""]
        rows = sorted(r["candidates"], key=lambda c: -c["final"]["score"])
        out += [
            "| candidate | params | DisWOT | short KD | final accuracy |",
            "|---|---|---|---|---|",
        ]
        for c in rows:
            out.append(f"| `{c['label']}` | {c['params']:,} | {c['diswot']['score']:.3f} | "
                       f"{100 * c['short_kd']['score']:.1f}% | "
                       f"{100 * c['final']['score']:.1f}% |")  # fmt: skip
        out.append("")
    for name, why in p.get("skipped", {}).items():
        out += [f"*{name}: not run — {why}.*", ""]
    if img:
        out += [f"![proxy score vs final distilled accuracy]({img})", ""]
    ld = p["load"]
    out.append(C.machine_line(p["machine"]) + C.load_span_note(ld["before"], ld["after"])
               + f" Took {p['seconds'] / 60:.1f} min.")  # fmt: skip
    return "\n".join(out)


def plot(p: dict[str, Any], path: Path) -> Path | None:
    """Each proxy's score vs the final accuracy, one row of panels per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = list(p["recipes"].items())
    if not recs:
        return None
    fig, axes = plt.subplots(len(recs), 2, figsize=(10, 3.8 * len(recs)), squeeze=False)
    for row, (name, r) in zip(axes, recs):
        final = [100 * c["final"]["score"] for c in r["candidates"]]
        sizes = [20 + 8 * c["params"] ** 0.33 for c in r["candidates"]]
        for ax, proxy in zip(row, ("diswot", "short_kd")):
            x = [c[proxy]["score"] for c in r["candidates"]]
            ax.scatter(x, final, s=sizes, alpha=0.75)
            rho = r["spearman"][proxy]
            ax.set_title(f"{name}: {proxy} (ρ = {rho:+.2f})" if rho is not None else name)
            ax.set_xlabel("DisWOT score" if proxy == "diswot" else "short-KD held-out accuracy")
            ax.set_ylabel("final distilled accuracy (%)")
    return C.save_figure(fig, path)


def publish(p: dict[str, Any]) -> None:
    """JSON, plot and the docs section."""
    C.publish(NAME, p, markdown, lambda path: plot(p, path), parent="Pruned and sparse students")


if __name__ == "__main__":
    main()

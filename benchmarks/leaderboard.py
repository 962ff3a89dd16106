"""Quality leaderboard: every logit objective on the ``vision`` and ``text-classifier`` recipes.

Per recipe the teacher is trained once (the recipe's ``teacher.fit``; mentor also keeps it in
``$MENTOR_CACHE/teachers``), saved to a folder, and its logits on the training set are computed
once; every student is then trained by mentor's ``Distiller`` from those logits (a
``CachedTeacher`` over an in-memory dict: the same signal an online teacher in eval mode gives,
as these recipes have no data augmentation), so 3 seeds x 13 rows never re-run or retrain it.
Same student initialisation rule, data, optimizer, schedule and number of steps for every row;
only the objective (with the method's published weights) and the seed change. Reported: mean
± std over seeds of held-out accuracy and expected calibration error (15 bins,
``mentor.eval.metrics.reliability``).

    .venv/bin/python -m benchmarks.leaderboard [--quick] [--recipes vision text-classifier]
    .venv/bin/python -m benchmarks.leaderboard --regime low [--fraction 0.05]

``--regime low`` is the low-data regime: each student trains on a seeded, class-stratified
``--fraction`` of the training set (a new draw per seed, the same draw for every row of a
seed) for the same number of steps as the full regime, from the same teacher (fitted on the
whole training set, as in Ben-Baruch et al., "Distilling the Knowledge in Data Pruning", 2024).
It writes ``leaderboard_low.json`` and its own section.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

# (row name, objective spec, what it is). DKD's weight warm-up is added in objective_for().
ROWS: list[tuple[str, dict[str, Any], str]] = [
    ("student (no KD)", {"ce": {"weight": 1.0}}, "CE only"),
    (
        "kd",
        {"kd": {"weight": 0.9, "temperature": 4.0}, "ce": {"weight": 0.1}},
        "0.9·KD(τ=4) + 0.1·CE (mdistiller)",
    ),
    (
        "kd + standardize",
        {"kd": {"weight": 9.0, "temperature": 2.0, "standardize": True}, "ce": {"weight": 0.1}},
        "9·KD(τ=2, z-scored logits) + 0.1·CE (Sun et al.: --base-temp 2 --kd-weight 9)",
    ),
    (
        "dkd",
        {
            "dkd": {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0},
            "ce": {"weight": 1.0},
        },
        "1·CE + DKD(α=1, β=8, τ=4), DKD weight ramped 0→1 over the first 1/12 of steps "
        "(mdistiller: 20 of 240 epochs)",
    ),
    ("forward_kl", {"forward_kl": {"weight": 1.0}}, "KL(p_T‖p_S), τ=1, no CE (GKD β=0)"),
    ("reverse_kl", {"reverse_kl": {"weight": 1.0}}, "KL(p_S‖p_T), τ=1, no CE (MiniLLM)"),
    ("jsd", {"jsd": {"weight": 1.0, "beta": 0.5}}, "generalized JSD β=0.5, τ=1, no CE (GKD)"),
    ("tvd", {"tvd": {"weight": 1.0}}, "total variation, τ=1, no CE (DistiLLM)"),
    ("skew_kl", {"skew_kl": {"weight": 1.0, "alpha": 0.1}}, "skew KL α=0.1, no CE (DistiLLM)"),
    (
        "taid",
        {"taid": {"weight": 1.0}},
        "TAID, t 0.4→1 (adaptive, α=5e-4, β=0.99), τ=1, no CE (Shing et al.)",
    ),
    (
        "bd_kd",
        {"bd_kd": {"weight": 0.9}, "ce": {"weight": 0.1}},
        "0.9·BD-KD(τ=1, boost 2) + 0.1·CE (weights: mentor's choice, as for KD)",
    ),
    ("pld", {"pld": {"weight": 1.0}}, "PLD alone (replaces CE + KD), τ=1"),
    (
        "sinkhorn",
        {"sinkhorn": {"weight": 0.9}, "ce": {"weight": 0.1}},
        "0.9·SinKD(τ=2, ε=0.1, 20 iters) + 0.1·CE (weights: mentor's choice, as for KD)",
    ),
]

# Budget per recipe: data / train overrides (and the reason), chosen for ~30 min in total on
# 2 cores with 3 seeds x 13 rows; quick mode cuts them further.
BUDGET: dict[str, dict[str, Any]] = {
    "vision": {
        "fashion": [
            "data.params.limit=20000",
            "data.params.val_limit=5000",
            "teacher.fit.epochs=3",
            "train.epochs=2",
        ],
        "digits": ["teacher.fit.epochs=30", "train.epochs=15"],
        "quick": ["data.params.limit=2000", "data.params.val_limit=1000", "train.epochs=1"],
    },
    "text-classifier": {
        "default": ["data.params.max_length=64", "train.max_steps=60"],
        "quick": ["data.params.max_length=32", "data.params.limit=400", "train.max_steps=8"],
    },
}


def objective_for(spec: dict[str, Any], total_steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The objective and the ``train.schedules`` of a row (DKD warm-up)."""
    sched: dict[str, Any] = {}
    if "dkd" in spec:
        sched = {"dkd": {"weight": {"start": 0.0, "end": 1.0, "steps": max(1, total_steps // 12)}}}
    return spec, sched


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, data: Any, collate: Any, bs: int = 64) -> dict:
    """Teacher logits of every training example, keyed by example id."""
    from mentor.models import model_outputs

    teacher.eval()
    out: dict[int, torch.Tensor] = {}
    for lo in range(0, len(data), bs):
        batch = collate([data[i] for i in range(lo, min(len(data), lo + bs))])
        logits = model_outputs(teacher, batch).float()
        for i, z in zip(batch["index"].tolist(), logits):
            out[int(i)] = z.clone()
    return out


def evaluate(model: torch.nn.Module, bundle: Any) -> dict[str, float]:
    """Held-out accuracy, cross-entropy and ECE."""
    from torch.nn import functional as F
    from torch.utils.data import default_collate

    from mentor.eval.metrics import predict, reliability

    logits, y = predict(model, bundle.val, collate=bundle.collate or default_collate)
    return {
        "accuracy": float((logits.argmax(-1) == y).float().mean()),
        "ece": float(reliability(logits, y)["ece"]),
        "ce": float(F.cross_entropy(logits, y)),
    }


def run_recipe(
    name: str, quick: bool, seeds: list[int], work: Path, fraction: float | None = None
) -> dict[str, Any]:
    """Teacher once, then every row x seed; returns per-run metrics and the set-up.

    ``fraction``: the low-data regime (students see that share of the training set).
    """
    from accelerate.utils import set_seed

    from mentor.assembly import Assembly
    from mentor.config import load_config
    from mentor.data.images import find_fashion_mnist
    from mentor.engine import Distiller
    from mentor.losses import Objective
    from mentor.students import build_model, save_model
    from mentor.teachers import CachedTeacher

    b = BUDGET[name]
    if name == "vision":
        dataset = "Fashion-MNIST" if find_fashion_mnist() else "digits (Fashion-MNIST not found)"
        over = b["quick"] if quick else b["fashion" if find_fashion_mnist() else "digits"]
    else:
        dataset = "BBC News"
        over = b["quick"] if quick else b["default"]
    base = load_config(name, [*over, "train.progress=false", "train.log_every=1000"])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asm = Assembly(base)
        bundle = asm.data
    collate = bundle.collate
    from torch.utils.data import default_collate

    collate = collate or default_collate
    teacher = asm.module()  # fit once (or from mentor's cache)
    teacher_dir = work / name / "teacher"
    save_model(teacher, teacher_dir, base.teacher.builder or "", base.teacher.params, bundle.info)
    logits = teacher_logits(teacher, bundle.train, collate)
    t_setup = time.perf_counter() - t0
    t_metrics = evaluate(teacher, bundle)
    print(f"[{name}] teacher ready in {t_setup:.0f} s: {t_metrics}", flush=True)

    runs: list[dict[str, Any]] = []
    t = base.train
    per_epoch = max(1, len(bundle.train) // t.batch_size // t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil((t.epochs or 1.0) * per_epoch))
    base_dict = base.model_dump(mode="json")
    subsets: dict[int, Any] = {}
    if fraction is not None:
        from torch.utils.data import Subset

        from mentor.data.sources import labeled_positions

        y = torch.tensor([int(bundle.train[i]["labels"]) for i in range(len(bundle.train))])
        k = max(t.batch_size * t.grad_accum, round(fraction * len(y)))
        for seed in seeds:  # one draw per seed, shared by every row
            pos = sorted(int(p) for p in labeled_positions(y, k, seed))
            subsets[seed] = Subset(bundle.train, pos)
    for row, spec, _ in ROWS:
        obj, sched = objective_for(spec, total_steps)
        for seed in seeds:
            t1 = time.perf_counter()
            raw = copy.deepcopy(base_dict)
            raw["objective"] = obj
            raw["train"].update(seed=seed, schedules=sched)
            if fraction is not None:  # the full regime's number of steps on the subset
                raw["train"].update(max_steps=total_steps, epochs=None)
            raw["output"].update(dir=str(work / name / "run"), overwrite=True)
            cfg = load_config(raw)
            set_seed(seed)
            student = build_model(
                base.student.builder, base.student.params, bundle.info, teacher, data=bundle.train
            )
            d = Distiller(
                student,
                CachedTeacher(logits),
                Objective(cfg.objective),
                subsets.get(seed, bundle.train),
                cfg,
                task=bundle.info.task,
                collate_fn=collate,
            )
            d.fit()
            m = evaluate(student, bundle)
            m.update(row=row, seed=seed, train_s=time.perf_counter() - t1)
            runs.append(m)
            print(
                f"[{name}] {row:<18} seed {seed}: acc {m['accuracy']:.4f} ece {m['ece']:.4f} "
                f"({m['train_s']:.1f} s)",
                flush=True,
            )
            del student, d
    return {
        "recipe": name,
        "dataset": dataset,
        "overrides": over,
        "teacher": t_metrics,
        "teacher_dir": str(teacher_dir),
        "teacher_setup_s": t_setup,
        "train_examples": len(bundle.train),
        "fraction": fraction,
        "student_examples": len(next(iter(subsets.values()))) if subsets else len(bundle.train),
        "val_examples": len(bundle.val),
        "steps": total_steps,
        "batch_size": base.train.batch_size,
        "lr": base.train.lr,
        "schedule": base.train.schedule,
        "student": f"{base.student.builder} {base.student.params}",
        "teacher_desc": f"{base.teacher.builder} {base.teacher.params}",
        "runs": runs,
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (over seeds) per row, in ROWS order."""
    out = []
    for row, _, desc in ROWS:
        rs = [r for r in runs if r["row"] == row]
        if not rs:
            continue
        acc, ece = [r["accuracy"] for r in rs], [r["ece"] for r in rs]
        out.append(
            {
                "row": row,
                "objective": desc,
                "acc_mean": statistics.mean(acc),
                "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "ece_mean": statistics.mean(ece),
                "ece_std": statistics.stdev(ece) if len(ece) > 1 else 0.0,
                "seeds": len(rs),
            }
        )
    return out


def findings(table: list[dict[str, Any]]) -> list[str]:
    """The paper directions (KD > no KD; DKD, standardized KD >= KD), checked on the means."""
    m = {r["row"]: r["acc_mean"] for r in table}
    s = {r["row"]: r["acc_std"] for r in table}
    out = []
    for a, b, what in [
        ("kd", "student (no KD)", "KD > no KD"),
        ("dkd", "kd", "DKD ≥ KD"),
        ("kd + standardize", "kd", "standardized KD ≥ KD"),
    ]:
        if a in m and b in m:
            diff = m[a] - m[b]
            noise = max(s[a], s[b])
            ok = diff > 0 if what.startswith("KD >") else diff >= 0
            verdict = "holds" if ok else "does not hold"
            out.append(
                f"{what}: {verdict} ({100 * diff:+.2f} points; largest seed std {100 * noise:.2f})"
            )
    return out


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Bar chart of mean accuracy with std error bars, one panel per recipe."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        t = res["table"]
        names = ["teacher"] + [r["row"] for r in t]
        means = [res["teacher"]["accuracy"]] + [r["acc_mean"] for r in t]
        stds = [0.0] + [r["acc_std"] for r in t]
        colors = ["#777777", "#bbbbbb"] + ["#4477aa"] * (len(t) - 1)
        ax.bar(
            range(len(names)),
            [100 * x for x in means],
            yerr=[100 * x for x in stds],
            capsize=3,
            color=colors[: len(names)],
        )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        lo = min(means) * 100
        ax.set_ylim(max(0.0, lo - 5), min(100.0, max(means) * 100 + 2))
        ax.set_ylabel("held-out accuracy % (mean ± std over seeds)")
        ax.set_title(f"{res['recipe']} ({res['dataset']})")
    return C.save_figure(fig, path)


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs/benchmarks.md section."""
    low = p.get("regime") == "low"
    lines = [
        "## Quality leaderboard: logit objectives"
        + (f", low-data regime ({100 * p['fraction']:g}% of the training set)" if low else ""),
        "",
    ]
    if low:
        lines += [
            f"The same rows, teacher and number of steps as the full-data leaderboard, but each "
            f"student trains on a seeded, class-stratified {100 * p['fraction']:g}% of the "
            "training set (a new draw per seed, the same draw for every row of a seed). The "
            "teacher was fitted on the whole training set — the regime of data pruning with KD "
            "(Ben-Baruch et al., 2024), where a teacher has seen more than the student can.",
            "",
        ]
    lines += [
        "Each recipe's teacher is trained once, saved (`save_model`) and its training-set logits "
        "computed once; every student is trained by the `Distiller` from those logits "
        "(`CachedTeacher` over an in-memory dict — the signal an online teacher in eval mode "
        "gives, since there is no augmentation). Every row uses the same student "
        "initialisation rule, data, optimizer, LR schedule and number of steps; only the "
        f"objective and the seed change. Seeds: {p['seeds']}. Accuracy and ECE (15 equal-width "
        "bins) on the held-out split, mean ± sample std over seeds.",
        "",
    ]
    for res in p["results"]:
        lines += [
            f"### {res['recipe']} — {res['dataset']}",
            "",
            f"Teacher `{res['teacher_desc']}`, student `{res['student']}`; "
            f"{res['train_examples']:,} training / {res['val_examples']:,} held-out examples"
            + (
                f" (students see {res['student_examples']:,} of them); "
                if res.get("fraction")
                else "; "
            )
            + f"{res['steps']} steps of batch {res['batch_size']}, lr {res['lr']:g} "
            f"({res['schedule']}). Budget overrides of the recipe: "
            f"`{' '.join(res['overrides'])}`. Teacher: accuracy "
            f"{100 * res['teacher']['accuracy']:.2f}%, ECE {res['teacher']['ece']:.4f}.",
            "",
            "| row | objective | accuracy % | ECE |",
            "|---|---|---|---|",
        ]
        for r in res["table"]:
            lines.append(
                f"| {r['row']} | {r['objective']} | {100 * r['acc_mean']:.2f} ± "
                f"{100 * r['acc_std']:.2f} | {r['ece_mean']:.4f} ± {r['ece_std']:.4f} |"
            )
        lines += ["", "Paper directions: " + "; ".join(res["findings"]) + ".", ""]
    lines += [
        "Reference (CIFAR-100, ResNet32×4 → ResNet8×4, 240 epochs): student 72.50, KD 73.33, "
        "DKD 76.32, KD + logit standardization 76.62. The budgets here are minutes on a CPU, "
        "so only the direction is comparable, and differences below the seed std are noise.",
        "",
    ]
    if img:
        lines += [f"![leaderboard]({img})", ""]
    lines.append(
        C.machine_line(p["machine"])
        + p.get("load_note", "")
        + f" Whole benchmark {p['total_s'] / 60:.1f} min. Regenerate with "
        "`.venv/bin/python -m benchmarks.leaderboard" + (" --regime low`." if low else "`.")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipes, write JSON, plot and the docs section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 1 seed, 4 rows")
    ap.add_argument(
        "--recipes", nargs="*", default=["vision", "text-classifier"], choices=list(BUDGET)
    )
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="*", default=None, help="row names to run (default: all)")
    ap.add_argument(
        "--regime", choices=["full", "low"], default="full",
        help="low: students see --fraction of the training set (same steps, same teacher)",
    )  # fmt: skip
    ap.add_argument("--fraction", type=float, default=0.05, help="the low regime's share")
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not 0 < a.fraction <= 1:
        ap.error(f"--fraction {a.fraction}: give a share in (0, 1]")
    fraction = a.fraction if a.regime == "low" else None
    global ROWS
    if a.quick:
        C.use_quick_outputs()
        a.seeds = a.seeds[:1] if a.seeds != [0, 1, 2] else [0]
        a.rows = a.rows or ["student (no KD)", "kd", "dkd", "sinkhorn"]
    if a.rows:
        ROWS = [r for r in ROWS if r[0] in a.rows]
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.recipes:
            res = run_recipe(name, a.quick, a.seeds, Path(tmp), fraction)
            res["table"] = aggregate(res["runs"])
            res["findings"] = findings(res["table"])
            results.append(res)
    payload = {
        "machine": C.machine_info(),
        "load_note": C.load_note(),
        "seeds": a.seeds,
        "quick": a.quick,
        "regime": a.regime,
        "fraction": fraction,
        "results": results,
        "total_s": time.perf_counter() - t0,
    }
    name = "leaderboard_low" if a.regime == "low" else "leaderboard"
    C.publish(name, payload, markdown, lambda path: plot(results, path))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])

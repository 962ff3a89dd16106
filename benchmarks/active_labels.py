"""LLM-labelled classifier: random vs active labelling at equal teacher calls (PGKD-style).

The recipe ``llm-labels-classifier``: SmolLM2-135M-Instruct labels BBC News topics zero-shot
(answer log-likelihood, :mod:`mentor.models.llm_labeler`) for a TF-IDF + MLP student; the
training set is an unlabelled pool and the student sees only the labeller's labels of the
examples the budget paid for (:mod:`mentor.selection`). This measures, on the held-out
articles' gold labels:

* the labeller's own accuracy (measured first, on the held-out split and on the pool);
* the student's accuracy after ``budget`` teacher calls with ``random`` selection vs the
  active selectors (``margin``, ``entropy``: the student's least certain articles go back to
  the labeller, as in Cheng et al., "PGKD: Prompt-Guided Knowledge Distillation for Text
  Classification with Large Language Models", 2024), at several budgets, 3 seeds;
* references: the student trained on the labeller's labels of the whole pool, and on the
  pool's gold labels (no teacher);
* the student's latency vs the labeller's (examples per second, batch 32, CPU).

The labeller's outputs for every article are computed once and kept under
``$MENTOR_CACHE/bench`` (keyed by the labeller's settings and the data), so every arm answers
its teacher calls from them: an arm's "teacher calls" are exactly the examples it paid for.

    .venv/bin/python -m benchmarks.active_labels [--quick] [--seeds 3]

``--quick``: the ``digits`` recipe's fitted MLP teacher as the labeller (seconds; outputs go to
``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from mentor.assembly import Assembly
from mentor.config import load_config
from mentor.engine import Distiller
from mentor.eval.cost import items_per_second
from mentor.models.assets import cache_root
from mentor.selection import Selection, heldout_accuracy
from mentor.teachers.online import OnlineTeacher

NAME = "active_labels"
SECTION = "Teacher budgets and data selection"

FULL = {
    "recipe": "llm-labels-classifier",
    "over": [],
    "budgets": [100, 200, 400, 800],
    "methods": ["random", "margin", "entropy"],
    "rounds": 4,
    "epochs_per_round": 2,
}
QUICK = {
    "recipe": "digits",
    "over": ["teacher.fit.epochs=3", "student.params.hidden=[16]"],
    "budgets": [60, 120],
    "methods": ["random", "margin"],
    "rounds": 3,
    "epochs_per_round": 2,
}


def _outputs(labeller: torch.nn.Module, data: Any, collate: Any, bs: int = 32) -> torch.Tensor:
    from mentor.models import model_outputs

    labeller.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(data), bs):
            batch = collate([data[i] for i in range(lo, min(len(data), lo + bs))])
            out.append(model_outputs(labeller, batch).float().log_softmax(-1))
            done = min(len(data), lo + bs)
            if done % (bs * 8) == 0 or done == len(data):
                print(f"  labelled {done}/{len(data)}", flush=True)
    return torch.cat(out)


def labeller_outputs(asm: Assembly, cfg: Any) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The labeller's log-probabilities for every pool and held-out example (cached)."""
    b = asm.data
    key = hashlib.sha256(
        json.dumps(
            [cfg.teacher.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
             len(b.train), len(b.val)], sort_keys=True, default=str,
        ).encode()
    ).hexdigest()[:16]  # fmt: skip
    path = cache_root().parent / "bench" / f"{NAME}-{key}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        pool, val = saved["pool"], saved["val"]
    else:
        module = asm.module()
        print(f"labelling {len(b.train)} pool + {len(b.val)} held-out examples once", flush=True)
        pool, val = _outputs(module, b.train, asm.collate), _outputs(module, b.val, asm.collate)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"pool": pool, "val": val}, path)
    ids = [int(b.train[i]["index"]) for i in range(len(b.train))]
    return dict(zip(ids, pool)), val


def _gold(data: Any) -> torch.Tensor:
    return torch.stack([torch.as_tensor(data[i]["labels"]) for i in range(len(data))])


def run_arm(asm: Assembly, cfg: Any, known: dict[int, torch.Tensor], method: str | None,
            budget: int | None, seed: int, s: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One student: ``method``/``budget`` selection (None: the gold-label reference)."""
    b = asm.data
    torch.manual_seed(seed)
    student = asm.build_student()
    c = cfg.model_copy(deep=True)
    c.train.seed = seed
    c.train.progress = False
    c.train.max_steps = None
    c.eval.every = None
    if method is None:  # gold labels, no teacher
        c.train.epochs = float(s["rounds"] * s["epochs_per_round"])
        d = Distiller(student, None, {"ce": {}}, b.train, c, task=asm.task,
                      collate_fn=asm.collate, write_run=False)  # fmt: skip
        t0 = time.perf_counter()
        d.fit()
        acc = heldout_accuracy(student, b.val, asm.collate)
        return {"accuracy": acc, "seconds": time.perf_counter() - t0}
    initial = max(1, budget // s["rounds"])
    per_round = max(1, math.ceil((budget - initial) / max(1, s["rounds"] - 1)))
    c.train.epochs = float(s["rounds"] * s["epochs_per_round"])
    c.train.batch_size = min(c.train.batch_size, initial)
    teacher = OnlineTeacher(asm.module(architecture_only=True), known=known)
    sel = Selection(method, budget, s["epochs_per_round"], teacher, b.train, asm.collate,
                    initial=initial, per_round=per_round, seed=seed, val_data=b.val)  # fmt: skip
    d = Distiller(student, teacher, asm.objective, b.train, c, task=asm.task,
                  collate_fn=asm.collate, write_run=False, selection=sel)  # fmt: skip
    t0 = time.perf_counter()
    d.fit()
    rounds = [r for r in d.history if r.get("kind") == "selection"]
    curve = [[r["teacher_calls"] - r["picked"], r["val_accuracy_before"]] for r in rounds[1:]]
    acc = sel.accuracy(student)
    return {
        "accuracy": acc,
        "teacher_calls": sel.teacher.spent,
        "curve": [*curve, [sel.teacher.spent, acc]],
        "seconds": time.perf_counter() - t0,
    }


def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every arm; write the JSON, the plot and the docs section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits + MLP labeller; results/quick/")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--docs-only", action="store_true", help="re-render docs from the JSON")
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
    if a.docs_only:
        payload = json.loads((C.RESULTS / f"{NAME}.json").read_text())
        publish(payload)
        return payload
    s = QUICK if a.quick else FULL
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t_start = time.perf_counter()
    cfg = load_config(s["recipe"], [*s["over"], "train.progress=false"])
    asm = Assembly(cfg)
    b = asm.data
    known, val_out = labeller_outputs(asm, cfg)
    gold_val, gold_pool = _gold(b.val), _gold(b.train)
    pool_pred = torch.stack([known[int(b.train[i]["index"])] for i in range(len(b.train))])
    labeller = {
        "val_accuracy": float((val_out.argmax(-1) == gold_val).float().mean()),
        "pool_accuracy": float((pool_pred.argmax(-1) == gold_pool).float().mean()),
    }
    print(f"labeller accuracy: held-out {labeller['val_accuracy']:.3f}, "
          f"pool {labeller['pool_accuracy']:.3f}", flush=True)  # fmt: skip
    seeds = list(range(a.seeds))
    arms: dict[str, dict[str, Any]] = {}
    budgets = [x for x in s["budgets"] if x < len(b.train)]
    for method in s["methods"]:
        for budget in budgets:
            runs = [run_arm(asm, cfg, known, method, budget, sd, s) for sd in seeds]
            arms[f"{method}@{budget}"] = {
                "method": method, "budget": budget, "accuracy": _ms([r["accuracy"] for r in runs]),
                "runs": runs,
            }  # fmt: skip
            print(
                f"{method:>8} @ {budget:>4}: {arms[f'{method}@{budget}']['accuracy']}", flush=True
            )
    full = [run_arm(asm, cfg, known, "random", len(b.train), sd, s) for sd in seeds]
    gold = [run_arm(asm, cfg, known, None, None, sd, s) for sd in seeds]
    refs = {
        "all_pool_teacher_labels": {"budget": len(b.train), "accuracy": _ms([r["accuracy"] for r in full])},
        "gold_labels_no_teacher": {"accuracy": _ms([r["accuracy"] for r in gold])},
    }  # fmt: skip
    torch.manual_seed(0)
    student = asm.build_student()
    lat = {
        "student_items_per_s": items_per_second(student, b.val, asm.collate, batch_size=32),
        "labeller_items_per_s": items_per_second(asm.module(), b.val, asm.collate, batch_size=32),
    }
    lat["speedup"] = lat["student_items_per_s"] / lat["labeller_items_per_s"]
    payload = {
        "settings": {
            **s,
            "seeds": seeds,
            "budgets": budgets,
            "pool": len(b.train),
            "heldout": len(b.val),
        },  # fmt: skip
        "labeller": labeller,
        "arms": arms,
        "references": refs,
        "latency": lat,
        "machine": C.machine_info(),
        "load": C.load_note(),
        "seconds": time.perf_counter() - t_start,
    }
    publish(payload)
    return payload


def _pm(d: dict[str, float]) -> str:
    return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}"


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs subsection."""
    st, arms = p["settings"], p["arms"]
    lab, lat, refs = p["labeller"], p["latency"], p["references"]
    head = "| selector | " + " | ".join(f"{b} calls" for b in st["budgets"]) + " |"
    rows = [head, "|---|" + "---|" * len(st["budgets"])]
    best_active: list[str] = []
    for m in st["methods"]:
        cells = [_pm(arms[f"{m}@{b}"]["accuracy"]) for b in st["budgets"]]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    for b in st["budgets"]:
        r = arms[f"random@{b}"]["accuracy"]["mean"]
        act = {m: arms[f"{m}@{b}"]["accuracy"]["mean"] for m in st["methods"] if m != "random"}
        if act:
            m, v = max(act.items(), key=lambda kv: kv[1])
            best_active.append(f"{b} calls: {m} {100 * (v - r):+.1f} points vs random")
    lines = [
        f"## {SECTION}",
        "",
        f"### (a) LLM-labelled classifier: random vs active labelling (`{st['recipe']}`)",
        "",
        f"Labeller accuracy (gold labels): held-out **{100 * lab['val_accuracy']:.1f}%**, pool "
        f"{100 * lab['pool_accuracy']:.1f}% ({st['pool']} pool / {st['heldout']} held-out "
        "examples). Student held-out accuracy (%, mean ± std over "
        f"{len(st['seeds'])} seeds) after the given number of teacher calls; selection every "
        f"{st['epochs_per_round']} epochs in {st['rounds']} rounds:",
        "",
        *rows,
        "",
        f"- References: the labeller's labels of the whole pool ({refs['all_pool_teacher_labels']['budget']} "
        f"calls) {_pm(refs['all_pool_teacher_labels']['accuracy'])}; the pool's gold labels, no "
        f"teacher, {_pm(refs['gold_labels_no_teacher']['accuracy'])}.",
        "- Best active selector vs random: " + "; ".join(best_active) + ".",
        f"- Latency (batch 32, CPU): student {lat['student_items_per_s']:,.0f} examples/s, "
        f"labeller {lat['labeller_items_per_s']:,.1f} examples/s: **{lat['speedup']:,.0f}×** "
        "faster.",
        "",
        C.machine_line(p["machine"]) + " " + p.get("load", ""),
    ]  # fmt: skip
    if img:
        lines += ["", f"![accuracy vs teacher calls]({img})"]
    return "\n".join(lines)


def plot(p: dict[str, Any]) -> Any:
    """Accuracy vs teacher calls per selector."""

    def draw(path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        st = p["settings"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in st["methods"]:
            xs = st["budgets"]
            ys = [100 * p["arms"][f"{m}@{b}"]["accuracy"]["mean"] for b in xs]
            es = [100 * p["arms"][f"{m}@{b}"]["accuracy"]["std"] for b in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
        ax.axhline(100 * p["labeller"]["val_accuracy"], ls="--", c="gray", label="labeller")
        ax.set_xlabel("teacher calls")
        ax.set_ylabel("student held-out accuracy (%)")
        ax.legend()
        fig_ = C.save_figure(fig, path)
        return fig_

    return draw


def publish(p: dict[str, Any]) -> None:
    """JSON, plot, docs subsection."""
    C.write_json(NAME, p)
    img_path = plot(p)(C.DOC.parent / "img" / f"{NAME}.png")
    md = markdown(p, str(img_path.relative_to(C.DOC.parent)))
    C.update_subsection(NAME, md, SECTION)
    print(md)


if __name__ == "__main__":
    main()

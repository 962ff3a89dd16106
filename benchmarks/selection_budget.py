"""Teacher budgets and few labels: every selection method vs random, and KD vs labels alone.

Two measurements on one recipe (``vision``: Fashion-MNIST, CNN teacher -> small CNN; or
``text``: BBC News, MiniLM + linear head teacher -> ``tfidf_mlp``), 3 seeds, mean ± std of
the student's held-out accuracy on the gold labels:

* **(b) accuracy vs teacher-call budget.** The teacher is fitted on the whole labelled
  training set, then the training set becomes an unlabelled pool: each selection method of
  :mod:`mentor.selection` pays the teacher for a share of the pool (2%, 5%, 10%, 25%) over 4
  rounds and the student trains on the teacher's signals of what was paid for (``kd`` + ``ce``
  on the teacher's labels; ``label_free``: ``kd`` alone). The teacher's outputs on the pool
  are computed once, so an arm's teacher calls are exactly what it paid for.
* **(c) few labels + an unlabelled pool.** ``data.params.labeled`` keeps a fraction of the
  labels (1%, 2%, 5%, 10%, 25%); the teacher is fitted on that labelled part only. Arms: the
  student on the labelled part alone (``ce``), KD on labelled part + pool (``kd`` + ``ce``
  where a label exists), and label-free KD (``kd`` alone, every example). Same optimizer steps
  for every arm of a fraction.

    .venv/bin/python -m benchmarks.selection_budget [--recipe vision|text] [--quick] [--seeds 3]

``--quick``: digits, 2 budgets, 2 fractions, 1 seed (seconds; ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
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
from mentor.selection import Selection, heldout_accuracy, method_names
from mentor.teachers.online import OnlineTeacher

NAME = "selection_budget"
SECTION = "Teacher budgets and data selection"
METHODS = ["random", "entropy", "margin", "least_confidence", "rad", "llkd", "kd3", "ddk",
           "kd_pruned", "label_free"]  # fmt: skip

SETTINGS: dict[str, dict[str, Any]] = {
    "vision": {
        "recipe": "vision",
        "over": ["data.params.limit=20000"],  # a 20k pool (the H200 run; hours on 2 CPU cores)
        "student_over": [],
        "budgets": [0.02, 0.05, 0.1, 0.25],
        "fractions": [0.01, 0.02, 0.05, 0.1, 0.25],
        "rounds": 4,
        "min_steps_per_round": 60,
        "objective": {"kd": {"weight": 0.9, "temperature": 4.0}, "ce": {"weight": 0.1}},
    },
    "text": {
        "recipe": "text-classifier",
        "over": [
            "student.builder=tfidf_mlp",
            "student.params={hidden: [64], max_features: 5000}",
            "train.batch_size=32",
            "train.lr=3.0e-3",
            "train.schedule=constant",
            "train.warmup_steps=0",
        ],  # fmt: skip
        "budgets": [0.02, 0.05, 0.1, 0.25],
        "fractions": [0.01, 0.02, 0.05, 0.1, 0.25],
        "rounds": 4,
        "min_steps_per_round": 20,
        "objective": {"kd": {"weight": 0.5, "temperature": 2.0}, "ce": {"weight": 0.5}},
    },
    "quick": {
        "recipe": "digits",
        "over": ["teacher.fit.epochs=3", "student.params.hidden=[16]"],
        "budgets": [0.1, 0.25],
        "fractions": [0.05, 0.25],
        "rounds": 3,
        "min_steps_per_round": 10,
        "objective": {"kd": {"weight": 0.9, "temperature": 4.0}, "ce": {"weight": 0.1}},
    },
}
LABEL_FREE = {"kd": {"weight": 1.0, "temperature": 4.0}}


def _ms(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _pool_outputs(module: torch.nn.Module, data: Any, collate: Any) -> dict[int, torch.Tensor]:
    from mentor.selection import outputs_of

    out = outputs_of(module, data, list(range(len(data))), collate, 256)
    return {int(data[i]["index"]): out[i] for i in range(len(data))}


_FEATURES: dict[str, torch.Tensor] = {}  # a frozen encoder's pooled features, per recipe


def _teacher_outputs(teacher: torch.nn.Module, data: Any, collate: Any,
                     key: str) -> dict[int, torch.Tensor]:  # fmt: skip
    """The fitted teacher's outputs on every training example. A frozen encoder's features are
    computed once per recipe and shared by every fit of its head (they do not change)."""
    frozen = getattr(teacher, "encoder_frozen", lambda: False)()
    if not frozen:
        return _pool_outputs(teacher, data, collate)
    if key not in _FEATURES:
        feats = []
        with torch.no_grad():
            teacher.eval()
            for lo in range(0, len(data), 64):
                b = collate([data[i] for i in range(lo, min(len(data), lo + 64))])
                feats.append(teacher.pooled(b["input_ids"], b.get("attention_mask")).float())
        _FEATURES[key] = torch.cat(feats)
    with torch.no_grad():
        out = teacher.head(_FEATURES[key]).float()
    return {int(data[i]["index"]): out[i] for i in range(len(data))}


def _train_cfg(cfg: Any, seed: int, steps: int, batch: int) -> Any:
    c = cfg.model_copy(deep=True)
    c.train.seed, c.train.progress, c.eval.every = seed, False, None
    c.train.max_steps, c.train.epochs = steps, None
    c.train.batch_size = batch
    c.train.log_every = max(1, steps)
    return c


def budget_arm(asm: Assembly, cfg: Any, known: dict[int, torch.Tensor], method: str,
               budget: int, seed: int, s: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One student paid ``budget`` teacher calls chosen by ``method``."""
    b = asm.data
    torch.manual_seed(seed)
    student = asm.build_student(asm.module())
    initial = max(1, budget // s["rounds"])
    per_round = max(1, math.ceil((budget - initial) / max(1, s["rounds"] - 1)))
    batch = min(cfg.train.batch_size, initial)
    epr = max(1, math.ceil(s["min_steps_per_round"] * batch / initial))  # epochs per round
    teacher = OnlineTeacher(asm.module(), known=known)
    p = {"domain": "labels"} if method == "ddk" else {}
    sel = Selection(method, budget, epr, teacher, b.train, asm.collate, initial=initial,
                    per_round=per_round, seed=seed, val_data=b.val, domain=p.get("domain"),
                    batch_size=256)  # fmt: skip
    c = _train_cfg(cfg, seed, 1, batch)
    c.train.max_steps = None
    c.train.epochs = float(s["rounds"] * epr)
    objective = LABEL_FREE if method == "label_free" else s["objective"]
    d = Distiller(student, teacher, objective, b.train, c, task=asm.task,
                  collate_fn=asm.collate, write_run=False, selection=sel)  # fmt: skip
    t0 = time.perf_counter()
    d.fit()
    return {
        "accuracy": sel.accuracy(student),
        "teacher_calls": sel.teacher.spent,
        "steps": d.total_steps(),
        "seconds": time.perf_counter() - t0,
    }


def few_label_arms(recipe: str, over: list[str], fraction: float, seed: int,
                   s: dict[str, Any]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """CE on the labelled part, KD on labelled + pool, label-free KD — equal steps."""
    cfg = load_config(recipe, [*over, f"data.params.labeled={fraction}", "train.progress=false",
                               f"train.seed={seed}"])  # fmt: skip
    asm = Assembly(cfg)
    b = asm.data
    n_lab = int(b.info.extra["labeled"])
    teacher_mod = asm.module()  # fitted on the labelled part only
    batch = min(cfg.train.batch_size, n_lab)
    epochs = 4
    steps = max(s["min_steps_per_round"] * 2, epochs * len(b.train) // cfg.train.batch_size)
    out: dict[str, dict[str, Any]] = {
        "teacher": {"accuracy": heldout_accuracy(teacher_mod, b.val, asm.collate), "labelled": n_lab}
    }  # fmt: skip
    known = _teacher_outputs(teacher_mod, b.train, asm.collate, recipe)
    arms = {"ce_labelled_only": {"ce": {"weight": 1.0}}, "kd": s["objective"],
            "label_free_kd": LABEL_FREE}  # fmt: skip
    for name, objective in arms.items():
        torch.manual_seed(seed)
        student = asm.build_student(teacher_mod)
        bs = batch if name == "ce_labelled_only" else cfg.train.batch_size
        c = _train_cfg(cfg, seed, steps, bs)
        teacher = None if name == "ce_labelled_only" else OnlineTeacher(teacher_mod, known=known)
        t0 = time.perf_counter()
        Distiller(student, teacher, objective, b.train, c, task=asm.task,
                  collate_fn=asm.collate, write_run=False).fit()  # fmt: skip
        out[name] = {
            "accuracy": heldout_accuracy(student, b.val, asm.collate),
            "steps": steps,
            "seconds": time.perf_counter() - t0,
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both measurements; write the JSON, plots and the docs subsections."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=["vision", "text"], default="vision")
    ap.add_argument("--quick", action="store_true", help="digits, few arms; results/quick/")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--skip-few", action="store_true")
    ap.add_argument("--docs-only", action="store_true", help="re-render docs from the JSON")
    ap.add_argument("--limit", type=int, help="use the first N training examples as the pool")
    ap.add_argument(
        "--add-methods",
        help="measure only these methods and merge them into the saved results (same settings)",
    )
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
    key = "quick" if a.quick else a.recipe
    name = f"{NAME}_{key}"
    if a.docs_only:
        payload = json.loads((C.RESULTS / f"{name}.json").read_text())
        publish(payload)
        return payload
    saved: dict[str, Any] | None = None
    if a.add_methods:
        saved = json.loads((C.RESULTS / f"{name}.json").read_text())
        a.methods, a.skip_few = a.add_methods, True
    s = dict(SETTINGS[key])
    if a.limit:
        s["over"] = [*s["over"], f"data.params.limit={a.limit}"]
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(method_names())}")
    t_start = time.perf_counter()
    seeds = list(range(a.seeds))
    payload: dict[str, Any] = {"name": name, "settings": {**s, "seeds": seeds, "methods": methods}}
    if not a.skip_budget:
        cfg = load_config(s["recipe"], [*s["over"], "train.progress=false"])
        asm = Assembly(cfg)
        b = asm.data
        teacher = asm.module()
        known = _pool_outputs(teacher, b.train, asm.collate)
        t_acc = heldout_accuracy(teacher, b.val, asm.collate)
        print(f"teacher held-out accuracy {t_acc:.4f}; pool {len(b.train)}", flush=True)
        arms: dict[str, Any] = {}
        budgets = [max(s["rounds"], int(round(f * len(b.train)))) for f in s["budgets"]]
        for method in methods:
            for f, budget in zip(s["budgets"], budgets):
                runs = [budget_arm(asm, cfg, known, method, budget, sd, s) for sd in seeds]
                arms[f"{method}@{f}"] = {"method": method, "fraction": f, "budget": budget,
                                         "accuracy": _ms([r["accuracy"] for r in runs]),
                                         "runs": runs}  # fmt: skip
                print(f"{method:>16} @ {f:>5} ({budget}): {arms[f'{method}@{f}']['accuracy']}",
                      flush=True)  # fmt: skip
            partial = {**payload, "budget": {"arms": arms}, "partial": True}
            # a killed run keeps the methods already measured (never over saved results)
            C.write_json(name if saved is None else f"{name}_adding", partial)
        payload["budget"] = {"pool": len(b.train), "heldout": len(b.val),
                             "teacher_accuracy": t_acc, "budgets": budgets, "arms": arms}  # fmt: skip
    if not a.skip_few:
        few: dict[str, Any] = {}
        for f in s["fractions"]:
            runs = [few_label_arms(s["recipe"], s["over"], f, sd, s) for sd in seeds]
            few[str(f)] = {
                arm: {"accuracy": _ms([r[arm]["accuracy"] for r in runs]), "runs": [r[arm] for r in runs]}
                for arm in runs[0]
            }  # fmt: skip
            few[str(f)]["labelled"] = runs[0]["teacher"]["labelled"]
            print(f"labelled {f}: " + ", ".join(f"{k} {v['accuracy']['mean']:.4f}"
                  for k, v in few[str(f)].items() if isinstance(v, dict)), flush=True)  # fmt: skip
        payload["few_labels"] = few
    payload.update(machine=C.machine_info(), load=C.load_note(),
                   seconds=time.perf_counter() - t_start)  # fmt: skip
    if saved is not None:  # merge the new methods into the saved measurement
        if saved["settings"]["over"] != s["over"] or saved["budget"]["budgets"] != budgets:
            raise SystemExit("--add-methods: the saved results were measured with other settings")
        old_methods = [m for m in saved["settings"]["methods"] if m not in methods]
        saved["settings"]["methods"] = old_methods + methods
        saved["budget"]["arms"].update(payload["budget"]["arms"])
        saved["added"] = {"methods": methods, "machine": payload["machine"],
                          "seconds": payload["seconds"]}  # fmt: skip
        payload = saved
        (C.RESULTS / f"{name}_adding.json").unlink(missing_ok=True)  # written by this run
    publish(payload)
    return payload


def _pm(d: dict[str, float]) -> str:
    return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}"


def markdown(p: dict[str, Any], imgs: dict[str, str]) -> str:
    """The docs subsection of one recipe."""
    st = p["settings"]
    title = {
        "vision": "(b) Fashion-MNIST, CNN teacher → small CNN: every selection method vs random",
        "text-classifier": "(c) BBC News, MiniLM + linear head → TF-IDF MLP: every method, and few labels",
    }.get(st["recipe"], f"{st['recipe']}: every selection method and few labels")
    lines = [f"### {title}", ""]
    if "budget" in p:
        bu = p["budget"]
        head = "| method | " + " | ".join(
            f"{100 * f:g}% ({n:,} calls)" for f, n in zip(st["budgets"], bu["budgets"])
        ) + " |"  # fmt: skip
        rows = [head, "|---|" + "---|" * len(st["budgets"])]
        for m in st["methods"]:
            rows.append(f"| {m} | " + " | ".join(_pm(bu["arms"][f"{m}@{f}"]["accuracy"])
                                                 for f in st["budgets"]) + " |")  # fmt: skip
        verdict = []
        for f in st["budgets"]:
            r = bu["arms"][f"random@{f}"]["accuracy"]
            others = {m: bu["arms"][f"{m}@{f}"]["accuracy"] for m in st["methods"] if m != "random"}
            if not others:
                continue
            m, v = max(others.items(), key=lambda kv: kv[1]["mean"])
            spread = max(r["std"], v["std"])
            paired = _ms([a["accuracy"] - b["accuracy"] for a, b in
                          zip(bu["arms"][f"{m}@{f}"]["runs"], bu["arms"][f"random@{f}"]["runs"])])  # fmt: skip
            gap = v["mean"] - r["mean"]
            beats = "more than" if gap > spread else "within"
            verdict.append(f"{100 * f:g}%: best {m} {100 * gap:+.1f} points vs random, {beats} "
                           f"the seed std ({100 * spread:.1f}); same-seed difference "
                           f"{100 * paired['mean']:+.1f} ± {100 * paired['std']:.1f}")  # fmt: skip
        lines += [
            f"**Accuracy vs teacher-call budget.** Teacher fitted on all {bu['pool']:,} "
            f"training labels (held-out accuracy {100 * bu['teacher_accuracy']:.1f}%); the pool's "
            f"labels are then hidden and each method pays for a share of it over "
            f"{st['rounds']} rounds. Student held-out accuracy (%, mean ± std over "
            f"{len(st['seeds'])} seeds):",
            "",
            *rows,
            "",
            "- Best method vs random at each budget: " + "; ".join(verdict) + ".",
            "",
        ]
        if "budget" in imgs:
            lines += [f"![accuracy vs budget]({imgs['budget']})", ""]
    if "few_labels" in p:
        fl = p["few_labels"]
        arms = ["teacher", "ce_labelled_only", "kd", "label_free_kd"]
        rows = [
            "| labelled | " + " | ".join(arms) + " | KD − CE |",
            "|---|" + "---|" * (len(arms) + 1),
        ]
        for f, r in fl.items():
            d = [a["accuracy"] - b["accuracy"] for a, b in
                 zip(r["kd"]["runs"], r["ce_labelled_only"]["runs"])]  # fmt: skip
            diff = _ms(d)
            rows.append(f"| {100 * float(f):g}% ({r['labelled']:,}) | "
                        + " | ".join(_pm(r[a]["accuracy"]) for a in arms)
                        + f" | {100 * diff['mean']:+.1f} ± {100 * diff['std']:.1f} |")  # fmt: skip
        lines += [
            "**Few labels + an unlabelled pool** (`data.params.labeled`). The teacher is "
            "fitted on the labelled part only; `ce_labelled_only` trains the student on that "
            "part alone, `kd` adds the teacher's signal on every training example (labels where "
            "they exist), `label_free_kd` uses the teacher alone. Equal steps per row; held-out "
            "accuracy (%, mean ± std):",
            "",
            *rows,
            "",
        ]
        if p.get("few_note"):
            lines += [p["few_note"], ""]
        if "few" in imgs:
            lines += [f"![few labels]({imgs['few']})", ""]
    where = p.get("device_note") or (C.machine_line(p["machine"]) + " " + p.get("load", ""))
    lines.append(where + f" Took {p['seconds'] / 60:.1f} min.")
    return "\n".join(lines)


def plots(p: dict[str, Any]) -> dict[str, Path]:
    """Accuracy vs budget per method; accuracy vs labelled fraction per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, out = p["settings"], {}
    img = C.DOC.parent / "img"
    if "budget" in p:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in st["methods"]:
            xs = [100 * f for f in st["budgets"]]
            a = [p["budget"]["arms"][f"{m}@{f}"]["accuracy"] for f in st["budgets"]]
            ax.errorbar(xs, [100 * x["mean"] for x in a], yerr=[100 * x["std"] for x in a],
                        marker="o", capsize=3, label=m, lw=2.2 if m == "random" else 1.2)  # fmt: skip
        ax.axhline(100 * p["budget"]["teacher_accuracy"], ls="--", c="gray", label="teacher")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}%" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("teacher calls (% of the pool)")
        ax.set_ylabel("student held-out accuracy (%)")
        ax.legend(fontsize=7, ncol=2)
        out["budget"] = C.save_figure(fig, img / f"{p['name']}_budget.png")
    if "few_labels" in p:
        fig, ax = plt.subplots(figsize=(6, 4))
        fr = list(p["few_labels"])
        for arm in ("teacher", "ce_labelled_only", "kd", "label_free_kd"):
            a = [p["few_labels"][f][arm]["accuracy"] for f in fr]
            ax.errorbar([100 * float(f) for f in fr], [100 * x["mean"] for x in a],
                        yerr=[100 * x["std"] for x in a], marker="o", capsize=3, label=arm)  # fmt: skip
        ax.set_xscale("log")
        ticks = [100 * float(f) for f in fr]
        ax.set_xticks(ticks, [f"{x:g}%" for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled part of the training set (%)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.legend(fontsize=8)
        out["few"] = C.save_figure(fig, img / f"{p['name']}_few.png")
    return out


def publish(p: dict[str, Any]) -> None:
    """JSON, plots, docs subsection."""
    C.write_json(p["name"], p)
    imgs = {k: str(v.relative_to(C.DOC.parent)) for k, v in plots(p).items()}
    md = markdown(p, imgs)
    C.update_subsection(p["name"], md, SECTION)
    print(md)


if __name__ == "__main__":
    main()

"""Very sparse CNN students on Fashion-MNIST: magnitude only vs CE vs KD vs CTS-KL recovery.

The ``vision`` recipe's CNN teacher (fitted once) is pruned to 90%, 95% and 99% of its conv
and linear weights and each pruned copy is scored:

* ``magnitude, no training``: one-shot magnitude pruning;
* ``magnitude + CE``: recovered on the labels alone (no teacher);
* ``magnitude + KD``: recovered with the recipe's KD objective (0.9·KD(τ=4) + 0.1·CE);
* ``magnitude + CTS-KL``: recovered with the reverse KL of the sparse student to the dense
  teacher (``cts_kl``, 0.9 weight) + 0.1·CE;
* ``CTS mask + KD``: the mask found by Concrete Ticket Search (reverse KL to the dense network,
  a Binary-Concrete relaxation; "Winning the Lottery by Preserving Network Training Dynamics
  with Concrete Ticket Search", 2025) instead of magnitude, then KD recovery.

Masks are kept through training (the engine re-applies them after every step). Same steps,
data order and optimizer for every trained arm; held-out accuracy, mean ± std over seeds.

    .venv/bin/python -m benchmarks.sparse_cnn [--quick] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from typing import Any

import torch

from benchmarks import _common as C

NAME = "sparse_cnn"
KD = {"kd": {"weight": 0.9, "temperature": 4.0}, "ce": {"weight": 0.1}}
ARMS: dict[str, dict[str, Any] | None] = {
    "magnitude, no training": None,
    "magnitude + CE": {"ce": {"weight": 1.0}},
    "magnitude + KD": KD,
    "magnitude + CTS-KL": {"cts": {"loss": "cts_kl", "weight": 0.9}, "ce": {"weight": 0.1}},
    "CTS mask + KD": KD,
}


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"recipe": "digits", "over": ["teacher.fit.epochs=5"], "sparsities": [0.9],
                "steps": 30, "cts_steps": 20, "arms": list(ARMS)}  # fmt: skip
    return {"recipe": "vision", "over": ["data.params.limit=20000", "data.params.val_limit=5000",
                                         "teacher.fit.epochs=3"],
            "sparsities": [0.9, 0.95, 0.99], "steps": 600, "cts_steps": 300,
            "arms": list(ARMS)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Every arm x sparsity x seed; JSON and the docs subsection."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
        a.seeds = a.seeds[:1]
    st = settings(a.quick)
    from torch.utils.data import default_collate

    from benchmarks.leaderboard import evaluate, teacher_logits
    from mentor.assembly import Assembly
    from mentor.config import load_config
    from mentor.engine import Distiller
    from mentor.losses import Objective
    from mentor.pruning.cts import concrete_ticket_search
    from mentor.pruning.masks import MaskSet, prunable
    from mentor.students import build_model
    from mentor.students.prune_builder import calibration_set
    from mentor.teachers import CachedTeacher

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_config(st["recipe"], [*st["over"], "train.progress=false",
                                          "train.log_every=100000", "eval.label_only=false"])  # fmt: skip
        asm = Assembly(base)
        data = asm.data
        teacher = asm.module().eval()
    collate = data.collate or default_collate
    logits = teacher_logits(teacher, data.train, collate)
    t_metrics = evaluate(teacher, data)
    print(f"teacher: {t_metrics}", flush=True)

    def fwd(m: torch.nn.Module, b: dict[str, Any]) -> torch.Tensor:
        from mentor.models import model_outputs

        return model_outputs(m, b)

    runs: list[dict[str, Any]] = []
    for s in st["sparsities"]:
        for seed in a.seeds:
            torch.manual_seed(seed)
            params = {"method": "magnitude", "sparsity": s}
            mag = build_model("prune", params, data.info, teacher, data=data.train)
            cts_student = None
            for arm in st["arms"]:
                t1 = time.perf_counter()
                if arm == "CTS mask + KD":
                    if cts_student is None:
                        cts_student = copy.deepcopy(mag)
                        dense = copy.deepcopy(teacher)
                        mods = prunable(dense)
                        batches = calibration_set(data.train, 16, 64)
                        masks = concrete_ticket_search(dense, mods, batches, fwd, s,
                                                       steps=st["cts_steps"], seed=seed)  # fmt: skip
                        sparse = cts_student.mentor_sparse
                        sparse.masks = MaskSet(masks)
                        with torch.no_grad():  # the teacher's weights under the CTS mask
                            cts_student.load_state_dict(teacher.state_dict())
                        sparse.masks.apply(cts_student)
                    student = copy.deepcopy(cts_student)
                else:
                    student = copy.deepcopy(mag)
                obj = ARMS[arm]
                if obj is not None:
                    raw = base.model_dump(mode="json")
                    raw["objective"] = obj
                    raw["train"].update(seed=seed, max_steps=st["steps"], epochs=None)
                    raw["output"].update(dir=str(C.RESULTS / ".sparse_cnn_run"), overwrite=True)
                    cfg = load_config(raw)
                    d = Distiller(student, CachedTeacher(logits), Objective(cfg.objective),
                                  data.train, cfg, task=data.info.task, collate_fn=collate,
                                  write_run=False)  # fmt: skip
                    d.fit()
                m = evaluate(student, data)
                zeros = student.mentor_sparse.sparsity(student)["sparsity"]
                runs.append({"arm": arm, "sparsity": s, "seed": seed, **m,
                             "zeros": zeros, "seconds": time.perf_counter() - t1})  # fmt: skip
                print(f"{s:.2f} {arm:<24} seed {seed}: acc {m['accuracy']:.4f} zeros "
                      f"{zeros:.3f} ({time.perf_counter() - t1:.0f} s)", flush=True)  # fmt: skip
    table: dict[str, dict[str, Any]] = {}
    for r in runs:
        key = f"{r['arm']}@{r['sparsity']}"
        table.setdefault(key, {"arm": r["arm"], "sparsity": r["sparsity"], "acc": []})
        table[key]["acc"].append(r["accuracy"])
    for v in table.values():
        xs = v.pop("acc")
        v["mean"] = statistics.mean(xs)
        v["std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
    payload = {"machine": C.machine_info(), "load_note": C.load_note(), "quick": a.quick,
               "settings": st, "seeds": a.seeds, "teacher": t_metrics, "runs": runs,
               "table": table, "total_s": time.perf_counter() - t0}  # fmt: skip
    C.publish(NAME, payload, markdown, parent="Pruned and sparse students")
    return payload


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs/benchmarks.md subsection."""
    st, tb = p["settings"], p["table"]
    sp = st["sparsities"]
    lines = [
        f"### (c) Very sparse CNN students ({st['recipe']}): magnitude only vs CE vs KD vs CTS-KL",
        "",
        f"The recipe's CNN teacher (held-out accuracy {100 * p['teacher']['accuracy']:.2f}%) "
        f"pruned to each sparsity of its conv and linear weights, then recovered for "
        f"{st['steps']} steps (same data order and optimizer; masks re-applied after every "
        f"step). `CTS mask` searches the mask for {st['cts_steps']} steps with the reverse KL "
        f"to the dense network. Held-out accuracy %, mean ± std over seeds {p['seeds']}:",
        "",
        "| arm | " + " | ".join(f"{100 * s:g}% zeros" for s in sp) + " |",
        "|---|" + "---|" * len(sp),
    ]
    for arm in st["arms"]:
        cells = []
        for s in sp:
            v = tb.get(f"{arm}@{s}")
            cells.append(f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if v else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    checks = []
    for s in sp:
        g = {arm: tb[f"{arm}@{s}"]["mean"] for arm in st["arms"] if f"{arm}@{s}" in tb}
        if {"magnitude + KD", "magnitude + CE"} <= g.keys():
            checks.append(f"{100 * s:g}%: KD {'>' if g['magnitude + KD'] > g['magnitude + CE'] else '≤'}"
                          f" CE ({100 * (g['magnitude + KD'] - g['magnitude + CE']):+.2f})")  # fmt: skip
        if {"magnitude + CTS-KL", "magnitude + KD"} <= g.keys():
            d = g["magnitude + CTS-KL"] - g["magnitude + KD"]
            checks.append(f"{100 * s:g}%: CTS-KL − KD {100 * d:+.2f}")
        if {"CTS mask + KD", "magnitude + KD"} <= g.keys():
            d = g["CTS mask + KD"] - g["magnitude + KD"]
            checks.append(f"{100 * s:g}%: CTS mask − magnitude mask (both KD) {100 * d:+.2f}")
    lines += ["", "Directions: " + "; ".join(checks) + ".", "",
              C.machine_line(p["machine"]) + p.get("load_note", "")
              + f" Whole benchmark {p['total_s'] / 60:.1f} min. Regenerate with "
              "`.venv/bin/python -m benchmarks.sparse_cnn`."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])

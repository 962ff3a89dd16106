"""Pruned and sparse students of SmolLM2-135M: one-shot pruning measured, no training.

On the ``causal-lm`` recipe's teacher and BBC News blocks, every student below is built by
``student.builder: prune`` / ``layer_drop`` exactly as a recipe builds it (calibration from
the training blocks) and scored on the same held-out blocks, before any distillation:

* **Wanda vs magnitude** at 50% and 70% unstructured sparsity, and 2:4 (Sun et al., 2023);
* **DSnoT** (training-free prune-and-grow) on top of Wanda and magnitude (Zhang et al., 2023);
* **layer choice**: 6 of 30 blocks evenly spaced vs the 6 of highest ShortGPT block importance
  (``layers: auto``);
* **structured width** (Minitron): MLP channels and hidden channels, as a smaller dense model;
* **CPU cost**: parameters, size, compressed size, batch-1 latency and throughput of the
  teacher, a 50%-sparse student and the structured students (sparsity gives no CPU speed-up
  with dense kernels; structured pruning does).

    .venv/bin/python -m benchmarks.pruning [--quick]

``--quick``: the ``tiny-lm`` recipe (seconds; results/quick/).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from typing import Any

import torch

from benchmarks import _common as C

NAME = "pruning"
PARENT = "Pruned and sparse students"

ARMS: list[tuple[str, str, dict[str, Any]]] = [
    ("magnitude 50%", "prune", {"method": "magnitude", "sparsity": 0.5}),
    ("wanda 50%", "prune", {"method": "wanda", "sparsity": 0.5}),
    ("magnitude 50% + DSnoT", "prune", {"method": "magnitude", "sparsity": 0.5, "dsnot": True}),
    ("wanda 50% + DSnoT", "prune", {"method": "wanda", "sparsity": 0.5, "dsnot": True}),
    ("magnitude 70%", "prune", {"method": "magnitude", "sparsity": 0.7}),
    ("wanda 70%", "prune", {"method": "wanda", "sparsity": 0.7}),
    ("wanda 70% + DSnoT", "prune", {"method": "wanda", "sparsity": 0.7, "dsnot": True}),
    ("wanda 2:4", "prune", {"method": "wanda", "pattern": "2:4"}),
    ("6 of 30 layers, even", "layer_drop", {"num_layers": 6}),
    ("6 of 30 layers, importance", "layer_drop", {"layers": "auto", "num_layers": 6}),
    ("structured MLP 75%", "prune", {"method": "structured", "intermediate": 0.75}),
    ("structured MLP 50%", "prune", {"method": "structured", "intermediate": 0.5}),
    ("structured MLP 25%", "prune", {"method": "structured", "intermediate": 0.25}),
    ("structured hidden 75%", "prune", {"method": "structured", "hidden": 0.75}),
    ("structured MLP 50% + hidden 75%", "prune",
     {"method": "structured", "intermediate": 0.5, "hidden": 0.75}),
]  # fmt: skip
COST = ["wanda 50%", "structured MLP 50%", "structured MLP 50% + hidden 75%",
        "6 of 30 layers, importance"]  # fmt: skip


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"recipe": "tiny-lm", "over": ["teacher.fit.epochs=1", "data.params.n=96"],
                "val_blocks": 8, "arms": [a for a in ARMS if "30 layers" not in a[0]][:4]
                + [("1 of 2 layers, importance", "layer_drop", {"layers": "auto", "num_layers": 1})],
                "cost": ["wanda 50%"]}  # fmt: skip
    return {"recipe": "causal-lm", "over": ["data.params.max_blocks=400"], "val_blocks": 24,
            "arms": ARMS, "cost": COST}  # fmt: skip


@torch.no_grad()
def perplexity(model: torch.nn.Module, val: list[dict[str, Any]], bs: int = 8) -> float:
    """Held-out perplexity (next-token cross-entropy over every position)."""
    from torch.utils.data import default_collate

    from mentor.domain_mixing import token_loss
    from mentor.models import model_outputs

    model.eval()
    tot = n = 0.0
    for lo in range(0, len(val), bs):
        b = default_collate(
            [{k: v for k, v in x.items() if k != "domain"} for x in val[lo : lo + bs]]
        )
        s, c = token_loss(model_outputs(model, b), b["input_ids"], b.get("attention_mask"))
        tot, n = tot + float(s.sum()), n + float(c.sum())
    return math.exp(tot / n)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build every arm, score it, measure the CPU cost of a few; JSON, docs section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
    st = settings(a.quick)
    from mentor.assembly import Assembly
    from mentor.config import load_config
    from mentor.eval.cost import measure_cost
    from mentor.students import build_model
    from mentor.students.builders import count_parameters

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asm = Assembly(load_config(st["recipe"], [*st["over"], "train.progress=false"]))
        data = asm.data
        teacher = asm.module().eval()
    val = [data.val[i] for i in range(min(st["val_blocks"], len(data.val)))]
    t_ppl = perplexity(teacher, val)
    t_params = count_parameters(teacher)
    print(f"teacher: {t_params:,} parameters, perplexity {t_ppl:.2f}", flush=True)
    rows: list[dict[str, Any]] = []
    built: dict[str, torch.nn.Module] = {}
    for name, builder, params in st["arms"]:
        t1 = time.perf_counter()
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = build_model(builder, params, data.info, teacher, data=data.train)
        build_s = time.perf_counter() - t1
        p = perplexity(m, val)
        from mentor.eval.cost import weight_sparsity

        row = {"arm": name, "builder": builder, "params": params, "perplexity": p,
               "ratio_to_teacher": p / t_ppl, "parameters": count_parameters(m),
               "param_share": count_parameters(m) / t_params, "build_s": build_s,
               **weight_sparsity(m)}  # fmt: skip
        rows.append(row)
        print(f"{name:<34} ppl {p:10.2f} ({p / t_ppl:6.2f}x)  params "
              f"{row['param_share']:.2f}  zeros {row['zero_fraction']:.2f}  ({build_s:.0f} s)",
              flush=True)  # fmt: skip
        if name in st["cost"]:
            built[name] = m
        else:
            del m
    cost = {"teacher": measure_cost(teacher, data.val, throughput_batch=8, compressed=True)}
    for name, m in built.items():
        cost[name] = measure_cost(m, data.val, throughput_batch=8, compressed=True)
    for c in cost.values():
        c["latency_speedup"] = cost["teacher"]["latency_ms"] / c["latency_ms"]
        c["throughput_speedup"] = c["throughput_per_s"] / cost["teacher"]["throughput_per_s"]
    payload = {"machine": C.machine_info(), "load_note": C.load_note(), "quick": a.quick,
               "settings": {k: v for k, v in st.items() if k != "arms"},
               "teacher": {"perplexity": t_ppl, "parameters": t_params}, "rows": rows,
               "cost": cost, "total_s": time.perf_counter() - t0}  # fmt: skip
    C.publish(NAME, payload, markdown, parent=PARENT)
    return payload


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs/benchmarks.md section."""
    rows = {r["arm"]: r for r in p["rows"]}
    t = p["teacher"]
    lines = [
        f"### (a) One-shot pruning of the `{p['settings']['recipe']}` teacher (no training)",
        "",
        f"Each student is built by `student.builder: prune` or `layer_drop` as a recipe builds "
        f"it (calibration: 8 batches of 4 training blocks) and scored on the same "
        f"{p['settings']['val_blocks']} held-out blocks before any distillation. Teacher: "
        f"{t['parameters']:,} parameters, perplexity {t['perplexity']:.2f}.",
        "",
        "| student | parameters (share) | zeros in weights | perplexity | × teacher |",
        "|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        lines.append(f"| {r['arm']} | {r['parameters']:,} ({r['param_share']:.2f}) | "
                     f"{r['zero_fraction']:.2f} | {r['perplexity']:,.1f} | "
                     f"{r['ratio_to_teacher']:,.2f} |")  # fmt: skip
    checks = C.directions(rows, [
        ("wanda 50%", "magnitude 50%", "Wanda < magnitude at 50%"),
        ("wanda 70%", "magnitude 70%", "Wanda < magnitude at 70%"),
        ("wanda 50% + DSnoT", "wanda 50%", "DSnoT lowers Wanda's 50% perplexity"),
        ("magnitude 50% + DSnoT", "magnitude 50%", "DSnoT lowers magnitude's 50% perplexity"),
        ("wanda 70% + DSnoT", "wanda 70%", "DSnoT lowers Wanda's 70% perplexity"),
        ("6 of 30 layers, importance", "6 of 30 layers, even",
         "importance-chosen layers < evenly spaced"),
    ], digits=1)  # fmt: skip
    lines += ["", "Paper directions (one seed: the calibration set is fixed): "
              + "; ".join(checks) + ".", ""]  # fmt: skip
    lines += [
        "**CPU cost** (`mentor.eval.cost.measure_cost`: batch-1 latency over a held-out block, "
        "throughput at batch 8, in the same process):",
        "",
        "| model | parameters | zeros | size MB | zlib MB | latency ms | speed-up | throughput/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in p["cost"].items():
        lines.append(f"| {name} | {c['params']:,} | {c['zero_fraction']:.2f} | "
                     f"{c['size_bytes'] / 1e6:.1f} | {c['compressed_bytes'] / 1e6:.1f} | "
                     f"{c['latency_ms']:.1f} | {c['latency_speedup']:.2f}× | "
                     f"{c['throughput_per_s']:.1f} |")  # fmt: skip
    lines += [
        "",
        "Unstructured and 2:4 zeros live in dense matrices: PyTorch's CPU kernels do the same "
        "work, so a sparse student is no faster here — it only compresses better. Structured "
        "pruning (smaller matrices, fewer blocks) is what speeds up CPU inference.",
        "",
        C.machine_line(p["machine"]) + p.get("load_note", "")
        + f" Whole benchmark {p['total_s'] / 60:.1f} min. Regenerate with "
        "`.venv/bin/python -m benchmarks.pruning`.",
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])

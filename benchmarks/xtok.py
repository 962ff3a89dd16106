"""Cross-tokenizer distillation: CE only vs ULD vs span-aligned KL (gold_hybrid), equal steps.

The shipped ``causal-lm-xtok`` pair — SmolLM2-135M-Instruct (49,152-token vocabulary) as the
teacher, a small random-init Llama with its own byte-level BPE vocabulary trained on the BBC
News training documents as the student — trained for the same number of optimizer steps on
the same text chunks, batch, optimizer and schedule in three arms:

* ``ce``: the student's own next-token cross-entropy only (no teacher);
* ``uld``: ce + Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs", 2024);
* ``aligned``: ce + ``gold_hybrid`` (positions paired by character spans; exact KL over the
  shared vocabulary where both sides predict the same token, ULD elsewhere; in the spirit of
  TRL's GOLD trainer, 2025).

Each arm × seed is scored by held-out **bits per byte** (the NLL of the held-out chunks in bits
over their UTF-8 bytes: independent of the tokenizer); the teacher's bits per byte on the same
chunks is the reference. Mean ± sample std over the seeds.

    .venv/bin/python -m benchmarks.xtok [--quick] [--seeds 0 1 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as C

NAME = "xtok"
PARENT = "Cross-tokenizer distillation"
RECIPE = "causal-lm-xtok"
ARMS: dict[str, str] = {
    "ce": "{ce: {weight: 1.0}}",
    "uld": "{ce: {weight: 1.0}, uld: {weight: 1.0}}",
    "aligned": "{ce: {weight: 1.0}, gold_hybrid: {weight: 1.0}}",
}


def _overrides(cfg: dict[str, Any]) -> list[str]:
    """The recipe's settings this benchmark changes (sizes; the arms change the objective)."""
    return [
        f"data.params.chunk_chars={cfg['chunk_chars']}",
        f"data.params.max_chunks={cfg['max_chunks']}",
        f"data.params.student_vocab_size={cfg['student_vocab']}",
        f"student.params.hidden_size={cfg['hidden']}",
        f"student.params.num_layers={cfg['layers']}",
        f"student.params.num_heads={cfg['heads']}",
        f"train.batch_size={cfg['batch_size']}",
        f"train.max_steps={cfg['steps']}",
        f"train.lr={cfg['lr']}",
        f"train.warmup_steps={max(1, cfg['steps'] // 10)}",
        f"train.log_every={max(1, cfg['steps'] // 10)}",
        "train.progress=false",
        "train.checkpoint_minutes=null",
        "eval.every=null",
    ]


def _memo_teacher(module: Any, memo: dict[tuple[int, ...], Any]) -> Any:
    """The online teacher, answering a batch it has seen (same example ids) from ``memo``.

    The teacher arms of one seed train on the same batches in the same order, so the second
    arm reuses the first one's teacher logits (the same numbers; one teacher forward per batch
    and seed instead of two — the teacher is most of a step's cost on CPU).
    """
    from mentor.teachers import OnlineTeacher

    class MemoTeacher(OnlineTeacher):
        def __call__(self, batch: dict[str, Any]) -> Any:
            key = tuple(int(i) for i in batch["index"])
            if key not in memo:
                memo[key] = super().__call__(batch)
            return memo[key]

    return MemoTeacher(module)


def run(root: Path, cfg: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Every arm for every seed; held-out bits per byte of each student and of the teacher."""
    import torch
    from accelerate.utils import set_seed

    from mentor.assembly import Assembly
    from mentor.config import load_config
    from mentor.engine import Distiller
    from mentor.losses import Objective
    from mentor.students import build_model
    from mentor.tasks import heldout

    base = _overrides(cfg)
    asm = Assembly(load_config(RECIPE, base))
    bundle, task = asm.data, asm.task
    teacher = asm.module()

    def bpb(model: Any, name: str = "student") -> float:
        res = heldout(task, {name: model}, bundle.val, collate=bundle.collate, batch_size=8,
                      progress=False)  # fmt: skip
        return float(res[name]["bits_per_byte"])

    t0 = time.perf_counter()
    teacher_bpb = bpb(teacher, "teacher")
    teacher_s = time.perf_counter() - t0
    torch.manual_seed(0)
    init_bpb = bpb(asm.build_student())
    rows = []
    for seed in seeds:
        memo: dict[tuple[int, ...], Any] = {}
        for arm, objective in ARMS.items():
            out = root / f"{arm}-{seed}"
            over = [*base, f"train.seed={seed}", f"objective={objective}", f"output.dir={out}"]
            rc = load_config(RECIPE, over)
            set_seed(seed)  # as the recipe builds it: objective, then the student
            obj = Objective(rc.objective)
            set_seed(seed)
            student = build_model(rc.student.builder, rc.student.params, bundle.info)
            src = _memo_teacher(teacher, memo) if obj.cross_tokenizer else None
            t0 = time.perf_counter()
            Distiller(student, src, obj, bundle.train, rc, task=task,
                      collate_fn=bundle.collate).fit()  # fmt: skip
            train_s = time.perf_counter() - t0
            rows.append({"arm": arm, "seed": seed, "bits_per_byte": bpb(student),
                         "train_s": round(train_s, 1)})  # fmt: skip
            print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
        memo.clear()
    info = bundle.info
    return {
        "rows": rows,
        "teacher_bits_per_byte": teacher_bpb,
        "teacher_eval_s": round(teacher_s, 1),
        "student_init_bits_per_byte": init_bpb,
        "data": {
            "train_chunks": len(bundle.train),
            "val_chunks": len(bundle.val),
            "val_bytes": info.extra["val_bytes"],
            "student_vocab": info.vocab_size,
            "teacher_vocab": info.extra["teacher_vocab_size"],
            "shared_tokens": info.extra["shared_tokens"],
            "train_student_tokens_per_byte": info.extra["train_tokens"] / info.extra["train_bytes"],
            "train_teacher_tokens_per_byte": info.extra["train_teacher_tokens"]
            / info.extra["train_bytes"],
        },
    }


def _std(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def summarize_arms(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per arm: mean, sample std, min and max of held-out bits per byte over the seeds, and the
    paired difference to ``ce`` (the same seed: the same initial student and batches)."""
    bpb = {(r["arm"], r["seed"]): r["bits_per_byte"] for r in rows}
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        seeds = [r["seed"] for r in rows if r["arm"] == arm]
        v = [bpb[(arm, s)] for s in seeds]
        d = [bpb[(arm, s)] - bpb[("ce", s)] for s in seeds if ("ce", s) in bpb]
        t = [r["train_s"] for r in rows if r["arm"] == arm]
        out[arm] = {
            "mean": statistics.fmean(v),
            "std": _std(v),
            "min": min(v),
            "max": max(v),
            "n": len(v),
            "delta_vs_ce": statistics.fmean(d) if d else 0.0,
            "delta_std": _std(d),
            "delta_all_below_0": bool(d) and all(x < 0 for x in d),
            "delta_all_above_0": bool(d) and all(x > 0 for x in d),
            "train_s": statistics.fmean(t),
        }
    return out


def verdict(s: dict[str, dict[str, float]]) -> str:
    """One sentence: the best arm, and each teacher arm's paired difference to ce."""
    best = min(s, key=lambda a: s[a]["mean"])
    parts = []
    for arm in ("uld", "aligned"):
        x = s[arm]
        if x["delta_all_below_0"]:
            sign = f"lower than ce for all {x['n']} seeds"
        elif x["delta_all_above_0"]:
            sign = f"higher than ce for all {x['n']} seeds"
        else:
            sign = "no consistent sign over the seeds"
        parts.append(
            f"{arm} {x['delta_vs_ce']:+.3f} ± {x['delta_std']:.3f} bits/byte vs ce ({sign})"
        )
    return (
        f"Lowest mean held-out bits per byte: **{best}**. Paired by seed: " + "; ".join(parts) + "."
    )


def markdown(p: dict[str, Any]) -> str:
    c, s, d = p["config"], p["summary"], p["data"]
    labels = {"ce": "ce only (no teacher)", "uld": "ce + uld", "aligned": "ce + gold_hybrid"}
    lines = [
        "### (a) CE only vs ULD vs span-aligned KL (gold_hybrid), equal steps",
        "",
        f"{C.machine_line(p['machine'])}{p['load_note']}",
        "",
        f"Teacher SmolLM2-135M-Instruct ({d['teacher_vocab']:,}-token vocabulary); student a "
        f"random-init Llama (hidden {c['hidden']}, {c['layers']} layer(s)) with its own "
        f"byte-level BPE of {d['student_vocab']:,} tokens trained on the BBC News training "
        f"documents ({d['shared_tokens']:,} token strings shared with the teacher). Text: BBC "
        f"News chunks of ≤ {c['chunk_chars']} characters ({d['train_chunks']} train, "
        f"{d['val_chunks']} held-out = {d['val_bytes']:,} bytes; "
        f"{d['train_teacher_tokens_per_byte']:.3f} teacher and "
        f"{d['train_student_tokens_per_byte']:.3f} student tokens per byte). Every arm: "
        f"{c['steps']} AdamW steps of {c['batch_size']} chunks, lr {c['lr']} cosine, the same "
        f"batches for a given seed; seeds {p['seeds']}. Quality: held-out bits per byte "
        "(NLL in bits / UTF-8 bytes of the predicted text; lower is better).",
        "",
        "| arm | held-out bits/byte, mean ± std | min–max | Δ vs ce (same seed), mean ± std "
        "| train s/run* |",
        "|---|---|---|---|---|",
    ]
    for arm, x in s.items():
        delta = "–" if arm == "ce" else f"{x['delta_vs_ce']:+.3f} ± {x['delta_std']:.3f}"
        lines.append(
            f"| {labels.get(arm, arm)} | {x['mean']:.3f} ± {x['std']:.3f} | "
            f"{x['min']:.3f}–{x['max']:.3f} | {delta} | {x['train_s']:.0f} |"
        )
    lines += [
        f"| teacher (reference) | {p['teacher_bits_per_byte']:.3f} | | | |",
        f"| student before training | {p['student_init_bits_per_byte']:.3f} | | | |",
        "",
        "*The two teacher arms of a seed train on the same batches; the second (gold_hybrid) "
        "reuses the first one's teacher logits, so its time leaves out the teacher forward "
        "(most of a step on CPU).",
        "",
        p["verdict"] + " At this size the students see "
        f"{c['steps'] * c['batch_size']} chunks, far from convergence: the table measures what "
        "each teacher signal adds early in training, not the final gap to the teacher. "
        f"Whole benchmark {p['wall_s'] / 60:.1f} min (`python -m benchmarks.xtok`; `--quick` "
        "for a smoke run).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes; outputs to results/quick/")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk-chars", type=int, default=128)
    ap.add_argument("--max-chunks", type=int, default=640)
    ap.add_argument("--student-vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
        a.seeds, a.steps, a.max_chunks, a.chunk_chars = a.seeds[:2], 2, 24, 64
        a.hidden, a.layers = 32, 1
    cfg = {
        "steps": a.steps, "batch_size": a.batch_size, "chunk_chars": a.chunk_chars,
        "max_chunks": a.max_chunks, "student_vocab": a.student_vocab, "hidden": a.hidden,
        "layers": a.layers, "heads": max(1, a.hidden // 32), "lr": a.lr,
    }  # fmt: skip
    load_before = C.load_avg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mentor-xtok-bench-") as tmp:
        res = run(Path(tmp), cfg, a.seeds)
    load_after = C.load_avg()
    summary = summarize_arms(res["rows"])
    payload = {
        "benchmark": NAME,
        "quick": a.quick,
        "machine": C.machine_info(),
        "load": C.load_record(load_before, load_after),
        "load_note": C.load_span_note(load_before, load_after),
        "config": cfg,
        "seeds": a.seeds,
        **res,
        "summary": summary,
        "verdict": verdict(summary),
        "wall_s": time.perf_counter() - t_start,
    }
    C.write_json(NAME, payload)
    md = markdown(payload)
    C.update_subsection(NAME, md, PARENT)
    print(md)
    return payload


if __name__ == "__main__":
    main()

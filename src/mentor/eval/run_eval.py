"""``mentor eval RUN_DIR``: what did the distillation give? Writes ``RUN_DIR/eval.json``.

For the teacher, the distilled student and (optionally) a student trained without the teacher:
task quality, fidelity to the teacher, calibration and cost, all on the held-out split, all
measured in one process so the speedups compare like with like.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from mentor._console import err as console
from mentor.eval import metrics as M
from mentor.eval.cost import machine, measure_cost
from mentor.models import model_outputs

TOPK = 5


def _classification(
    models: dict[str, nn.Module], data: Dataset, collate: Callable, num_classes: int | None
) -> dict[str, dict[str, Any]]:
    outs = {name: M.predict(m, data, collate=collate) for name, m in models.items()}
    res: dict[str, dict[str, Any]] = {}
    t_logits = outs["teacher"][0] if "teacher" in outs else None
    for name, (logits, labels) in outs.items():
        rel = M.reliability(logits, labels)
        r: dict[str, Any] = {
            "accuracy": M.accuracy(logits, labels),
            "macro_f1": M.macro_f1(logits, labels, num_classes),
            "ece": rel["ece"],
            "reliability": rel["curve"],
        }
        if num_classes:
            r["confusion"] = M.confusion(logits, labels, num_classes)
        if t_logits is not None:
            r["agreement"] = M.agreement(logits, t_logits)
            r["kl_teacher_student"] = M.mean_kl(t_logits, logits)
            r[f"top{TOPK}_overlap"] = M.topk_overlap(logits, t_logits, TOPK)
        res[name] = r
    return res


@torch.no_grad()
def _causal_lm(
    models: dict[str, nn.Module], data: Dataset, collate: Callable, batch_size: int = 8
) -> dict[str, dict[str, Any]]:
    """Token-level metrics, streamed batch by batch (full [N, T, V] logits never held)."""
    sums: dict[str, dict[str, float]] = {n: {} for n in models}
    for m in models.values():
        m.eval()
    for lo in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(lo, min(len(data), lo + batch_size))])
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        keep = (
            (mask[:, 1:] > 0) if mask is not None else torch.ones_like(ids[:, 1:], dtype=torch.bool)
        )
        y = ids[:, 1:][keep]
        logits = {n: model_outputs(m, batch)[:, :-1][keep].float() for n, m in models.items()}
        t = logits.get("teacher")
        for name, z in logits.items():
            s = sums[name]
            s["tokens"] = s.get("tokens", 0) + len(y)
            s["nll"] = s.get("nll", 0.0) + F.cross_entropy(z, y, reduction="sum").item()
            s["correct"] = s.get("correct", 0.0) + (z.argmax(-1) == y).sum().item()
            if t is not None:
                n = len(y)
                s["agree"] = s.get("agree", 0.0) + M.agreement(z, t) * n
                s["kl"] = s.get("kl", 0.0) + M.mean_kl(t, z) * n
                s["overlap"] = s.get("overlap", 0.0) + M.topk_overlap(z, t, TOPK) * n
    res = {}
    for name, s in sums.items():
        n = max(s["tokens"], 1)
        r = {
            "perplexity": math.exp(s["nll"] / n),
            "next_token_accuracy": s["correct"] / n,
            "tokens": int(s["tokens"]),
        }
        if "agree" in s:
            r.update(
                agreement=s["agree"] / n,
                kl_teacher_student=s["kl"] / n,
                **{f"top{TOPK}_overlap": s["overlap"] / n},
            )
        res[name] = r
    return res


def _embedding(
    models: dict[str, nn.Module], bundle: Any, collate: Callable
) -> dict[str, dict[str, Any]]:
    """Cosine to the teacher's embeddings and linear-probe accuracy on the labels."""
    from sklearn.linear_model import LogisticRegression

    res: dict[str, dict[str, Any]] = {}
    emb = {
        n: (M.predict(m, bundle.val, collate=collate), M.predict(m, bundle.train, collate=collate))
        for n, m in models.items()
    }
    t_val = emb["teacher"][0][0] if "teacher" in emb else None
    for name, ((ev, yv), (et, yt)) in emb.items():
        r: dict[str, Any] = {}
        if t_val is not None:
            r["cosine_to_teacher"] = F.cosine_similarity(ev, t_val, dim=-1).mean().item()
        if len(yv) and len(yt):
            clf = LogisticRegression(max_iter=2000).fit(et.numpy(), yt.numpy())
            r["linear_probe_accuracy"] = float(clf.score(ev.numpy(), yv.numpy()))
        res[name] = r
    return res


def evaluate_models(
    models: dict[str, nn.Module],
    bundle: Any,
    *,
    collate: Callable | None = None,
    measure: bool = True,
) -> dict[str, Any]:
    """Quality, fidelity, calibration and cost of named models on ``bundle.val``."""
    collate = collate or getattr(bundle, "collate", None) or default_collate
    task = bundle.info.task
    if task == "causal_lm":
        res = _causal_lm(models, bundle.val, collate)
    elif task == "embedding":
        res = _embedding(models, bundle, collate)
    else:
        res = _classification(models, bundle.val, collate, bundle.info.num_classes)
    if measure:
        for name, m in models.items():
            console.print(f"measuring latency and throughput: {name}")
            res[name]["cost"] = measure_cost(m, bundle.val, collate=collate)
    out: dict[str, Any] = {
        "task": task,
        "split": "val",
        "examples": len(bundle.val),
        "class_names": list(bundle.info.class_names),
        "machine": machine(),
        "models": res,
    }
    if measure and "teacher" in res:
        tc = res["teacher"]["cost"]
        out["speedup"] = {
            name: {
                "latency": tc["latency_ms"] / r["cost"]["latency_ms"],
                "throughput": r["cost"]["throughput_per_s"] / tc["throughput_per_s"],
                "size": tc["size_bytes"] / r["cost"]["size_bytes"],
            }
            for name, r in res.items()
            if name != "teacher"
        }
    return out


def evaluate_run(
    run_dir: str | Path,
    *,
    baseline: str | Path | None = None,
    data_overrides: list[str] | None = None,
    measure: bool = True,
) -> dict[str, Any]:
    """Evaluate a finished run (and optionally a label-only baseline run); write eval.json."""
    from mentor.run import load_run

    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    if data_overrides:
        loaded.bundle = _rebuild_data(loaded.cfg, data_overrides)
    models: dict[str, nn.Module] = {}
    if loaded.teacher is not None:
        models["teacher"] = loaded.teacher
    if baseline is not None:
        models["student_no_kd"] = load_run(baseline).student
    models["student"] = loaded.student
    result = evaluate_models(models, loaded.bundle, measure=measure)
    result["run"] = str(run_dir)
    result["name"] = loaded.cfg.name
    result["seed"] = loaded.cfg.train.seed
    if baseline is not None:
        result["baseline_run"] = str(baseline)
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(run_dir / "eval.json")
    return result


def _rebuild_data(cfg: Any, overrides: list[str]) -> Any:
    """The run's data with ``data.*`` overrides applied (tokenised as in training)."""
    from mentor.build import build_run_data
    from mentor.config import apply_overrides, validate

    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ValueError(f"--data overrides must start with 'data.', got {bad[0]!r}")
    return build_run_data(validate(apply_overrides(cfg.model_dump(mode="json"), overrides)))


def headline(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The few numbers a results table shows for one model of an eval result."""
    r = result["models"][name]
    row = {
        k: r[k]
        for k in (
            "accuracy",
            "macro_f1",
            "perplexity",
            "cosine_to_teacher",
            "linear_probe_accuracy",
            "agreement",
            "ece",
        )
        if k in r
    }
    if "cost" in r:
        row.update(
            params=r["cost"]["params"],
            size_mb=r["cost"]["size_bytes"] / 1e6,
            latency_ms=r["cost"]["latency_ms"],
            throughput_per_s=r["cost"]["throughput_per_s"],
        )
    sp = result.get("speedup", {}).get(name)
    if sp:
        row["speedup"] = sp["latency"]
    return row

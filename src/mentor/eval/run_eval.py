"""What did the distillation give? The measurements behind ``mentor eval RUN_DIR``.

For the teacher, the distilled student and (optionally) a student trained without the teacher:
task quality, fidelity to the teacher, calibration and cost, all on the held-out split, all
measured in one process so the speedups compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.data import default_collate

from mentor.eval.cost import SPARSE_FRACTION, machine, measure_cost
from mentor.eval.generation_metrics import generation_diagnostics, ids_as_text
from mentor.generation import SamplingConfig
from mentor.progress import Progress
from mentor.tasks import get_task, heldout


def evaluate_models(
    models: dict[str, nn.Module],
    bundle: Any,
    *,
    collate: Callable | None = None,
    measure: bool = True,
    progress: bool = True,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    max_prompts: int = 32,
) -> dict[str, Any]:
    """Quality, fidelity, calibration and cost of named models on ``bundle.val``.

    The metrics come from :func:`mentor.tasks.heldout`, the path training-time evaluation and
    ``final_metrics.json`` use too; cost is measured for every model in this one process.

    For a causal LM on prompt data (``bundle.info.extra["prompts"]``) with a ``teacher`` and at
    least one other model, each model also gets a ``generation`` block
    (:func:`mentor.eval.generation_metrics.generation_diagnostics`) computed on its own samples
    for the first ``max_prompts`` held-out prompts (0 = off), drawn with ``sampling``
    (default: :class:`SamplingConfig` defaults) from a generator seeded with ``seed``.
    """
    collate = collate or getattr(bundle, "collate", None) or default_collate
    task = bundle.info.task
    task_obj = get_task(task)
    res = heldout(
        task,
        models,
        bundle.val,
        collate=collate,
        batch_size=8 if task_obj.per_token else 256,
        num_classes=bundle.info.num_classes,
        train=bundle.train if task == "embedding" else None,
        label="held-out evaluation",
        progress=progress,
    )
    if measure:
        bar = Progress(len(models), enabled=progress, label="latency/throughput", unit="models")
        # throughput at the held-out batch: 8 sequences of a per-token task (each hundreds of
        # tokens), 64 examples otherwise
        tp = 8 if task_obj.per_token else 64
        for i, (name, m) in enumerate(models.items()):
            # cross-tokenizer data: the teacher runs on its own tokens of the text
            side = lambda items, name=name: task_obj.model_batch(name, collate(items))  # noqa: E731
            res[name]["cost"] = measure_cost(m, bundle.val, collate=side, throughput_batch=tp)
            bar.update(i + 1, {})
        bar.close()
    gen_settings = None
    if (
        task == "causal_lm"
        and bundle.info.extra.get("prompts")
        and "teacher" in models
        and len(models) > 1
        and max_prompts > 0
        and len(bundle.val) > 0
    ):
        sampling = sampling or SamplingConfig()
        n = min(int(max_prompts), len(bundle.val))
        items = [bundle.val[i] for i in range(n)]
        prompt_batches = [collate(items[lo : lo + 8]) for lo in range(0, n, 8)]
        decode = _decoder(bundle.info.tokenizer)
        blocks = generation_diagnostics(
            models,
            prompt_batches,
            sampling,
            seed=seed,
            pad_token_id=bundle.info.extra.get("pad_token_id"),
            decode=decode,
        )
        for name, block in blocks.items():
            res[name]["generation"] = block
        gen_settings = {
            "prompts": n,
            "seed": int(seed),
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "decoded": decode is not ids_as_text,
        }
    out: dict[str, Any] = {
        "task": task,
        "split": "val",
        "examples": len(bundle.val),
        "class_names": list(bundle.info.class_names),
        "machine": machine(),
        "models": res,
    }
    if gen_settings is not None:
        out["generation"] = gen_settings
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


def _decoder(tokenizer: str | None) -> Callable[[list[int]], str]:
    """Token ids -> text with the data's tokenizer (special tokens kept), else ids as text."""
    if not tokenizer:
        return ids_as_text
    from mentor.models.assets import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def headline(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The few numbers a results table shows for one model of an eval result."""
    r = result["models"][name]
    row = {
        k: r[k]
        for k in (
            "accuracy",
            "macro_f1",
            "perplexity",
            "bits_per_byte",
            "cosine_to_teacher",
            "linear_probe_accuracy",
            "agreement",
            "ece",
        )
        if k in r
    }
    if "cost" in r:
        row.update(params=r["cost"]["params"], size_mb=r["cost"]["size_bytes"] / 1e6)
        if (
            r["cost"].get("zero_fraction", 0.0) >= SPARSE_FRACTION
        ):  # a sparse model: zeros and zlib size
            row.update(
                sparsity=r["cost"]["zero_fraction"],
                compressed_mb=r["cost"]["compressed_bytes"] / 1e6,
            )
        row.update(
            latency_ms=r["cost"]["latency_ms"],
            throughput_per_s=r["cost"]["throughput_per_s"],
        )
    sp = result.get("speedup", {}).get(name)
    if sp:
        row["speedup"] = sp["latency"]
    return row

"""``mentor plan``: cost estimates for a recipe before anything runs.

Formulas (documented in ``docs/cache-format.md``; all are estimates):

* FLOPs per token (position): online KD ``2·N_t + 6·N_s`` (teacher forward + student forward
  and backward), cached KD ``6·N_s``.
* Cache bytes per position (uncompressed upper bound): top-k ``k·(4 + b) + b`` (int32 ids,
  ``b``-byte log-probs, one tail value), sampled ``N·(4 + 2) + 2`` (every draw distinct: int32
  id + uint16 count, plus the uint16 distinct-count), ``+ N·b`` with stored log-probs; ``b`` = 2
  for fp16/bf16, 4 for fp32. zstd usually makes the real files smaller.
* Peak logit memory of one micro-batch with ``R`` loss rows (``batch_size·(T-1)`` tokens for
  LMs, ``batch_size`` otherwise), ``V`` classes, fp32 (4 bytes), chunk ``c = min(chunk, R)``:
  plain ``3·R·V·4`` (student logits, saved log-softmax, logit gradient); chunked
  ``(2·R + 3·c)·V·4``; fused ``3·c·V·4`` (the student logits never exist). A dense online
  teacher adds ``R·V·4`` to each; a cached sparse teacher ``R·k·(8 + 4)``.
"""

from __future__ import annotations

from typing import Any

from mentor.cache.format import BYTES


def bytes_per_position(
    top_k: int, samples: int, dtype: str = "fp16", *, sampled_logprobs: bool = False
) -> float:
    """Uncompressed upper bound of cache bytes per position for the chosen k / N."""
    b = BYTES[dtype]
    n = 0.0
    if top_k:
        n += top_k * (4 + b) + b
    if samples:
        n += samples * (4 + 2 + (b if sampled_logprobs else 0)) + 2
    return n


def estimate(
    *,
    recipe: str,
    teacher_parameters: int | None,
    student_parameters: int,
    positions_per_example: int,
    train_examples: int,
    classes: int,
    batch_size: int,
    chunk_size: int | None = None,
    top_k: int = 32,
    samples: int = 0,
    dtype: str = "fp16",
) -> dict[str, Any]:
    """Parameter counts, FLOPs per token, cache size and peak logit memory (formulas above)."""
    n_t, n_s, t_len, v = teacher_parameters, student_parameters, positions_per_example, classes
    per_token = t_len > 1
    rows = batch_size * (t_len - 1) if per_token else batch_size
    c = min(chunk_size or 1024, rows)
    f4 = 4
    plain = 3 * rows * v * f4
    chunked = (2 * rows + 3 * c) * v * f4
    fused = 3 * c * v * f4
    dense_teacher = rows * v * f4
    sparse_teacher = rows * top_k * 12 if top_k else rows * max(samples, 1) * 16
    bpp = bytes_per_position(top_k, samples, dtype)
    online = (2 * n_t + 6 * n_s) if n_t is not None else None
    return {
        "recipe": recipe,
        "teacher_parameters": n_t,
        "student_parameters": n_s,
        "flops_per_token_online": online,
        "flops_per_token_cached": 6 * n_s,
        "cached_speedup": online / (6 * n_s) if online else None,
        "positions_per_example": t_len,
        "train_examples": train_examples,
        "train_positions": train_examples * t_len,
        "classes": v,
        "top_k": top_k,
        "samples": samples,
        "dtype": dtype,
        "cache_bytes_per_token": bpp,
        "cache_total_bytes": bpp * train_examples * t_len,
        "loss_rows_per_micro_batch": rows,
        "chunk_size": c,
        "logit_memory_bytes": {
            "plain": plain,
            "chunked": chunked,
            "fused": fused,
            "dense_online_teacher_extra": dense_teacher,
            "cached_sparse_teacher_extra": sparse_teacher,
        },
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _num(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def plan_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    """The plan as (quantity, value) rows for printing."""
    m = p["logit_memory_bytes"]
    unit = "token" if p["positions_per_example"] > 1 else "example"
    speed = f"{p['cached_speedup']:.2f}x" if p["cached_speedup"] else "-"
    return [
        ("teacher parameters (N_t)", _num(p["teacher_parameters"])),
        ("student parameters (N_s)", _num(p["student_parameters"])),
        (f"FLOPs/{unit} online KD (2N_t + 6N_s)", _num(p["flops_per_token_online"])),
        (f"FLOPs/{unit} cached KD (6N_s)", f"{_num(p['flops_per_token_cached'])} ({speed})"),
        (
            "training set",
            f"{p['train_examples']:,} examples x {p['positions_per_example']} positions",
        ),
        (
            f"cache bytes/{unit} (top-k {p['top_k']}, samples {p['samples']}, {p['dtype']})",
            f"<= {p['cache_bytes_per_token']:.0f} B",
        ),
        ("cache total size (upper bound)", _size(p["cache_total_bytes"])),
        (
            f"peak logit memory, plain ({p['loss_rows_per_micro_batch']:,} rows x "
            f"{p['classes']:,} classes)",
            _size(m["plain"]),
        ),
        (f"peak logit memory, chunked (chunk {p['chunk_size']})", _size(m["chunked"])),
        ("peak logit memory, fused", _size(m["fused"])),
        ("+ dense online teacher logits", _size(m["dense_online_teacher_extra"])),
        ("+ cached sparse teacher signal", _size(m["cached_sparse_teacher_extra"])),
    ]

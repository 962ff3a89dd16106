"""Scaling: step time and peak memory of mentor's loss and engine step as V and T grow.

Cases, each in its own fresh subprocess (peak RSS = that process's ``ru_maxrss`` growth over
its RSS once inputs/models exist):

- ``loss`` / ``loss_chunked``: forward + backward of ``forward_kl`` on student logits
  ``[1, T, V]`` (requires grad) against dense teacher logits, plain and with ``chunk_size``
  (about 2^22 logits per chunk);
- ``engine`` / ``engine_chunked``: one ``Distiller`` step (teacher forward, student forward and
  backward, AdamW) of the tiny Llama pair of ``engine_overhead`` (teacher 4 layers / hidden 256,
  student 2 layers / hidden 128) with vocabulary V on one sequence of T tokens, forward KL plain
  or chunked.

V in {8k, 32k, 49k, 128k}, T in {128, 512, 2048}, batch 1. A case whose estimated peak exceeds
``--max-gb`` (8 GB) is skipped and listed. Time = median of the timed repeats after one
warm-up (min-max reported).

    .venv/bin/python -m benchmarks.scaling [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

VOCABS = [8192, 32768, 49152, 131072]
SEQS = [128, 512, 2048]
KINDS = ["loss", "loss_chunked", "engine", "engine_chunked"]
CHUNK_LOGITS = 2**22
# Estimated peak growth in bytes per logit of [T, V] (about 10 float32 copies for the plain
# loss, measured at V=32k, T=128; a gradient buffer plus one chunk when chunked), plus model
# bytes for the engine (weights, student gradients, AdamW moments).
BYTES_PER_LOGIT = {"loss": 44, "loss_chunked": 16, "engine": 60, "engine_chunked": 40}


def chunk_rows(v: int) -> int:
    """Rows per chunk so one chunk holds about 2^22 logits."""
    return max(1, CHUNK_LOGITS // v)


def estimate_gb(kind: str, v: int, t: int) -> float:
    """Rough peak memory of a case (GB), to skip those that would not fit."""
    extra = 0.0
    if kind.startswith("engine"):
        params = v * 256 * 2 + v * 128 * 2 + 8e6  # embeddings + heads of both models
        extra = params * 4 * 3  # weights, student grads, AdamW moments (upper bound)
    return (BYTES_PER_LOGIT[kind] * t * v + extra) / 1e9


def child_loss(v: int, t: int, chunked: bool, repeats: int) -> dict[str, Any]:
    """Forward + backward of forward_kl on [1, T, V] logits; times and memory."""
    from mentor.losses import forward_kl

    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, t, v, generator=g).requires_grad_(True)
    te = torch.randn(1, t, v, generator=g)
    kw = {"chunk_size": chunk_rows(v)} if chunked else {}
    base = C.current_rss_mib()
    peak0 = C.peak_rss_mib()
    times, value = [], 0.0
    for _ in range(repeats + 1):
        s.grad = None
        t0 = time.perf_counter()
        loss = forward_kl(s, te, **kw)
        loss.backward()
        times.append(time.perf_counter() - t0)
        value = float(loss)
    return {
        "times": times[1:],
        "value": value,
        "rss_base_mib": base,
        "peak_growth_mib": max(0.0, C.peak_rss_mib() - max(base, peak0)),
    }


def child_engine(v: int, t: int, chunked: bool, repeats: int) -> dict[str, Any]:
    """Distiller steps of the tiny Llama pair with vocabulary v on one T-token sequence."""

    from benchmarks.engine_overhead import llama
    from mentor.config import load_config
    from mentor.data.text import TokenBlocks
    from mentor.engine import Distiller
    from mentor.losses import Objective
    from mentor.teachers import OnlineTeacher

    teacher = llama(4, 256, 1, vocab=v, seq=t).eval()
    student = llama(2, 128, 2, vocab=v, seq=t)
    steps = repeats + 1
    ids = torch.randint(0, v, (steps, t), generator=torch.Generator().manual_seed(0))
    term: dict[str, Any] = {"loss": "forward_kl", "weight": 1.0}
    if chunked:
        term["chunk_size"] = chunk_rows(v)

    class Clock:
        def __init__(self) -> None:
            self.stamps = [time.perf_counter()]
            self.loss = 0.0

        def on_step_end(self, _d: Any, _s: int, values: dict[str, float]) -> None:
            self.stamps.append(time.perf_counter())
            self.loss = values["loss"]

    base = C.current_rss_mib()
    peak0 = C.peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            {
                "objective": {"fkl": term},
                "train": {
                    "max_steps": steps,
                    "batch_size": 1,
                    "lr": 1e-4,
                    "schedule": "constant",
                    "log_every": 1,
                    "progress": False,
                },
                "output": {"dir": tmp, "overwrite": True},
            }
        )
        clock = Clock()
        Distiller(
            student,
            OnlineTeacher(teacher),
            Objective(cfg.objective),
            TokenBlocks(ids, torch.arange(steps)),
            cfg,
            task="causal_lm",
            callbacks=[clock],
        ).fit()
    times = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:])]
    return {
        "times": times[1:],
        "value": clock.loss,
        "rss_base_mib": base,
        "peak_growth_mib": max(0.0, C.peak_rss_mib() - max(base, peak0)),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Time and peak memory against V·T (log-log), one line per case kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind in KINDS:
        rs = sorted((r for r in rows if r["kind"] == kind and "time_s" in r), key=lambda r: r["vt"])
        if not rs:
            continue
        x = [r["vt"] for r in rs]
        axes[0].plot(x, [r["time_s"]["median"] for r in rs], "o-", label=kind)
        axes[1].plot(x, [r["peak_growth_mib"] for r in rs], "o-", label=kind)
    for ax, ylabel in zip(axes, ["step time, s (median)", "peak RSS growth, MiB"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("V · T (logits per sequence)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    return C.save_figure(fig, path)


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs/benchmarks.md section."""
    rows = p["rows"]
    lines = [
        "## Scaling with vocabulary and sequence length",
        "",
        "Forward + backward of `forward_kl` on `[1, T, V]` float32 logits (plain, and chunked "
        f"at about 2²² logits per chunk), and one `Distiller` step of the tiny Llama pair "
        "(teacher 4 layers / hidden 256 → student 2 layers / hidden 128, AdamW, batch 1) with "
        "vocabulary V, forward KL plain or chunked. Each case in a fresh subprocess; time = "
        f"median of {p['config']['repeats']} timed repeats after one warm-up; peak = growth of "
        "`ru_maxrss` over the process's RSS once inputs and models exist (for the engine this "
        "includes gradients, AdamW state and activations). Cases estimated above "
        f"{p['config']['max_gb']:g} GB are skipped.",
        "",
        "| V | T | V·T | loss s | loss MiB | chunked s | chunked MiB | engine s | engine MiB "
        "| engine chunked s | engine chunked MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["vocab"], r["seq"]) for r in rows})
    for v, t in keys:
        cells = []
        for kind in KINDS:
            r = next((x for x in rows if (x["vocab"], x["seq"], x["kind"]) == (v, t, kind)), None)
            if r is None:
                cells += ["–", "–"]
            elif "time_s" in r:
                cells += [f"{r['time_s']['median']:.3f}", f"{r['peak_growth_mib']:,.0f}"]
            else:
                cells += [r.get("skipped", "failed"), ""]
        lines.append(f"| {v:,} | {t:,} | {v * t:,} | " + " | ".join(cells) + " |")
    fits = p.get("fits", {})
    if fits:
        lines += [
            "",
            "Growth exponents (least-squares slope of log time / log memory against log V·T): "
            + "; ".join(
                f"{k} time ×(V·T)^{f['time']:.2f}, memory ×(V·T)^{f['mem']:.2f}"
                for k, f in fits.items()
            )
            + ".",
        ]
    if img:
        lines += ["", f"![scaling]({img})"]
    lines += [
        "",
        C.machine_line(p["machine"])
        + p.get("load_note", "")
        + f" Whole benchmark {p['total_s'] / 60:.1f} min. Regenerate with "
        "`.venv/bin/python -m benchmarks.scaling`.",
    ]
    return "\n".join(lines)


def fit_exponents(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Slope of log(time) and log(memory) against log(V·T) per kind (>= 3 points)."""
    import math

    out = {}
    for kind in KINDS:
        rs = [r for r in rows if r["kind"] == kind and "time_s" in r and r["peak_growth_mib"] > 0]
        if len(rs) < 3:
            continue
        x = [math.log(r["vt"]) for r in rs]
        res = {}
        for key, ys in (
            ("time", [math.log(r["time_s"]["median"]) for r in rs]),
            ("mem", [math.log(r["peak_growth_mib"]) for r in rs]),
        ):
            mx, my = statistics.mean(x), statistics.mean(ys)
            sxx = sum((a - mx) ** 2 for a in x)
            res[key] = sum((a - mx) * (b - my) for a, b in zip(x, ys)) / sxx if sxx else 0.0
        out[kind] = res
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run every case in a subprocess; write JSON, plot and the docs section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="V in {8k, 32k}, T=128, 1 repeat")
    ap.add_argument("--vocabs", type=int, nargs="*", default=VOCABS)
    ap.add_argument("--seqs", type=int, nargs="*", default=SEQS)
    ap.add_argument("--kinds", nargs="*", default=KINDS, choices=KINDS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "V", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        kind, v, t = a.child[0], int(a.child[1]), int(a.child[2])
        fn = child_loss if kind.startswith("loss") else child_engine
        res = fn(v, t, kind.endswith("chunked"), a.repeats)
        Path(a.json_out).write_text(json.dumps(res))
        return None
    if a.quick:
        C.use_quick_outputs()
        a.vocabs, a.seqs, a.repeats = [8192, 32768], [128], 1
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for t in a.seqs:
        for v in a.vocabs:
            for kind in a.kinds:
                row: dict[str, Any] = {"kind": kind, "vocab": v, "seq": t, "vt": v * t}
                est = estimate_gb(kind, v, t)
                row["estimate_gb"] = est
                if est > a.max_gb:
                    row["skipped"] = f"skipped (~{est:.0f} GB)"
                    print(f"{kind:<15} V={v:>6} T={t:>5}: skipped (estimated {est:.1f} GB)")
                    rows.append(row)
                    continue
                args = ["--child", kind, str(v), str(t), "--repeats", str(a.repeats)]
                res = C.run_child("benchmarks.scaling", args, timeout=a.timeout)
                if "error" in res:
                    row["error"] = res["error"]
                    print(f"{kind:<15} V={v:>6} T={t:>5}: {res['error']}", flush=True)
                else:
                    row.update(
                        time_s=C.summarize(res["times"]),
                        peak_growth_mib=res["peak_growth_mib"],
                        rss_base_mib=res["rss_base_mib"],
                        value=res["value"],
                    )
                    print(
                        f"{kind:<15} V={v:>6} T={t:>5}: {row['time_s']['median']:.3f} s, "
                        f"+{row['peak_growth_mib']:.0f} MiB",
                        flush=True,
                    )
                rows.append(row)
    payload = {
        "machine": C.machine_info(),
        "load_note": C.load_note(),
        "config": {
            "vocabs": a.vocabs,
            "seqs": a.seqs,
            "repeats": a.repeats,
            "max_gb": a.max_gb,
            "chunk_logits": CHUNK_LOGITS,
            "quick": a.quick,
        },
        "rows": rows,
        "fits": fit_exponents(rows),
        "total_s": time.perf_counter() - t_start,
    }
    C.publish("scaling", payload, markdown, lambda path: plot(rows, path))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])

"""LM distillation step: mentor vs TRL's ``GKDTrainer`` on the same models, data and optimizer.

GKD with ``lmbda=0`` (no on-policy generation) and ``seq_kd=False`` is plain token-level
distillation on the given sequences: TRL ``beta=0`` is forward KL (mentor ``forward_kl``) and
``beta=0.5`` the generalized JSD (mentor ``jsd`` with ``beta=0.5``; same mixture convention,
``M = beta p_T + (1-beta) p_S``, see docs/losses.md). Pairs: (a) random tiny Llama teacher
(4 layers, hidden 256) -> student (2 layers, hidden 128), vocab 49,152, random tokens; (b)
SmolLM2-135M -> 6-layer layer-drop copy (blocks 0,6,12,18,24,29) on BBC News blocks, built
with mentor's own model loader, student builder and data source. Batch 8 x 128 tokens, AdamW
fp32 (``torch.optim.AdamW``, not fused, on both sides), constant LR, gradient clipping 1.0.

Sides, each in its own fresh subprocess (so ``ru_maxrss`` is that side's peak), alternating:
``trl`` (GKDTrainer), ``mentor`` (Distiller + online teacher), ``mentor_chunked`` (same, loss
``chunk_size=256``), ``mentor_cached`` (Distiller + top-32 teacher cache written by
``mentor.cache.write_cache``; the teacher is not loaded) and ``mentor_fused`` (Distiller with
``train.fused_loss_chunk``: the loss is computed from hidden states + output head in chunks).
The first batch's loss (a warm-up step) must agree between TRL and every online mentor side.

    .venv/bin/python -m benchmarks.trl_compare [--quick] [--pairs tiny real] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C

BATCH, SEQ, VOCAB = 8, 128, 49_152
KEEP = [0, 6, 12, 18, 24, 29]
CHUNK = 256
TOP_K = 32
LOSSES: dict[str, dict[str, Any]] = {
    "forward_kl": {"trl_beta": 0.0, "mentor": ("forward_kl", {})},
    "jsd": {"trl_beta": 0.5, "mentor": ("jsd", {"beta": 0.5})},
}
SIDES = ["trl", "mentor", "mentor_chunked", "mentor_cached", "mentor_fused"]
LABELS = {
    "trl": "TRL GKDTrainer",
    "mentor": "mentor Distiller",
    "mentor_chunked": f"mentor Distiller, chunked loss ({CHUNK} rows)",
    "mentor_cached": f"mentor Distiller, cached top-{TOP_K} teacher",
    "mentor_fused": f"mentor Distiller, fused head + loss ({CHUNK} rows)",
}
ONLINE = ("mentor", "mentor_chunked", "mentor_fused")


# ----------------------------------------------------------------------------- preparation


def prepare(pair: str, n: int, root: Path) -> dict[str, Any]:
    """Save teacher, student, tokenizer and ``n`` token blocks under ``root``; write the cache."""
    from mentor.cache import CacheSettings, write_cache
    from mentor.data.text import TokenBlocks
    from mentor.models.assets import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")  # TRL needs a tokenizer (pad id); vocab 49,152
    if pair == "tiny":
        from benchmarks.engine_overhead import llama

        teacher, student = llama(4, 256, seed=1).eval(), llama(2, 128, seed=2)
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))
        desc = "random tiny Llama 4 layers/hidden 256 → 2 layers/hidden 128, random tokens"
    else:
        from mentor.data import build_data
        from mentor.students import build_model

        params = {"corpus": "bbc_news", "block_size": SEQ, "max_blocks": math.ceil(n / 0.9) + 2}
        bundle = build_data("lm_text", params, 0.1, 0, tokenizer="smollm2-135m-instruct")
        ids = bundle.train.blocks[:n]
        teacher = build_model("hf_causal_lm", {"model": "smollm2-135m-instruct"}, bundle.info)
        student = build_model("layer_drop", {"layers": KEEP}, bundle.info, teacher)
        desc = "SmolLM2-135M-Instruct → 6-layer layer-drop copy (blocks 0,6,12,18,24,29), BBC News"
    if len(ids) < n:
        raise SystemExit(f"{pair}: only {len(ids)} blocks of {SEQ} tokens, need {n}")
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "tok")
    torch.save(ids.clone(), root / "ids.pt")
    t0 = time.perf_counter()
    manifest = write_cache(
        teacher,
        {"train": TokenBlocks(ids, torch.arange(n))},
        root / "cache",
        CacheSettings(top_k=TOP_K, batch_size=BATCH),
        task="causal_lm",
        progress=False,
    )
    return {
        "description": desc,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "cache_write_s": time.perf_counter() - t0,
        "cache_bytes_per_token": manifest["totals"]["bytes_per_token"],
    }


# ----------------------------------------------------------------------------- worker


def _order(n: int, seed: int) -> torch.Tensor:
    """The Distiller's sample order for epoch 0 (TRL gets the data in this order)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003))


def _load(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def run_trl(root: Path, loss: str, steps: int, lr: float, seed: int) -> dict[str, Any]:
    """GKDTrainer, lmbda=0, seq_kd=False; data in the Distiller's order, sequential sampler."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Trainer(GKDTrainer):
        losses: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    class Clock(TrainerCallback):
        stamps: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        x = torch.tensor([r["input_ids"] for r in rows])
        labels = x.clone()
        labels[:, 0] = -100  # never predicted: the count of positions is B*(T-1) either way
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}

    ids = torch.load(root / "ids.pt")[: steps * BATCH]
    data = datasets.Dataset.from_dict({"input_ids": ids[_order(len(ids), seed)].tolist()})
    tok = AutoTokenizer.from_pretrained(root / "tok")
    student, teacher = _load(root / "student"), _load(root / "teacher")
    before = C.current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GKDConfig(
            output_dir=tmp,
            lmbda=0.0,
            beta=LOSSES[loss]["trl_beta"],
            seq_kd=False,
            temperature=1.0,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",  # TRL's default on torch>=2.8 is the fused AdamW
            bf16=False,  # SFTConfig defaults to bf16 autocast and gradient checkpointing:
            gradient_checkpointing=False,  # off, so both sides compute the same fp32 step
            train_sampling_strategy="sequential",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_pin_memory=False,
            seed=seed,
        )
        clock = Clock()
        trainer = Trainer(
            model=student,
            teacher_model=teacher,
            args=cfg,
            data_collator=collate,
            train_dataset=data,
            processing_class=tok,
            callbacks=[clock],
        )
        trainer.train()
    times = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:])]
    return {"times": times, "losses": trainer.losses, "rss_before_train_mib": before}


def run_mentor(
    root: Path, loss: str, steps: int, lr: float, seed: int, side: str
) -> dict[str, Any]:
    """mentor's Distiller: online teacher (plain, chunked or fused loss) or the top-k cache."""
    from mentor.cache import open_store
    from mentor.config import load_config
    from mentor.data.text import TokenBlocks
    from mentor.engine import Distiller
    from mentor.losses import Objective
    from mentor.teachers import CachedTeacher, OnlineTeacher

    class Clock:
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, _d: Any, _step: int, values: dict[str, float]) -> None:
            self.stamps.append(time.perf_counter())
            self.losses.append(values["loss"])

    name, hp = LOSSES[loss]["mentor"]
    term = {"weight": 1.0, "loss": name, **hp}
    if side == "mentor_chunked":
        term["chunk_size"] = CHUNK
    ids = torch.load(root / "ids.pt")[: steps * BATCH]
    data = TokenBlocks(ids, torch.arange(len(ids)))
    student = _load(root / "student")
    if side == "mentor_cached":
        teacher = CachedTeacher(open_store(root / "cache"))
    else:
        teacher = OnlineTeacher(_load(root / "teacher"))
    before = C.current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            {
                "objective": {"kd_term": term},
                "train": {
                    "max_steps": steps,
                    "batch_size": BATCH,
                    "lr": lr,
                    "schedule": "constant",
                    "weight_decay": 0.0,
                    "grad_clip": 1.0,
                    "seed": seed,
                    "log_every": 1,
                    "progress": False,
                    "fused_loss_chunk": CHUNK if side == "mentor_fused" else None,
                },
                "output": {"dir": tmp, "overwrite": True},
            }
        )
        clock = Clock()
        d = Distiller(
            student,
            teacher,
            Objective(cfg.objective),
            data,
            cfg,
            task="causal_lm",
            callbacks=[clock],
            save_student=lambda m, folder: m.save_pretrained(folder),
        )
        clock.stamps.append(time.perf_counter())
        d.fit()
    times = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:])]
    return {"times": times, "losses": clock.losses, "rss_before_train_mib": before}


def worker(args: argparse.Namespace) -> None:
    """One side in this (fresh) process: train, then write times, losses and RSS as JSON."""
    root = Path(args.root)
    if args.side == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import trl  # noqa: F401  (imports count towards the side's memory)

        out = run_trl(root, args.loss, args.steps, args.lr, args.seed)
    else:
        import mentor  # noqa: F401

        out = run_mentor(root, args.loss, args.steps, args.lr, args.seed, args.side)
    out["peak_rss_mib"] = C.peak_rss_mib()
    out["threads"] = torch.get_num_threads()
    Path(args.json_out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- parent


def _agree(a: float, b: float, rtol: float = 1e-4) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-7


def compare(
    pair: str, root: Path, losses: list[str], sides: list[str], a: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every side for every loss: alternating fresh subprocesses, equal-loss check, summary."""
    rows = []
    steps = a.warm + a.steps
    tokens = BATCH * (SEQ - 1)
    for loss in losses:
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for r in range(a.rounds):
            order = sides if r % 2 == 0 else sides[::-1]  # alternate who goes first
            for side in order:
                argv = ["--worker", side, "--root", str(root), "--loss", loss]
                argv += ["--steps", str(steps), "--lr", str(a.lr), "--seed", str(a.seed)]
                t0 = time.perf_counter()
                res = C.run_child("benchmarks.trl_compare", argv, timeout=a.timeout)
                res["wall_s"] = time.perf_counter() - t0
                runs[side].append(res)
                msg = res.get("error") or (
                    f"median step {statistics.median(res['times'][a.warm :]):.3f} s, "
                    f"peak RSS {res['peak_rss_mib']:.0f} MiB, loss₁ {res['losses'][0]:.6f}"
                )
                print(f"[{pair}/{loss}] round {r + 1} {side:<15} {msg}", flush=True)
        ref = runs["trl"][0] if "trl" in runs else None
        ref_loss = ref["losses"][0] if ref and "error" not in ref else None
        trl_tps = trl_rss = None
        for side in sides:
            ok_runs = [x for x in runs[side] if "error" not in x]
            row: dict[str, Any] = {"pair": pair, "loss": loss, "side": side}
            if not ok_runs:
                row["error"] = runs[side][0]["error"]
                rows.append(row)
                continue
            first = ok_runs[0]["losses"][0]
            check = None
            if side in ONLINE and ref_loss is not None:
                check = _agree(first, ref_loss)
            times = [t for x in ok_runs for t in x["times"][a.warm :]]
            s = C.summarize(times)
            peak = max(x["peak_rss_mib"] for x in ok_runs)
            row.update(
                step_s=s,
                tokens_per_s=tokens / s["median"],
                peak_rss_mib=peak,
                rss_before_train_mib=max(x["rss_before_train_mib"] for x in ok_runs),
                first_loss=first,
                loss_matches_trl=check,
                runs=len(ok_runs),
                wall_s=sum(x["wall_s"] for x in runs[side]),
            )
            if check is False:
                row["error"] = f"first-batch loss {first:.6f} ≠ TRL {ref_loss:.6f}: not compared"
            if side == "trl":
                trl_tps, trl_rss = row["tokens_per_s"], peak
            rows.append(row)
        for row in rows:
            if row["loss"] == loss and row["pair"] == pair and "step_s" in row and trl_tps:
                row["speed_vs_trl"] = row["tokens_per_s"] / trl_tps
                row["rss_vs_trl"] = row["peak_rss_mib"] / trl_rss
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    """The issue's targets, per pair and loss (None when a side is missing)."""
    out: dict[str, bool | None] = {}
    for r in rows:
        if "error" in r or "speed_vs_trl" not in r:
            continue
        key = f"{r['pair']}/{r['loss']}"
        if r["side"] == "mentor":
            out[f"{key}: mentor ≥1.3× TRL tokens/s"] = r["speed_vs_trl"] >= 1.3
            out[f"{key}: mentor ≤0.6× TRL peak RSS"] = r["rss_vs_trl"] <= 0.6
        if r["side"] == "mentor_cached" and r["pair"] == "real":
            out[f"{key}: cached ≥2× TRL tokens/s"] = r["speed_vs_trl"] >= 2.0
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Bars of tokens/s and peak RSS per side, one group per pair/loss."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({(r["pair"], r["loss"]) for r in rows})
    sides = [s for s in SIDES if any(r["side"] == s for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(sides))
    for j, side in enumerate(sides):
        tps, rss, lo, hi = [], [], [], []
        for g in groups:
            r = next((x for x in rows if (x["pair"], x["loss"]) == g and x["side"] == side), None)
            ok = r is not None and "step_s" in r and "error" not in r
            tps.append(r["tokens_per_s"] if ok else 0)
            rss.append(r["peak_rss_mib"] if ok else 0)
            if ok:
                toks = BATCH * (SEQ - 1)
                lo.append(r["tokens_per_s"] - toks / r["step_s"]["max"])
                hi.append(toks / r["step_s"]["min"] - r["tokens_per_s"])
            else:
                lo.append(0)
                hi.append(0)
        xs = [i + j * width for i in range(len(groups))]
        axes[0].bar(xs, tps, width, yerr=[lo, hi], capsize=2, label=LABELS[side])
        axes[1].bar(xs, rss, width, label=LABELS[side])
    for ax, title in zip(axes, ["trained tokens/s (median, min–max)", "peak RSS (MiB)"]):
        ax.set_xticks([i + width * (len(sides) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{p}\n{loss}" for p, loss in groups])
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    return C.save_figure(fig, path)


def markdown(p: dict[str, Any], img: str | None) -> str:
    """The docs/benchmarks.md section."""
    a = p["config"]
    lines = [
        "## LM distillation step vs TRL (GKDTrainer)",
        "",
        "TRL `trl.experimental.gkd.GKDTrainer` "
        f"(trl {p['versions'].get('trl')}, transformers {p['versions'].get('transformers')}) with "
        "`lmbda=0`, `seq_kd=False` vs mentor on identical models, data (same order) and "
        f"optimizer: batch {BATCH} × {SEQ} tokens ({BATCH * (SEQ - 1)} trained positions), "
        f"`torch.optim.AdamW` fp32 (lr {a['lr']:g}, no weight decay, constant), gradient "
        "clipping 1.0, logging every step on both sides; TRL's `SFTConfig` defaults of bf16 "
        "autocast and gradient checkpointing are turned off so both sides compute the same fp32 "
        "step (and the default fused AdamW is replaced by the same `adamw_torch`). Forward KL = TRL `beta=0` ↔ mentor "
        "`forward_kl`; JSD = TRL `beta=0.5` ↔ mentor `jsd` β=0.5 (same mixture convention). "
        f"Each side runs in its own fresh subprocess ({a['rounds']} round(s), sides alternating "
        f"order), {a['warm']} warm-up + {a['steps']} timed steps; step time = interval between "
        "consecutive step ends (data, teacher, student, loss, backward, clipping, optimizer, "
        "logging). Peak RSS = the subprocess's `ru_maxrss` (libraries, both models, optimizer "
        "state and activations); *before* = RSS once models and data are loaded, before the "
        "first step (safetensors weights are memory-mapped, so not all resident yet). The first "
        "batch's loss (a warm-up step) must agree with TRL's to 1e-4 for every online mentor "
        "side, otherwise the side is rejected. The cached side reads top-32 teacher "
        "log-probs (fp16) from a `mentor.cache` store and never loads the teacher; its loss "
        "is against that sparse signal, so it is not expected to equal TRL's. The fused side "
        "is the Distiller with `train.fused_loss_chunk` (student and teacher hidden states + "
        "output heads → logits and loss chunk by chunk: neither model's `[B, T, V]` logits "
        "exist). The plain mentor side computes the loss with closed-form gradients chunk by "
        "chunk (no autograd graph over `[B, T, V]`).",
        "",
    ]
    for pair, info in p["pairs"].items():
        lines += [
            f"**{pair}**: {info['description']} (teacher {info['teacher_params'] / 1e6:.1f}M, "
            f"student {info['student_params'] / 1e6:.1f}M params; cache written in "
            f"{info['cache_write_s']:.1f} s, {info['cache_bytes_per_token']:.0f} bytes/token).",
            "",
        ]
        for loss in p["config"]["losses"]:
            rs = [r for r in p["rows"] if r["pair"] == pair and r["loss"] == loss]
            if not rs:
                continue
            lines += [
                f"*{pair}, {loss}*",
                "",
                "| side | step s median (min–max) | tokens/s | × TRL | peak RSS MiB "
                "(before) | × TRL | first-batch loss |",
                "|---|---|---:|---:|---:|---:|---|",
            ]
            for r in rs:
                if "step_s" not in r:
                    lines.append(f"| {LABELS[r['side']]} | failed: {r['error'][:120]} | | | | | |")
                    continue
                s = r["step_s"]
                chk = {True: " ✓", False: " ✗", None: ""}[r["loss_matches_trl"]]
                lines.append(
                    f"| {LABELS[r['side']]} | {s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f}) "
                    f"| {r['tokens_per_s']:,.0f} | {r.get('speed_vs_trl', float('nan')):.2f} "
                    f"| {r['peak_rss_mib']:,.0f} ({r['rss_before_train_mib']:,.0f}) "
                    f"| {r.get('rss_vs_trl', float('nan')):.2f} | {r['first_loss']:.6f}{chk} |"
                )
            lines.append("")
    t = p["targets"]
    if t:
        lines += ["Targets: " + "; ".join(f"{k} {'✓' if v else '✗'}" for k, v in t.items()) + "."]
        lines.append("")
    if img:
        lines += [f"![mentor vs TRL]({img})", ""]
    lines += [
        C.machine_line(p["machine"])
        + p.get("load_note", "")
        + f" Whole benchmark {p['total_s'] / 60:.1f} min. Regenerate with "
        "`.venv/bin/python -m benchmarks.trl_compare`."
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Prepare each pair, run every side, check equal inputs, write JSON, plot and docs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny pair, 2 steps, outputs to quick/")
    ap.add_argument("--pairs", nargs="*", default=["tiny", "real"], choices=["tiny", "real"])
    ap.add_argument("--losses", nargs="*", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--sides", nargs="*", default=SIDES, choices=SIDES)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per side")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--loss", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.side = a.worker
        worker(a)
        return None
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    import transformers

    if a.quick:
        C.use_quick_outputs()
        a.pairs, a.losses, a.warm, a.steps = ["tiny"], ["forward_kl"], 1, 1
    if "trl" not in a.sides:
        a.sides = ["trl", *a.sides]
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    pairs: dict[str, Any] = {}
    for pair in a.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pairs[pair] = prepare(pair, (a.warm + a.steps) * BATCH, Path(tmp))
            print(f"[{pair}] prepared in {time.perf_counter() - t0:.0f} s", flush=True)
            rows += compare(pair, Path(tmp), a.losses, a.sides, a)
    payload = {
        "machine": C.machine_info(),
        "load_note": C.load_note(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "config": {
            "warm": a.warm,
            "steps": a.steps,
            "rounds": a.rounds,
            "lr": a.lr,
            "batch": BATCH,
            "seq": SEQ,
            "losses": a.losses,
            "sides": a.sides,
            "chunk": CHUNK,
            "top_k": TOP_K,
            "quick": a.quick,
        },
        "pairs": pairs,
        "rows": rows,
        "targets": targets(rows),
        "total_s": time.perf_counter() - t_start,
    }
    C.publish("trl_compare", payload, markdown, lambda path: plot(rows, path))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])

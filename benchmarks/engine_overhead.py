"""Engine overhead: mentor's Distiller vs a hand-written minimal PyTorch KD loop.

Same models (tiny Llama teacher 4 layers / hidden 256 -> student 2 layers / hidden 128,
vocab 49,152), same data (8 x 128 random tokens per step), same optimizer (AdamW, fp32), same
loss (forward KL at temperature 1). Both sides run in this process, alternating rounds; the
first step's loss must agree before anything is timed. Also reports KD-MFU: the share of the
machine's measured fp32 matmul FLOP/s that the step achieves,
(6·N_student + 2·N_teacher)·tokens/s ÷ peak.

    .venv/bin/python -m benchmarks.engine_overhead [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from benchmarks._common import machine_info, machine_line, summarize, update_section, write_json
from mentor.config import load_config
from mentor.engine import Distiller
from mentor.losses import Objective
from mentor.teachers import OnlineTeacher

VOCAB, SEQ, BATCH = 49_152, 128, 8


def llama(
    layers: int, hidden: int, seed: int, vocab: int = VOCAB, seq: int = SEQ
) -> torch.nn.Module:
    """A random Llama causal LM of the given depth and width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


class Tokens(Dataset):
    """Random token blocks, full attention masks."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "index": torch.tensor(i),
        }


def minimal_loop(student, teacher, data, steps, lr, seed):
    """The hand-written reference: same sampling order, loss and optimizer as the engine."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed * 1_000_003)
    perm = torch.randperm(len(data), generator=g)
    times, losses = [], []
    student.train()
    teacher.eval()
    for k in range(steps):
        t0 = time.perf_counter()
        idx = perm[k * BATCH : (k + 1) * BATCH]
        ids = data.ids[idx]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[:, :-1]
        s_logits = student(input_ids=ids).logits[:, :-1]
        log_ps = F.log_softmax(s_logits, -1)
        log_pt = F.log_softmax(t_logits, -1)
        loss = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return times, losses


class _Clock:
    def __init__(self) -> None:
        self.stamps = [time.perf_counter()]

    def on_step_end(self, _d, _step, _values) -> None:
        self.stamps.append(time.perf_counter())


def engine_run(student, teacher, data, steps, lr, seed, out):
    """The same steps through mentor's Distiller; returns per-step times and losses."""
    cfg = load_config(
        {
            "objective": {"forward_kl": {"weight": 1.0}},
            "train": {
                "max_steps": steps,
                "batch_size": BATCH,
                "lr": lr,
                "schedule": "constant",
                "grad_clip": None,
                "seed": seed,
                "log_every": 1,
                "progress": False,
            },
            "output": {"dir": out, "overwrite": True},
        }
    )
    clock = _Clock()
    d = Distiller(
        student,
        OnlineTeacher(teacher),
        Objective(cfg.objective),
        data,
        cfg,
        task="causal_lm",
        callbacks=[clock],
    )
    d.fit()
    times = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:])]
    return times, [r["loss"] for r in d.history if r["kind"] == "train"]


def matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s of this machine (median of repeats)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 2 * n**3 / ts[len(ts) // 2]


def main() -> None:
    """Run both sides, check equal inputs, time them, write JSON and the docs section."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    lr, seed = 1e-4, 0
    teacher = llama(4, 256, seed=1).eval()
    student0 = llama(2, 128, seed=2)
    data = Tokens(BATCH * (args.steps + 1))
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student0.parameters())

    # equal-input check: the first step's loss agrees between the two sides
    _, l_min = minimal_loop(copy.deepcopy(student0), teacher, data, 1, lr, seed)
    with tempfile.TemporaryDirectory() as tmp:
        _, l_eng = engine_run(copy.deepcopy(student0), teacher, data, 1, lr, seed, tmp)
    if abs(l_min[0] - l_eng[0]) > 1e-4 * abs(l_min[0]):
        raise SystemExit(f"first-step losses differ: minimal {l_min[0]} vs mentor {l_eng[0]}")

    eng_t, min_t = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            t, _ = engine_run(copy.deepcopy(student0), teacher, data, args.steps, lr, seed, tmp)
        eng_t += t[1:]  # first step of each round is warm-up
        t, _ = minimal_loop(copy.deepcopy(student0), teacher, data, args.steps, lr, seed)
        min_t += t[1:]
        print(f"round {r + 1}/{args.rounds} done")
    tokens = BATCH * (SEQ - 1)
    eng, mini = summarize(eng_t), summarize(min_t)
    peak = matmul_flops()
    eng_tps, min_tps = tokens / eng["median"], tokens / mini["median"]
    mfu = (6 * n_s + 2 * n_t) * eng_tps / peak
    info = machine_info()
    payload = {
        "machine": info,
        "setup": {
            "teacher_params": n_t,
            "student_params": n_s,
            "batch": BATCH,
            "seq": SEQ,
            "vocab": VOCAB,
            "steps_per_round": args.steps,
            "rounds": args.rounds,
        },
        "first_step_loss": {"minimal": l_min[0], "mentor": l_eng[0]},
        "mentor_step_s": eng,
        "minimal_step_s": mini,
        "mentor_tokens_per_s": eng_tps,
        "minimal_tokens_per_s": min_tps,
        "ratio_mentor_over_minimal": eng_tps / min_tps,
        "matmul_flops": peak,
        "kd_mfu": mfu,
    }
    write_json("engine_overhead", payload)
    md = f"""## Engine overhead vs a minimal PyTorch loop

Tiny Llama teacher ({n_t / 1e6:.1f}M params, 4 layers, hidden 256) → student ({n_s / 1e6:.1f}M,
2 layers, hidden 128), vocab {VOCAB:,}, batch {BATCH} × {SEQ} tokens, AdamW fp32, forward KL.
Both sides in one process, {args.rounds} alternating rounds of {args.steps} steps (first step of
each round dropped). First-step loss: minimal {l_min[0]:.6f}, mentor {l_eng[0]:.6f}.

| loop | step time median (min–max) s | tokens/s |
|---|---|---|
| minimal PyTorch | {mini["median"]:.3f} ({mini["min"]:.3f}–{mini["max"]:.3f}) | {min_tps:,.0f} |
| mentor Distiller | {eng["median"]:.3f} ({eng["min"]:.3f}–{eng["max"]:.3f}) | {eng_tps:,.0f} |

**mentor / minimal throughput: {eng_tps / min_tps:.3f}** (target ≥ 0.9).
KD-MFU = (6·N_s + 2·N_t)·tokens/s ÷ measured fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s) = {mfu:.1%}.

{machine_line(info)}
"""
    update_section("engine_overhead", md)
    print(md)


if __name__ == "__main__":
    main()

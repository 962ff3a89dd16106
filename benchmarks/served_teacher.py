"""Served teacher: the same short training run with the teacher in process, behind
``mentor serve-teacher`` (``teacher.source: served``) and from a ``mentor cache`` of it.

Three arms train the same student on the same prompts with the same seed and a forward-KL
objective on the teacher's top-K:

* (a) ``in_process``: ``teacher.builder: hf_causal_lm`` with ``teacher.top_k: K``;
* (b) ``served``: ``mentor serve-teacher TEACHER`` in a subprocess, read with
  ``teacher.source: served`` (``concurrency`` = the batch size: one request per sequence, which
  the server gathers into one forward pass);
* (c) ``cached``: ``mentor cache`` of recipe (b) (``--top-k K --dtype fp32``), read with
  ``teacher.source: cache``.

Loss curves must agree within 1e-4 (max abs difference over every logged step). Throughput is
training steps per second from the run's ``elapsed_s`` log, after ``--warmup`` steps, median
over ``--rounds`` runs per arm, the arms alternating (a, b, c, then b, c, a, ...). The models are
random saved Llamas with a word-level tokenizer (the served source needs a real HF tokenizer to
check the server's): a 4-layer, hidden-256 teacher and a 2-layer, hidden-128 student.

    .venv/bin/python -m benchmarks.served_teacher [--quick] [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks import _common as C

NAME = "served_teacher"
ARMS = ("in_process", "served", "cached")
TOL = 1e-4
OVERHEAD_TARGET = 0.15
W_PAD, W_UNK, W_EOS = 0, 1, 2


# ----------------------------------------------------------------------------- setup


def word_tokenizer(n_words: int) -> Any:
    """A whitespace word-level tokenizer (``w<i>`` is id ``i + 3``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": W_PAD, "[UNK]": W_UNK, "</s>": W_EOS}
    vocab.update({f"w{i}": i + 3 for i in range(n_words)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )


def save_llama(folder: Path, tok: Any, hidden: int, layers: int, seed: int) -> Path:
    """A random Llama (with ``tok``) saved in ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, eos_token_id=W_EOS, pad_token_id=W_PAD, bos_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_prompts(path: Path, n: int, n_words: int, prompt: int, completion: int) -> Path:
    """``n`` JSONL rows: a prompt of ``prompt`` random words and a ``completion``-word reference.

    Every row has the same length: a per-token cache of prompt data stores positions as its
    batches laid them out (prompts left-padded), so it serves other batchings only when no row
    is padded.
    """
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        words = torch.randint(0, n_words, (prompt + completion,), generator=g).tolist()
        rows.append(
            {
                "prompt": " ".join(f"w{i}" for i in words[:prompt]),
                "completion": " ".join(f"w{i}" for i in words[prompt:]),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(root: Path, name: str, teacher: dict[str, Any], cfg: dict[str, Any]) -> Path:
    spec = {
        "name": name,
        "teacher": teacher,
        "student": {"builder": "hf_causal_lm", "params": {"model": str(root / "student")}},
        "data": {
            "source": "prompts",
            "params": {"path": str(root / "prompts.jsonl"), "max_prompt_tokens": 256},
            "val_fraction": 0.05,
        },
        "objective": {"fkl": {"loss": "forward_kl"}},
        "train": {
            "max_steps": cfg["steps"],
            "batch_size": cfg["batch_size"],
            "progress": False,
            "log_every": 1,
            "lr": 1e-3,
            "seed": 0,
            "checkpoint_minutes": None,
        },  # fmt: skip
        "eval": {"batch_size": cfg["batch_size"], "every": None},
        "output": {"dir": str(root / "runs" / name)},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    folder: Path, port: int, batch_wait_ms: float, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``mentor serve-teacher FOLDER`` in a subprocess (``env`` added to its environment);
    returns once it answers."""
    import os

    import httpx

    cmd = [sys.executable, "-m", "mentor.cli", "serve-teacher", str(folder), "--port", str(port),
           "--model-name", "teacher", "--batch-wait-ms", str(batch_wait_ms)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-teacher exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise TimeoutError("serve-teacher did not come up within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ----------------------------------------------------------------------------- runs


def train(path: Path, out: Path, warmup: int) -> dict[str, Any]:
    """Train recipe ``path`` (output in ``out``): its loss curve and training steps/s."""
    from mentor.assembly import distill
    from mentor.config import load_config

    res = distill(load_config(str(path), [f"output.dir={out}"]), quiet=True)
    recs = [json.loads(x) for x in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "train"]
    a, b = steps[warmup - 1], steps[-1]
    return {
        "losses": [r["loss"] for r in steps],
        "elapsed_s": [r["elapsed_s"] for r in steps],
        "steps_per_s": (b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"]),
    }


def max_diff(x: list[float], y: list[float]) -> float:
    if len(x) != len(y):
        return float("inf")
    return max(abs(p - q) for p, q in zip(x, y))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes; outputs to results/quick/")
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    ap.add_argument("--rounds", type=int, default=3, help="runs per arm (alternating)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="serve-teacher batching")
    ap.add_argument(
        "--server-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the server process, e.g. OMP_NUM_THREADS=1",
    )
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
        a.steps, a.warmup, a.rounds = 6, 2, 1
    cfg = {
        "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "batch_size": a.batch_size,
        "top_k": a.top_k, "batch_wait_ms": a.batch_wait_ms, "concurrency": a.batch_size,
        "server_env": dict(x.split("=", 1) for x in a.server_env),
        "n_words": 500 if a.quick else 2000, "prompt_words": 32, "completion_words": 32,
        "teacher": {"hidden": 64 if a.quick else 256, "layers": 2 if a.quick else 4},
        "student": {"hidden": 32 if a.quick else 128, "layers": 2},
    }  # fmt: skip
    load_before = C.load_avg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mentor-served-bench-") as tmp:
        root = Path(tmp)
        tok = word_tokenizer(cfg["n_words"])
        save_llama(root / "teacher", tok, **cfg["teacher"], seed=0)
        save_llama(root / "student", tok, **cfg["student"], seed=1)
        n_rows = a.steps * a.batch_size + 16
        write_prompts(root / "prompts.jsonl", n_rows, cfg["n_words"], 32, 32)
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        teachers = {
            "in_process": {
                "builder": "hf_causal_lm",
                "params": {"model": str(root / "teacher")},
                "top_k": a.top_k,
            },
            "served": {
                "source": "served",
                "url": url,
                "model": "teacher",
                "top_k": a.top_k,
                "concurrency": a.batch_size,
            },  # fmt: skip
            "cached": {"source": "cache", "cache": str(root / "cache")},
        }
        paths = {arm: recipe(root, arm, teachers[arm], cfg) for arm in ARMS}
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        server = start_server(root / "teacher", port, a.batch_wait_ms, cfg["server_env"])
        try:
            from mentor.cli import main as cli

            t0 = time.perf_counter()
            args = ["cache", str(paths["served"]), "--out", str(root / "cache"),
                    "--top-k", str(a.top_k), "--dtype", "fp32"]  # fmt: skip
            if cli(args) != 0:
                raise RuntimeError("mentor cache of the served teacher failed")
            cache_s = time.perf_counter() - t0
            for r in range(a.rounds):
                order = ARMS[r % 3 :] + ARMS[: r % 3]  # alternate which arm goes first
                for arm in order:
                    out = root / "runs" / f"{arm}-{r}"
                    runs[arm].append(train(paths[arm], out, a.warmup))
                    print(f"round {r} {arm}: {runs[arm][-1]['steps_per_s']:.2f} steps/s",
                          flush=True)  # fmt: skip
        finally:
            stop_server(server)
    load_after = C.load_avg()
    curves = {arm: runs[arm][0]["losses"] for arm in ARMS}
    parity = {
        "served_vs_in_process": max_diff(curves["served"], curves["in_process"]),
        "cached_vs_in_process": max_diff(curves["cached"], curves["in_process"]),
        "cached_vs_served": max_diff(curves["cached"], curves["served"]),
        # every repeat of an arm trains the same curve
        "repeats": max(max_diff(r["losses"], curves[arm]) for arm in ARMS for r in runs[arm]),
    }
    parity["agrees"] = all(v <= TOL for k, v in parity.items() if k != "agrees")
    sps = {arm: C.summarize([r["steps_per_s"] for r in runs[arm]]) for arm in ARMS}
    overhead = sps["in_process"]["median"] / sps["served"]["median"] - 1
    payload = {
        "benchmark": NAME,
        "quick": a.quick,
        "machine": C.machine_info(),
        "load": {
            "before": load_before,
            "after": load_after,
            "busy": C.busy(load_before) or C.busy(load_after),
        },  # fmt: skip
        "config": cfg,
        "parity": {**parity, "tolerance": TOL, "steps": len(curves["in_process"])},
        "steps_per_s": sps,
        "served_overhead": overhead,
        "overhead_target": OVERHEAD_TARGET,
        "overhead_met": overhead <= OVERHEAD_TARGET,
        "cache_write_s": cache_s,
        "loss_curves": curves,
        "wall_s": time.perf_counter() - t_start,
    }
    C.write_json(NAME, payload)
    md = markdown(payload, C.load_span_note(load_before, load_after))
    C.update_section(NAME, md)
    print(md)
    return payload


def markdown(p: dict[str, Any], load_note: str) -> str:
    c, par, sps = p["config"], p["parity"], p["steps_per_s"]
    t, s = c["teacher"], c["student"]
    met = "met" if p["overhead_met"] else "**missed**"
    env = " ".join(f"`{k}={v}`" for k, v in c["server_env"].items())
    env = f", server environment {env}" if env else ""
    agree = "agree" if par["agrees"] else "**do not agree**"

    def row(arm: str, label: str) -> str:
        x = sps[arm]
        return f"| {label} | {x['median']:.2f} ({x['min']:.2f}–{x['max']:.2f}) |"

    return f"""## Served teacher

The same {c["steps"]}-step forward-KL run (batch {c["batch_size"]}, prompts of
{c["prompt_words"]} + {c["completion_words"]} words, top-{c["top_k"]})
with the teacher (a) in process with `teacher.top_k: {c["top_k"]}`, (b) behind
`mentor serve-teacher` in a subprocess (`teacher.source: served`, `concurrency:
{c["concurrency"]}` so the server batches a step's sequences into one forward pass,
`--batch-wait-ms {c["batch_wait_ms"]:g}`{env}) and (c) from a `mentor cache` of (b) (`--top-k
{c["top_k"]} --dtype fp32`, written in {p["cache_write_s"]:.1f} s). Random saved Llamas with a
{c["n_words"]}-word word-level tokenizer: teacher {t["layers"]} layers × hidden {t["hidden"]},
student {s["layers"]} layers × hidden {s["hidden"]}.

**Loss curves {agree}** (tolerance {par["tolerance"]:g}, {par["steps"]} steps): max abs
difference served vs in-process {par["served_vs_in_process"]:.1e}, cached vs in-process
{par["cached_vs_in_process"]:.1e}, cached vs served {par["cached_vs_served"]:.1e}; repeats of
an arm {par["repeats"]:.1e}.

| teacher | training steps/s, median (min–max) of {c["rounds"]} runs |
|---|---|
{row("in_process", "(a) in process")}
{row("served", "(b) served")}
{row("cached", "(c) cached")}

Served overhead (a)/(b) − 1: **{p["served_overhead"]:+.1%}** (target ≤
{p["overhead_target"]:.0%}: {met}). Steps after the first {c["warmup"]} are timed; the arms
alternate, the server (same machine, same cores) stays up for all runs.

{C.machine_line(p["machine"])}{load_note}

Regenerate: `.venv/bin/python -m benchmarks.served_teacher` (this run took
{p["wall_s"] / 60:.1f} min; `--quick` for a smoke run).
"""


if __name__ == "__main__":
    main()
    sys.exit(0)

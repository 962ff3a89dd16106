"""Peak memory and time of forward+backward for plain vs chunked vs fused logit losses.

Run ``.venv/bin/python -m benchmarks.loss_memory`` (``--quick`` for a small smoke run). Each case
runs in a fresh subprocess: it allocates the inputs (student hidden states ``[1, T, H]``, output
head ``[V, H]``, dense teacher logits ``[1, T, V]``), records ``ru_maxrss`` as the baseline, then
runs forward + backward once; the peak is ``ru_maxrss`` minus that baseline. Time is the minimum
over ``--repeats`` runs. Every variant starts from the hidden states:

* torch   — the loss written directly in PyTorch (log-softmax, KL / the GKD mixture via
  ``logsumexp``, as in TRL's ``generalized_jsd_loss``): the baseline a user would write;
* plain   — ``loss(hidden @ W.T, teacher)`` (mentor's default: closed-form gradient, chunked);
* chunked — ``loss(hidden @ W.T, teacher, chunk_size=c)`` (full logits, chunked loss);
* fused   — ``fused_linear_loss(hidden, W, teacher, chunk_size=c)`` (no full logits).

Writes ``benchmarks/results/loss_memory.json`` and the ``loss_memory`` section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks import _common as C

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "loss_memory.json"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "loss_memory"
VOCABS = (151936, 128256, 49152, 32000)  # largest first: the headline cases finish first
LOSSES = ("forward_kl", "jsd")
MODES = ("torch", "plain", "chunked", "fused")


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: about 2**23 logits (32 MiB in float32) per chunk."""
    return max(32, 2**23 // vocab)


def _cpu_s() -> float:
    """User + system CPU seconds of this process (robust to other load on a shared machine)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5), if allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def torch_reference(s: Any, t: Any, loss: str) -> Any:
    """The loss as a user would write it in PyTorch (mean over positions)."""
    import math

    import torch
    import torch.nn.functional as F

    lps, lpt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if loss == "forward_kl":
        return F.kl_div(lps, lpt, reduction="none", log_target=True).sum(-1).mean()
    lm = torch.logsumexp(torch.stack([lps + math.log(0.5), lpt + math.log(0.5)]), dim=0)
    kl_t = F.kl_div(lm, lpt, reduction="none", log_target=True)
    kl_s = F.kl_div(lm, lps, reduction="none", log_target=True)
    return (0.5 * kl_t + 0.5 * kl_s).sum(-1).mean()


def run_case(vocab: int, loss: str, mode: str, seq: int, hidden: int, repeats: int) -> dict:
    """Measure one case in this process (called in a fresh subprocess)."""
    import torch
    import torch.nn.functional as F

    import mentor.losses as L

    torch.manual_seed(0)
    # scale in place: an out-of-place product would leave a transient high-water mark that
    # ru_maxrss keeps and that would hide part of the measured peak
    h = torch.randn(1, seq, hidden).requires_grad_(True)
    w = torch.randn(vocab, hidden).mul_(hidden**-0.5).requires_grad_(True)
    teacher = torch.randn(1, seq, vocab).mul_(2.0)
    fn = getattr(L, loss)
    c = chunk_rows(vocab)

    def step() -> float:
        if mode == "torch":
            out = torch_reference(F.linear(h, w), teacher, loss)
        elif mode == "plain":
            out = fn(F.linear(h, w), teacher)
        elif mode == "chunked":
            out = fn(F.linear(h, w), teacher, chunk_size=c)
        else:
            out = L.fused_linear_loss(h, w, teacher, loss=loss, chunk_size=c)
        out.backward()
        return float(out.detach())

    _reset_peak()
    base = _maxrss_mib()
    times = []
    value = 0.0
    peak = 0.0
    cpu_times = []
    for i in range(repeats):
        h.grad = w.grad = None
        c0 = _cpu_s()
        t0 = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(_cpu_s() - c0)
        if i == 0:
            peak = _maxrss_mib() - base
    grad_norm = float(w.grad.norm())
    return {
        "vocab": vocab,
        "loss": loss,
        "mode": mode,
        "seq": seq,
        "hidden": hidden,
        "chunk_size": c if mode in ("chunked", "fused") else None,
        "peak_mib": round(peak, 1),
        "time_s": round(min(times), 3),
        "times_s": [round(t, 3) for t in times],
        "cpu_s": round(min(cpu_times), 3),
        "value": value,
        "grad_w_norm": grad_norm,
    }


def _child(args: argparse.Namespace) -> None:
    res = run_case(args.vocab, args.loss, args.mode, args.seq, args.hidden, args.repeats)
    print("RESULT " + json.dumps(res), flush=True)


# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so RSS stays at a
# high-water mark that the program no longer uses; the memory run pins the threshold at 1 MiB so
# large blocks are returned on free and ru_maxrss tracks live memory. Times come from a separate
# run with the default allocator (pinning makes every chunk page-fault afresh).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _spawn(
    vocab: int, loss: str, mode: str, seq: int, hidden: int, repeats: int, env: dict | None = None
) -> dict:
    cmd = [
        sys.executable, "-m", "benchmarks.loss_memory", "--child", "--vocab", str(vocab),
        "--loss", loss, "--mode", mode, "--seq", str(seq), "--hidden", str(hidden),
        "--repeats", str(repeats),
    ]  # fmt: skip
    full_env = {**os.environ, **(env or {})}
    err = ""
    for attempt in range(3):  # retry: a shared working tree may be briefly unimportable
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=full_env
        )
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
        err = proc.stderr[-2000:]
        time.sleep(30 * (attempt + 1))
    raise RuntimeError(f"case {vocab}/{loss}/{mode} failed:\n{err}")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": date.today().isoformat(),
    }


def markdown(payload: dict[str, Any]) -> str:
    """The docs/benchmarks.md section."""
    m = payload["machine"]
    cfg = payload["config"]
    lines = [
        "## Logit-loss memory: plain PyTorch vs mentor (plain, chunked, fused)",
        *(["", "**Partial run** (not every case finished)."] if not payload["complete"] else []),
        "",
        f"Forward + backward from student hidden states `[1, {cfg['seq']}, {cfg['hidden']}]`, "
        f"output head `[V, {cfg['hidden']}]`, dense float32 teacher logits. *PyTorch* is the loss "
        f"written directly (log-softmax + `F.kl_div`; for JSD the mixture via `logsumexp` of the "
        f"stacked log-probs, as TRL's `generalized_jsd_loss`); *mentor* is `mentor.losses` "
        f"as called by the engine (closed-form gradient, evaluated chunk by chunk); *chunked* adds "
        f"`chunk_size=` (about 2²³ logits per chunk); *fused* never builds the student logits "
        f"(`fused_linear_loss`). Peak = process `ru_maxrss` growth over the baseline after "
        f"allocating the inputs (fresh subprocess per case, glibc `MALLOC_MMAP_THRESHOLD_=1MiB` "
        f"so freed blocks leave the RSS); time = best of {cfg['repeats']} in a separate "
        f"subprocess with the default allocator (first call, page faults included), wall / CPU "
        f"seconds. Ratios (×) are relative to PyTorch; time ratios use CPU time. Measured on "
        f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}, {m['date']}. Regenerate with "
        f"`.venv/bin/python -m benchmarks.loss_memory`.{payload.get('load_note', '')}",
        "",
        "| loss | V | PyTorch peak MiB | PyTorch s | mentor peak MiB (×) | mentor s (×) "
        "| chunked peak MiB (×) | chunked s (×) | fused peak MiB (×) | fused s (×) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["loss"], r["vocab"], r["mode"]): r for r in payload["results"]}
    for loss in cfg["losses"]:
        for v in cfg["vocabs"]:
            p = by.get((loss, v, "torch"))
            if p is None:
                continue
            cells = [loss, str(v), f"{p['peak_mib']:.0f}", f"{p['time_s']:.1f} / {p['cpu_s']:.1f}"]
            for mode in ("plain", "chunked", "fused"):
                r = by.get((loss, v, mode))
                if r is None:
                    cells += ["–", "–"]
                    continue
                mr = r["peak_mib"] / max(p["peak_mib"], 1e-9)
                tr = r["cpu_s"] / max(p["cpu_s"], 1e-9)
                cells += [
                    f"{r['peak_mib']:.0f} ({mr:.2f})",
                    f"{r['time_s']:.1f} / {r['cpu_s']:.1f} ({tr:.2f})",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every case in its own subprocess and write the JSON and markdown results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--mode", default="plain")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--vocabs", type=int, nargs="*", default=list(VOCABS))
    ap.add_argument("--losses", nargs="*", default=list(LOSSES))
    ap.add_argument("--quick", action="store_true", help="small sizes, no files written")
    ap.add_argument("--resume", action="store_true", help="skip cases already in the JSON")
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return
    if args.quick:
        args.seq, args.vocabs, args.repeats = 128, [4096], 1
    results: list[dict[str, Any]] = []
    done: dict[tuple, dict[str, Any]] = {}
    if args.resume and RESULTS.exists():  # keep finished cases of an interrupted run
        old = json.loads(RESULTS.read_text())
        if old.get("config", {}).get("seq") == args.seq:
            done = {(r["vocab"], r["loss"], r["mode"]): r for r in old.get("results", [])}
    for v in args.vocabs:
        for loss in args.losses:
            for mode in MODES:
                if (v, loss, mode) in done:
                    results.append(done[(v, loss, mode)])
                    continue
                mem = _spawn(v, loss, mode, args.seq, args.hidden, 1, MEMORY_ENV)
                r = _spawn(v, loss, mode, args.seq, args.hidden, args.repeats)
                r["peak_mib_default_malloc"] = r["peak_mib"]
                r["peak_mib"] = mem["peak_mib"]
                results.append(r)
                if not args.quick:
                    _write(args, results, complete=False)
                print(
                    f"V={v:>6} {loss:<10} {mode:<7} peak {r['peak_mib']:>8.0f} MiB  "
                    f"time {r['time_s']:>7.2f} s  cpu {r['cpu_s']:>7.2f} s  value {r['value']:.6f}",
                    flush=True,
                )
    if args.quick:
        print(markdown(_payload(args, results, complete=True)))
        return
    _write(args, results, complete=True)
    print(f"wrote {RESULTS} and the {SECTION} section of {DOC}")


def _payload(args: argparse.Namespace, results: list, *, complete: bool) -> dict[str, Any]:
    return {
        "machine": machine(),
        "load_note": C.load_note(),
        "config": {
            "seq": args.seq,
            "hidden": args.hidden,
            "repeats": args.repeats,
            "vocabs": args.vocabs,
            "losses": args.losses,
        },
        "complete": complete,
        "results": results,
    }


def _write(args: argparse.Namespace, results: list, *, complete: bool) -> None:
    """Write the JSON and the markdown section (after every case, so partial runs survive)."""
    payload = _payload(args, results, complete=complete)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    C.update_section(SECTION, markdown(payload))


if __name__ == "__main__":
    main()

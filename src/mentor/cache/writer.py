"""Write a teacher cache: run the teacher once over the data, shard by shard, resumably.

Each shard is written to ``<name>.parquet.tmp``, renamed when complete, and then recorded in
``<name>.done.json`` (sha256, rows, bytes). A re-run with the same settings skips recorded
shards, deletes stray temporary files and redoes the rest; ``manifest.json`` is written last.
A re-run on a complete cache checks every shard the manifest lists (size and sha256) and
recomputes only the missing or corrupt ones; an intact cache is returned as it is.
Data pages carry CRC32 checksums, which the reader verifies as it decodes them.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from mentor.cache.format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_DIR,
    STATE,
    CacheError,
    encode_floats,
    float_type,
    read_json,
    read_manifest,
    sha256_file,
    shard_name,
    shard_problem,
    write_json_atomic,
)
from mentor.cache.provenance import describe
from mentor.models import model_outputs
from mentor.models.taps import FeatureTaps
from mentor.progress import Progress
from mentor.signals import Sampled, TopK

OUTPUT = "output"  # pseudo feature name: the teacher's output itself (embedding teachers)


@dataclass
class CacheSettings:
    """What to store per example (per token for LMs) and how to lay it out."""

    top_k: int = 32
    samples: int = 0
    features: list[str] = field(default_factory=list)
    dtype: str = "fp16"
    sample_temperature: float = 1.0
    sampled_logprobs: bool = False
    rows_per_shard: int = 1024
    row_group_positions: int = 4096
    batch_size: int = 16
    seed: int = 0

    def check(self) -> CacheSettings:
        """Validate the settings (errors name the option and what is allowed)."""
        if self.top_k < 0 or self.samples < 0:
            raise ValueError("--top-k and --samples must be >= 0 (0 turns that signal off)")
        if self.top_k == 0 and self.samples == 0 and not self.features:
            raise ValueError("nothing to cache: give --top-k K, --samples N or --features NAMES")
        if self.dtype not in DTYPES:
            raise ValueError(f"cache dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.samples > 65535:
            raise ValueError(f"--samples {self.samples}: at most 65535 draws per position")
        if self.sample_temperature <= 0:
            raise ValueError("sample temperature must be > 0")
        for name in ("rows_per_shard", "row_group_positions", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"cache setting {name} must be >= 1")
        return self

    def layout(self) -> dict[str, Any]:
        """The settings that change what is written (compared when resuming)."""
        d = asdict(self)
        d.pop("batch_size")  # only affects speed (the teacher runs in eval mode)
        return d


# ----------------------------------------------------------------------------- rows


def _lengths(batch: Mapping[str, Any], t: int) -> list[int]:
    """Positions to store per example: up to the last attended token (trailing pad dropped)."""
    m = batch.get("attention_mask")
    if m is None:
        return [t] * len(batch["input_ids"])
    pos = torch.arange(1, t + 1, device=m.device) * (m != 0)
    return [int(x) for x in pos.max(dim=1).values]


def _pool(x: Tensor, mask: Tensor | None) -> Tensor:
    """Pool a tapped feature to one vector per example (masked token mean, spatial mean)."""
    x = x.float()
    if x.dim() == 3:
        if mask is None:
            return x.mean(1)
        w = mask.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1)
    if x.dim() == 4:
        return x.mean((2, 3))
    return x.reshape(x.shape[0], -1)


def _batch_rows(
    out_logits: Any,
    feats: Mapping[str, Tensor],
    batch: Mapping[str, Any],
    s: CacheSettings,
    per_token: bool,
    gen: torch.Generator | None,
) -> list[dict[str, Any]]:
    """One dict of numpy arrays per example of the batch."""
    ids = [int(i) for i in batch["index"]]
    b = len(ids)
    logits = out_logits
    topk = sampled = None
    if isinstance(logits, TopK):  # a sparse teacher (e.g. source: served): stored as given
        topk = _topk_signal(logits, s)
        t = topk.shape[1] if per_token else 1
    elif (s.top_k or s.samples) and not isinstance(logits, Tensor):
        raise CacheError(
            "the teacher must return a logits tensor (or a TopK signal) to cache top-k or samples"
        )
    else:
        t = logits.shape[1] if per_token else 1
        if s.top_k:
            topk = TopK.from_logits(logits, min(s.top_k, logits.shape[-1]))  # k <= classes
    lens = _lengths(batch, t) if per_token else [1] * b
    if s.samples:
        sampled = Sampled.from_logits(logits, s.samples, gen, temperature=s.sample_temperature)
    mask = batch.get("attention_mask") if per_token else None
    pooled = {name: _pool(f, mask) for name, f in feats.items()}
    rows = []
    for i in range(b):
        n = lens[i]
        r: dict[str, Any] = {"id": ids[i], "_tokens": n, "_k": topk.k if topk is not None else 0}
        if per_token:
            r["seq_len"], r["length"] = t, n
        if topk is not None:
            sl = topk[i, :n] if per_token else topk[i]
            r["topk_indices"] = sl.indices.reshape(-1).cpu().numpy().astype(np.int32)
            r["topk_logprobs"] = encode_floats(sl.logprobs, s.dtype)
            r["topk_tail"] = encode_floats(sl.tail, s.dtype)
        if sampled is not None:
            sl = sampled[i, :n] if per_token else sampled[i]
            counts = sl.counts.reshape(-1, sl.counts.shape[-1]).cpu()
            drawn = counts > 0
            r["sampled_nnz"] = drawn.sum(-1).numpy().astype(np.uint16)
            r["sampled_indices"] = (
                sl.indices.reshape(drawn.shape).cpu()[drawn].numpy().astype(np.int32)
            )
            r["sampled_counts"] = counts[drawn].numpy().astype(np.uint16)
            if s.sampled_logprobs:
                r["sampled_logprobs"] = encode_floats(
                    sl.logprobs.reshape(drawn.shape).cpu()[drawn], s.dtype
                )
        for name, p in pooled.items():
            r[f"feature:{name}"] = encode_floats(p[i], s.dtype)
        rows.append(r)
    return rows


def _topk_signal(sig: TopK, s: CacheSettings) -> TopK | None:
    """The top-``s.top_k`` of a teacher's :class:`TopK` signal (``None`` with ``--top-k 0``).

    Only what the signal holds can be stored: samples need the full distribution, and
    ``--top-k`` may not exceed the signal's ``k``. A smaller ``--top-k`` keeps the most likely
    ids and folds the dropped log-probs into the tail.
    """
    if s.samples:
        raise CacheError(
            f"--samples {s.samples}: the teacher returns a top-{sig.k} signal (log-probs of "
            "its k most likely ids), not the full distribution samples are drawn from; cache "
            "its top-k only (--samples 0)"
        )
    if s.top_k > sig.k:
        raise CacheError(
            f"--top-k {s.top_k} is above the k={sig.k} log-probs the teacher returns per "
            f"position: pass --top-k {sig.k} or less"
        )
    if not s.top_k:
        return None
    if s.top_k == sig.k:
        return sig
    lp = sig.logprobs.float()
    order = lp.argsort(dim=-1, descending=True)
    lp = lp.gather(-1, order)
    idx = sig.indices.gather(-1, order)
    k = s.top_k
    tail = torch.logsumexp(torch.cat([sig.tail.float().unsqueeze(-1), lp[..., k:]], -1), -1)
    return TopK(idx[..., :k], lp[..., :k], tail)


def _table(rows: list[dict[str, Any]], s: CacheSettings) -> pa.Table:
    """A Parquet row group from row dicts (list columns built from flat values + offsets)."""
    ftype = float_type(s.dtype)
    cols: dict[str, pa.Array] = {"id": pa.array([r["id"] for r in rows], pa.int64())}
    for key in rows[0]:
        if key in ("id", "_tokens", "_k"):
            continue
        if key in ("seq_len", "length"):
            cols[key] = pa.array([r[key] for r in rows], pa.int32())
            continue
        if key in ("topk_indices", "sampled_indices"):
            elem = pa.int32()
        elif key in ("sampled_nnz", "sampled_counts"):
            elem = pa.uint16()
        else:
            elem = ftype
        parts = [r[key] for r in rows]
        offsets = np.zeros(len(parts) + 1, dtype=np.int32)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        values = pa.array(np.concatenate(parts), type=elem)
        cols[key] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
    return pa.table(cols)


# ----------------------------------------------------------------------------- shards


def _record_path(root: Path, rel: str) -> Path:
    f = root / rel
    return f.with_name(f.name.replace(".parquet", ".done.json"))


def _shard_done(root: Path, rel: str, checked_sha256: str | None = None) -> dict[str, Any] | None:
    """The completion record of a shard if the shard is finished and intact, else None.

    ``checked_sha256``: the shard's sha256, just computed (the file is not hashed again).
    """
    f = root / rel
    rec_path = _record_path(root, rel)
    if not (rec_path.exists() and f.exists()):
        return None
    try:
        rec = read_json(rec_path, "shard record")
    except CacheError:
        return None
    if rec.get("bytes") != f.stat().st_size:
        return None
    if rec.get("sha256") != (checked_sha256 or sha256_file(f)):
        return None
    return rec


def _check_complete(root: Path) -> tuple[dict[str, Any] | None, dict[str, str], dict[str, str]]:
    """Check a complete cache's shards against its manifest (existence, size, sha256).

    Returns the manifest (None when it is unreadable), ``{shard: problem}`` of the damaged
    shards (``{"manifest.json": problem}`` for an unreadable manifest) and ``{shard: sha256}``
    of the shards found intact.
    """
    try:
        m = read_manifest(root)
        shards = list(m["shards"])
        if not all({"file", "bytes", "sha256", "rows"} <= set(sh) for sh in shards):
            raise CacheError("a shard entry lacks file, bytes, sha256 or rows")
    except (CacheError, KeyError, TypeError) as e:
        return None, {MANIFEST: f"{MANIFEST}: unreadable ({e})"}, {}
    damaged, intact = {}, {}
    for sh in shards:
        problem = shard_problem(root, sh)
        if problem is None:
            intact[sh["file"]] = sh["sha256"]
        else:
            damaged[sh["file"]] = problem
    return m, damaged, intact


def _write_shard(
    root: Path,
    rel: str,
    split: str,
    shard_idx: int,
    data: Dataset,
    lo: int,
    hi: int,
    run: Callable[[dict[str, Any]], tuple[Any, dict[str, Tensor]]],
    s: CacheSettings,
    per_token: bool,
    collate: Callable[[list[Any]], dict[str, Any]],
    advance: Callable[[int], None],
    device: torch.device,
) -> dict[str, Any]:
    """Compute and write one shard under a temporary name; rename and record when complete."""
    final = root / rel
    tmp = final.with_name(final.name + ".tmp")
    gen = None
    if s.samples:
        gen = torch.Generator(device=device)
        gen.manual_seed(s.seed * 1_000_003 + zlib.crc32(split.encode()) * 100_003 + shard_idx)
    tokens = rows_n = k_eff = 0
    feat_dims: dict[str, int] = {}
    pending: list[dict[str, Any]] = []
    pending_pos = 0
    writer: pq.ParquetWriter | None = None

    def flush() -> None:
        nonlocal writer, pending, pending_pos
        if not pending:
            return
        table = _table(pending, s)
        if writer is None:
            writer = pq.ParquetWriter(
                tmp, table.schema, compression="zstd", write_page_checksum=True
            )
        writer.write_table(table, row_group_size=len(pending))
        pending, pending_pos = [], 0

    try:
        for a in range(lo, hi, s.batch_size):
            items = [data[i] for i in range(a, min(hi, a + s.batch_size))]
            if "index" not in items[0]:
                raise CacheError(
                    f"{split} data item {a} has no 'index' field (a stable example id); "
                    "cached teachers look signals up by it"
                )
            batch = collate(items)
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            logits, feats = run(batch)
            for r in _batch_rows(logits, feats, batch, s, per_token, gen):
                tokens += r["_tokens"]
                rows_n += 1
                k_eff = r["_k"]
                for k, v in r.items():
                    if k.startswith("feature:"):
                        feat_dims[k.removeprefix("feature:")] = len(v)
                pending.append(r)
                pending_pos += r["_tokens"]
                if pending_pos >= s.row_group_positions:
                    flush()
            advance(len(items))
        flush()
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    if writer is not None:
        writer.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    rec = {
        "file": rel,
        "split": split,
        "shard": shard_idx,
        "first_row": lo,
        "rows": rows_n,
        "tokens": tokens,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "feature_dims": feat_dims,
        "topk_k": k_eff,
    }
    write_json_atomic(final.with_name(final.name.replace(".parquet", ".done.json")), rec)
    return rec


def _compare(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two nested mappings."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += _compare(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return diffs


TeacherFn = Callable[[dict[str, Any]], tuple[Any, dict[str, Tensor]]]


def module_teacher(module: nn.Module, features: list[str], precision: str = "fp32") -> TeacherFn:
    """A teacher function for a plain module: frozen, eval mode, no grad, optional bf16.

    ``features`` are module paths whose outputs are pooled and stored (``output``: the
    module's own output, e.g. sentence embeddings).
    """
    module.eval()
    taps = [f for f in features if f != OUTPUT]
    hooks = FeatureTaps(module, taps, role="teacher") if taps else None

    @torch.no_grad()
    def run(batch: dict[str, Any]) -> tuple[Any, dict[str, Tensor]]:
        dev = next(module.parameters(), torch.empty(0)).device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model_outputs(module, batch)
        feats = hooks.pop() if hooks else {}
        if OUTPUT in features:
            feats[OUTPUT] = logits
        return logits, feats

    run.close = hooks.remove if hooks else (lambda: None)  # type: ignore[attr-defined]
    return run


def write_cache(
    teacher: nn.Module | TeacherFn,
    splits: Mapping[str, Dataset],
    out: str | Path,
    settings: CacheSettings | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
    task: str | None = None,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    collate: Callable[[list[Any]], dict[str, Any]] = default_collate,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``teacher`` over every split once and write the cache; returns the manifest.

    ``teacher``: a module (run frozen, see :func:`module_teacher`) or a teacher function
    ``batch -> (logits, {feature name: tensor})`` (then pass ``provenance``); the function may
    return a :class:`~mentor.signals.TopK` signal instead of logits (a served teacher), stored
    as the top-k record (``settings.top_k`` at most its ``k``, no samples). ``splits`` maps a split name (``train``, ``val``) to a dataset whose items carry ``index``
    (a stable example id). ``provenance`` (see :func:`mentor.cache.provenance.describe`) is
    recorded in the manifest; by default the teacher weights and data are hashed here. A
    re-run with the same arguments resumes an interrupted cache; on a complete cache it checks
    the shards the manifest lists (size, sha256) and recomputes only the missing or corrupt
    ones (naming them on stderr), then rewrites the manifest. Other settings are refused.
    """

    s = (settings or CacheSettings()).check()
    root = Path(out)
    if not splits or any(len(d) == 0 for d in splits.values()):
        raise ValueError("write_cache needs at least one non-empty split")
    if provenance is None and not isinstance(teacher, nn.Module):
        raise ValueError("write_cache with a teacher function needs provenance= (see describe)")
    first = splits[next(iter(splits))][0]
    if task == "causal_lm_xtok" or "teacher_input_ids" in first:
        raise ValueError(
            "cross-tokenizer data (data.source=xtok_text) cannot be cached: the cross-tokenizer "
            "losses need the teacher's full distributions over its own vocabulary "
            "at every position, which a top-k cache does not hold; train with the teacher "
            "online (teacher.source=online, the default)"
        )
    prov = dict(provenance) if provenance is not None else describe(teacher, splits, precision)
    if task is None:
        task = "causal_lm" if "input_ids" in first and "labels" not in first else "classification"
    per_token = task == "causal_lm"
    if task == "embedding" and (s.top_k or s.samples):
        raise ValueError(
            "an embedding teacher has no classes: use --top-k 0 (its output is cached as the "
            "feature 'output'; add other modules with --features)"
        )
    # a collate that trims batch-wide padding makes per-token batches as wide as their longest
    # example; otherwise as wide as the stored sequences
    width = "seq_len"
    if per_token and collate([first])["input_ids"].shape[-1] < first["input_ids"].shape[-1]:
        width = "longest"
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": task,
        "per_token": per_token,
        "batch_width": width,
        "settings": s.layout(),
        "provenance": prov,
        "splits": {k: len(d) for k, d in splits.items()},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / SHARD_DIR).mkdir(exist_ok=True)
    if (root / STATE).exists() and not overwrite:
        old = read_json(root / STATE, "cache state")
        diffs = _compare(old, state)
        if diffs:
            raise CacheError(
                f"{root} holds a cache made with other settings or inputs: "
                + "; ".join(diffs[:6])
                + ". Use another --out, or pass --overwrite to replace it"
            )
    intact: dict[str, str] = {}
    damaged: dict[str, str] = {}
    if (root / STATE).exists() and not overwrite and (root / MANIFEST).exists():
        manifest, damaged, intact = _check_complete(root)
        if manifest is not None and not damaged:
            return manifest  # complete and intact: nothing to do
        _say(
            f"teacher cache {root} is damaged; repairing it (recomputing only what is "
            "missing or corrupt): " + "; ".join(damaged.values())
        )
    if overwrite:
        for p in [root / MANIFEST, root / STATE, *(root / SHARD_DIR).iterdir()]:
            if p.is_file():
                p.unlink()
    (root / MANIFEST).unlink(missing_ok=True)
    write_json_atomic(root / STATE, state)
    for stray in (root / SHARD_DIR).glob("*.tmp"):
        stray.unlink()  # a shard that was being written when the last run stopped

    dev = torch.device(device) if device else torch.device("cpu")
    if isinstance(teacher, nn.Module):
        run = module_teacher(teacher.to(dev), list(s.features), precision)
    else:
        run = teacher

    plan = []
    for split, data in splits.items():
        n_shards = math.ceil(len(data) / s.rows_per_shard)
        for i in range(n_shards):
            lo, hi = i * s.rows_per_shard, min(len(data), (i + 1) * s.rows_per_shard)
            plan.append((split, i, lo, hi, shard_name(split, i)))
    records: dict[str, dict[str, Any]] = {}
    for _split, _, lo, hi, rel in plan:
        if rel in damaged:  # recomputed even if its shard record was rewritten to match it
            _record_path(root, rel).unlink(missing_ok=True)
            continue
        rec = _shard_done(root, rel, intact.get(rel))
        if rec is not None and rec.get("rows") == hi - lo:
            records[rel] = rec
    todo = [p[4] for p in plan if p[4] not in records]
    total_rows = sum(len(d) for d in splits.values())
    done_rows = sum(r["rows"] for r in records.values())
    bar = Progress(total_rows, enabled=progress, initial=done_rows, label="cache")
    pos = [done_rows]

    def advance(n: int) -> None:
        pos[0] += n
        bar.update(pos[0], {})

    try:
        for split, i, lo, hi, rel in plan:
            if rel in records:
                continue
            data = splits[split]
            args = (split, i, data, lo, hi, run, s, per_token, collate, advance, dev)
            records[rel] = _write_shard(root, rel, *args)
    finally:
        bar.close()
        getattr(run, "close", lambda: None)()
    manifest = _manifest(state, [records[p[4]] for p in plan])
    write_json_atomic(root / MANIFEST, manifest)
    if damaged:
        _say(
            f"teacher cache {root}: repaired {len(todo)} shard(s)"
            + (f" ({', '.join(todo)})" if todo else "")
            + f" and rewrote {MANIFEST}"
        )
    return manifest


def _say(text: str) -> None:
    """A message for the person running ``mentor cache`` (stderr)."""
    from mentor._console import err

    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _manifest(state: Mapping[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    from mentor._version import __version__

    s = state["settings"]
    rows = sum(r["rows"] for r in shards)
    tokens = sum(r["tokens"] for r in shards)
    nbytes = sum(r["bytes"] for r in shards)
    dims: dict[str, int] = {}
    for r in shards:
        dims.update(r.get("feature_dims", {}))
    prov = state["provenance"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mentor_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": state["task"],
        "per_token": state["per_token"],
        "batch_width": state["batch_width"],
        "signals": {
            "topk": {"k": shards[0].get("topk_k"), "dtype": s["dtype"], "temperature": 1.0}
            if s["top_k"]
            else None,
            "sampled": {
                "n": s["samples"],
                "temperature": s["sample_temperature"],
                "logprobs": s["sampled_logprobs"],
                "seed": s["seed"],
            }
            if s["samples"]
            else None,
            "features": {
                name: {"dim": dims.get(name), "dtype": s["dtype"], "pool": "mean"}
                for name in s["features"]
            },
        },
        "settings": s,
        "teacher": prov.get("teacher"),
        "tokenizer": prov.get("tokenizer"),
        "data": prov.get("data"),
        "splits": {
            split: {
                "rows": sum(r["rows"] for r in shards if r["split"] == split),
                "tokens": sum(r["tokens"] for r in shards if r["split"] == split),
                "shards": sum(1 for r in shards if r["split"] == split),
            }
            for split in state["splits"]
        },
        "totals": {
            "rows": rows,
            "tokens": tokens,
            "bytes": nbytes,
            "bytes_per_token": round(nbytes / max(tokens, 1), 3),
        },
        "shards": [
            {k: r[k] for k in ("file", "split", "first_row", "rows", "tokens", "bytes", "sha256")}
            for r in shards
        ],
    }

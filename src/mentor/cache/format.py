"""The teacher-cache format: layout, column types, hashes, manifest I/O and verification.

The format is described for other tools in ``docs/cache-format.md``. In short::

    DIR/cache_state.json          settings + provenance, written first (lets a run resume)
    DIR/shards/<split>-NNNNN.parquet    one row per example (zstd Parquet)
    DIR/shards/<split>-NNNNN.done.json  completion record of that shard (sha256, rows, bytes)
    DIR/manifest.json             written last: its presence means "complete"
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

FORMAT = "mentor-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "cache_state.json"
SHARD_DIR = "shards"
DTYPES = ("fp16", "bf16", "fp32")
BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


class CacheError(ValueError):
    """A cache directory is incomplete, corrupt or made for another teacher, tokenizer or data."""


# ----------------------------------------------------------------------------- column types


def float_type(dtype: str) -> pa.DataType:
    """Arrow element type of stored floats: halffloat, uint16 (bf16 bit patterns) or float32."""
    return {"fp16": pa.float16(), "bf16": pa.uint16(), "fp32": pa.float32()}[dtype]


def encode_floats(x: Tensor, dtype: str) -> np.ndarray:
    """Flatten ``x`` and round it to the storage ``dtype`` (bf16 as its uint16 bit pattern)."""
    x = x.detach().reshape(-1).cpu()
    if dtype == "fp16":
        return x.to(torch.float16).numpy()
    if dtype == "bf16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(torch.float32).numpy()


def decode_floats(a: np.ndarray, dtype: str) -> Tensor:
    """Inverse of :func:`encode_floats`, returned as float32."""
    if dtype == "bf16":
        return (
            torch.from_numpy(np.array(a, dtype=np.uint16).view(np.int16))
            .view(torch.bfloat16)
            .float()
        )
    return torch.from_numpy(np.array(a, dtype=np.float32))


# ----------------------------------------------------------------------------- hashes


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def weights_hash(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str | None:
    """sha256 of a tokenizer's vocabulary and special tokens (None when there is none).

    Accepts a Hugging Face tokenizer object or a folder/name ``AutoTokenizer`` can load.
    """
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        from mentor.models.assets import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer))
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(getattr(tokenizer, "all_special_tokens", []))
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def data_fingerprint(dataset: Any) -> str:
    """sha256 over every example's id and inputs (all fields except ``labels``), in order."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, Mapping) or "index" not in item:
            raise CacheError(
                f"data item {i} has no 'index' field: cached teachers need a stable example id "
                "per item (mentor's data sources provide one)"
            )
        for key in sorted(item):
            if key == "labels":
                continue
            v = item[key]
            if isinstance(v, Tensor):
                h.update(f"{key}|{v.dtype}|{tuple(v.shape)}|".encode())
                h.update(_tensor_bytes(v))
            else:
                h.update(f"{key}|{v!r}|".encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- json files


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path.tmp``, fsync, then rename (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, naming the file and what it is on failure."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(
            f"{path}: the {what} is not valid JSON ({e}); re-run the same `mentor cache` "
            "command to repair it"
        ) from None
    if not isinstance(obj, dict):
        raise CacheError(f"{path}: the {what} must be a JSON object")
    return obj


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache, with clear errors for missing or partial caches."""
    root = Path(path)
    if not root.is_dir():
        raise CacheError(f"teacher cache {root} does not exist (create it with `mentor cache`)")
    mpath = root / MANIFEST
    if not mpath.exists():
        done = (
            len(list((root / SHARD_DIR).glob("*.done.json"))) if (root / SHARD_DIR).exists() else 0
        )
        if (root / STATE).exists():
            raise CacheError(
                f"teacher cache {root} is incomplete (no {MANIFEST}; {done} shard(s) finished): "
                "re-run the same `mentor cache` command to resume it"
            )
        raise CacheError(f"{root} has no {MANIFEST}: not a mentor teacher cache")
    m = read_json(mpath, "manifest")
    if m.get("format") != FORMAT:
        raise CacheError(f"{mpath}: format is {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{mpath}: format_version {m.get('format_version')!r} is not supported by this "
            f"mentor (reads version {FORMAT_VERSION}); re-create the cache or upgrade mentor"
        )
    return m


# ----------------------------------------------------------------------------- verification


def shard_problem(
    root: str | Path, shard: Mapping[str, Any], *, checksums: bool = True
) -> str | None:
    """What is wrong with one shard listed in a manifest (None = sound): missing, wrong size,
    sha256 mismatch (with ``checksums``), unreadable Parquet or another row count."""
    import pyarrow.parquet as pq

    rel = shard["file"]
    f = Path(root) / rel
    if not f.is_file():
        return f"{rel}: missing (expected {shard['rows']} rows)"
    size = f.stat().st_size
    if size != shard["bytes"]:
        kind = "truncated" if size < shard["bytes"] else "wrong size"
        return f"{rel}: {kind} ({size} bytes, manifest says {shard['bytes']})"
    if checksums and sha256_file(f) != shard["sha256"]:
        return f"{rel}: sha256 mismatch (the file was changed or corrupted)"
    try:
        rows = pq.ParquetFile(f).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt shard
        return f"{rel}: unreadable Parquet ({e})"
    if rows != shard["rows"]:
        return f"{rel}: {rows} rows, manifest says {shard['rows']}"
    return None


def verify_cache(path: str | Path, *, checksums: bool = True) -> list[str]:
    """Problems found in a cache (empty list = sound): manifest, files, sizes, rows, sha256."""
    root = Path(path)
    try:
        m = read_manifest(root)
    except CacheError as e:
        return [str(e)]
    problems = []
    for sh in m.get("shards", []):
        problem = shard_problem(root, sh, checksums=checksums)
        if problem is not None:
            problems.append(problem)
    total = sum(sh["rows"] for sh in m.get("shards", []))
    if total != m.get("totals", {}).get("rows"):
        problems.append(
            f"{MANIFEST}: shard rows add up to {total}, totals.rows says "
            f"{m.get('totals', {}).get('rows')}"
        )
    listed = {sh["file"] for sh in m.get("shards", [])}
    for f in sorted((root / SHARD_DIR).glob("*.parquet")):
        rel = f"{SHARD_DIR}/{f.name}"
        if rel not in listed:
            problems.append(f"{rel}: not listed in the manifest (stray file)")
    return problems


def shard_name(split: str, i: int) -> str:
    """Relative path of shard ``i`` of ``split``."""
    return f"{SHARD_DIR}/{split}-{i:05d}.parquet"

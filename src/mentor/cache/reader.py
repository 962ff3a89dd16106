"""Read a teacher cache: memory-mapped shards, random access by example id, batched signals.

Shards are opened lazily with ``pyarrow`` memory mapping and decoded one row group at a time
(a small LRU keeps recent row groups), so each process reads only the examples it asks for.
The store pickles without its open files, so DataLoader workers and ranks can share it.

A shard that is missing, truncated or corrupt (a page checksum, decode or row-count failure)
raises :class:`CacheError` naming the shard file and how to check (``mentor cache verify
DIR``) and repair it (re-run the ``mentor cache`` command that made it). Opening checks sizes
only; ``mentor cache verify`` also checks every shard's sha256.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from mentor.cache.format import CacheError, decode_floats, read_manifest
from mentor.cache.provenance import CHECK_MODES, check_provenance
from mentor.signals import Sampled, TopK

KINDS = ("topk", "sampled")


class CacheStore:
    """A complete teacher cache opened for reading (see ``docs/cache-format.md``).

    ``store.batch(ids)`` returns a :class:`~mentor.signals.TopK` or
    :class:`~mentor.signals.Sampled` signal with leading shape ``[B]`` (classification) or
    ``[B, T]`` (per token, aligned with the model inputs like online teacher logits);
    ``store[id]`` gives one example's signal and ``store.features(ids, name)`` pooled features.
    """

    def __init__(self, path: str | Path, *, kind: str | None = None, cache_size: int = 16) -> None:
        """Read and check the manifest; choose the signal ``kind`` (default: topk if stored)."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        sig = self.manifest["signals"]
        stored = [k for k in KINDS if sig.get(k)]
        if kind is None:
            kind = stored[0] if stored else None
        elif kind not in KINDS:
            raise ValueError(f"cache signal kind {kind!r}: choose one of {', '.join(KINDS)}")
        elif kind not in stored:
            raise CacheError(
                f"teacher cache {self.path} has no {kind!r} signal (it stores: "
                f"{', '.join(stored) or 'features only'})"
            )
        self.kind = kind
        self.per_token = bool(self.manifest["per_token"])
        self.dtype = self.manifest["settings"]["dtype"]
        self.cache_size = cache_size
        self._shards = self.manifest["shards"]
        for sh in self._shards:
            f = self.path / sh["file"]
            if not f.is_file():
                raise CacheError(
                    f"teacher cache {self.path}: shard {sh['file']} is missing. {self._fix}"
                )
            if f.stat().st_size != sh["bytes"]:
                raise CacheError(
                    f"teacher cache {self.path}: shard {sh['file']} has "
                    f"{f.stat().st_size} bytes, manifest says {sh['bytes']} (truncated or "
                    f"replaced). {self._fix}"
                )
        self._reset()

    @property
    def _fix(self) -> str:
        return (
            f"Run `mentor cache verify {self.path}` to check every shard, then re-run the "
            f"`mentor cache ... --out {self.path}` command that made it: it recomputes only "
            "the missing or corrupt shards"
        )

    def _corrupt(self, s: int, what: str, err: BaseException | str) -> CacheError:
        detail = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else err
        detail = " ".join(str(detail).split())  # pyarrow messages span several lines
        return CacheError(
            f"teacher cache {self.path}: shard {self._shards[s]['file']} is corrupt "
            f"({what}: {detail}). {self._fix}"
        )

    def _reset(self) -> None:
        self._files: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self._index: dict[int, tuple[int, int]] | None = None
        self._starts: dict[int, list[int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_files", "_groups", "_index", "_starts"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ lookup
    def _file(self, s: int) -> pq.ParquetFile:
        f = self._files.get(s)
        if f is None:
            path = self.path / self._shards[s]["file"]
            try:
                f = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
                md = f.metadata
                starts = [0]
                for g in range(md.num_row_groups):
                    starts.append(starts[-1] + md.row_group(g).num_rows)
            except FileNotFoundError as e:
                raise CacheError(
                    f"teacher cache {self.path}: shard {self._shards[s]['file']} is missing "
                    f"({e}). {self._fix}"
                ) from None
            except Exception as e:  # noqa: BLE001 - name the shard on any decode failure
                raise self._corrupt(s, "cannot read its Parquet footer", e) from None
            if starts[-1] != self._shards[s]["rows"]:
                raise self._corrupt(
                    s, "row count", f"{starts[-1]} rows, manifest says {self._shards[s]['rows']}"
                )
            self._files[s], self._starts[s] = f, starts
        return f

    def _build_index(self) -> dict[int, tuple[int, int]]:
        index: dict[int, tuple[int, int]] = {}
        for s, sh in enumerate(self._shards):
            f = self._file(s)
            try:
                ids = f.read(columns=["id"]).column("id").to_numpy()
            except Exception as e:  # noqa: BLE001 - name the shard on any decode failure
                raise self._corrupt(s, "cannot decode its id column", e) from None
            if len(ids) != sh["rows"]:
                raise self._corrupt(s, "row count", f"{len(ids)} ids, manifest says {sh['rows']}")
            for r, i in enumerate(ids.tolist()):
                if i in index:
                    where = self._shards[index[i][0]]["file"]
                    raise self._corrupt(
                        s, "duplicate example id", f"id {i} is also stored in {where}"
                    )
                index[i] = (s, r)
        return index

    @property
    def ids(self) -> list[int]:
        """Every cached example id."""
        if self._index is None:
            self._index = self._build_index()
        return list(self._index)

    def __len__(self) -> int:
        return int(self.manifest["totals"]["rows"])

    def __contains__(self, example_id: object) -> bool:
        if self._index is None:
            self._index = self._build_index()
        return int(example_id) in self._index  # type: ignore[call-overload]

    def _locate(self, example_id: int) -> tuple[int, int, int]:
        if self._index is None:
            self._index = self._build_index()
        try:
            s, row = self._index[int(example_id)]
        except KeyError:
            splits = ", ".join(self.manifest.get("splits", {}))
            raise KeyError(
                f"example id {example_id} is not in teacher cache {self.path} (cached splits: "
                f"{splits}); cache the split it belongs to (mentor cache --splits train,val)"
            ) from None
        self._file(s)
        starts = self._starts[s]
        g = bisect.bisect_right(starts, row) - 1
        return s, g, row - starts[g]

    def _group(self, s: int, g: int) -> dict[str, Any]:
        """Decoded columns of one row group: (offsets, values) for lists, arrays otherwise."""
        key = (s, g)
        hit = self._groups.get(key)
        if hit is not None:
            self._groups.move_to_end(key)
            return hit
        f = self._file(s)
        cols: dict[str, Any] = {}
        try:
            table = f.read_row_group(g)
            for name in table.column_names:
                col = table.column(name).combine_chunks()
                if hasattr(col, "offsets"):
                    vals = col.values.to_numpy(zero_copy_only=False)
                    cols[name] = (col.offsets.to_numpy(), vals)
                else:
                    cols[name] = col.to_numpy()
        except Exception as e:  # noqa: BLE001 - name the shard on any decode failure
            raise self._corrupt(s, f"cannot decode row group {g}", e) from None
        self._groups[key] = cols
        if len(self._groups) > self.cache_size:
            self._groups.popitem(last=False)
        return cols

    def _row(self, example_id: int) -> dict[str, Any]:
        s, g, r = self._locate(example_id)
        cols = self._group(s, g)
        out = {}
        for name, c in cols.items():
            if isinstance(c, tuple):
                off, vals = c
                out[name] = vals[off[r] : off[r + 1]]
            else:
                out[name] = c[r]
        return out

    # ------------------------------------------------------------------ signals
    def batch(self, ids: Sequence[int]) -> TopK | Sampled:
        """The stored signal of ``ids``, batched (per-token caches pad to ``seq_len``)."""
        if self.kind is None:
            raise CacheError(f"teacher cache {self.path} stores features only (no logit signal)")
        rows = [self._row(int(i)) for i in ids]
        if self.kind == "topk":
            return self._topk(rows)
        return self._sampled(rows)

    def __getitem__(self, example_id: int) -> TopK | Sampled:
        return self.batch([int(example_id)])[0]

    def _seq_len(self, rows: list[dict[str, Any]]) -> int:
        if self.manifest.get("batch_width") == "longest":  # collate trims batch-wide padding
            return max(int(r["length"]) for r in rows)
        lens = {int(r["seq_len"]) for r in rows}
        if len(lens) != 1:
            raise CacheError(
                f"teacher cache {self.path}: examples of one batch were cached with different "
                f"sequence lengths {sorted(lens)}; batch examples of equal length"
            )
        return lens.pop()

    def _topk(self, rows: list[dict[str, Any]]) -> TopK:
        k = int(self.manifest["signals"]["topk"]["k"])
        b = len(rows)
        t = self._seq_len(rows) if self.per_token else 1
        idx = torch.zeros(b, t, k, dtype=torch.long)
        lp = torch.full((b, t, k), float("-inf"))
        lp[..., 0] = 0.0  # padding positions: all mass on id 0 (masked by the loss)
        tail = torch.full((b, t), float("-inf"))
        for i, r in enumerate(rows):
            n = int(r["length"]) if self.per_token else 1
            idx[i, :n] = torch.from_numpy(r["topk_indices"].astype(np.int64)).view(n, k)
            lp[i, :n] = decode_floats(r["topk_logprobs"], self.dtype).view(n, k)
            tail[i, :n] = decode_floats(r["topk_tail"], self.dtype)
        sig = TopK(idx, lp, tail)
        return sig if self.per_token else sig[:, 0]

    def _sampled(self, rows: list[dict[str, Any]]) -> Sampled:
        meta = self.manifest["signals"]["sampled"]
        has_lp = bool(meta.get("logprobs"))
        b = len(rows)
        t = self._seq_len(rows) if self.per_token else 1
        width = max(max((int(x) for x in r["sampled_nnz"]), default=1) for r in rows)
        idx = torch.zeros(b, t, width, dtype=torch.long)
        cnt = torch.zeros(b, t, width, dtype=torch.long)
        lp = torch.zeros(b, t, width) if has_lp else None
        for i, r in enumerate(rows):
            nnz = torch.from_numpy(r["sampled_nnz"].astype(np.int64))
            n = len(nnz)
            slot = torch.arange(width).expand(n, width) < nnz.unsqueeze(-1)
            idx[i, :n][slot] = torch.from_numpy(r["sampled_indices"].astype(np.int64))
            cnt[i, :n][slot] = torch.from_numpy(r["sampled_counts"].astype(np.int64))
            if lp is not None:
                lp[i, :n][slot] = decode_floats(r["sampled_logprobs"], self.dtype)
        sig = Sampled(idx, cnt, lp, float(meta["temperature"]))
        return sig if self.per_token else sig[:, 0]

    def features(self, ids: Sequence[int], name: str) -> Tensor:
        """Pooled features ``[B, D]`` stored under ``name`` (``mentor cache --features``)."""
        feats = self.manifest["signals"].get("features") or {}
        if name not in feats:
            raise KeyError(
                f"teacher cache {self.path} has no feature {name!r} (stored: "
                f"{', '.join(feats) or 'none'})"
            )
        return torch.stack(
            [decode_floats(self._row(int(i))[f"feature:{name}"], self.dtype) for i in ids]
        )


def open_store(
    path: str | Path,
    *,
    kind: str | None = None,
    check: str = "strict",
    expected: dict[str, Any] | None = None,
) -> CacheStore:
    """Open a teacher cache; with ``expected`` (a :func:`describe` record) check its provenance.

    ``check``: ``strict`` refuses a cache made with another teacher, tokenizer or data (the
    error names the field), ``warn`` only warns, ``off`` skips the check.
    """
    if check not in CHECK_MODES:
        raise ValueError(f"teacher.cache_check={check!r}: choose one of {', '.join(CHECK_MODES)}")
    store = CacheStore(path, kind=kind)
    if check != "off" and expected is not None:
        check_provenance(store.manifest, expected, check, str(path))
    return store

"""Provenance of a teacher cache: which teacher, tokenizer and data produced it, and checks.

A cache records the sha256 of the teacher's weights, of the tokenizer's vocabulary (when there
is one) and a fingerprint of every cached split (example ids + inputs). Training from a cache
recomputes these for the recipe and refuses a mismatch (``teacher.cache_check=strict``), warns
(``warn``) or skips the check (``off``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from mentor.cache.format import CacheError, data_fingerprint, tokenizer_hash, weights_hash

CHECK_MODES = ("strict", "warn", "off")


def describe(
    teacher: nn.Module | None,
    splits: Mapping[str, Dataset],
    precision: str = "fp32",
    *,
    name: str | None = None,
    tokenizer: Any = None,
    teacher_spec: Mapping[str, Any] | None = None,
    data_spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Provenance record: teacher identity, tokenizer hash and per-split data fingerprints."""
    t = None
    if teacher is not None:
        t = {
            "name": name or type(teacher).__name__,
            "weights_sha256": weights_hash(teacher),
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "precision": precision,
            "spec": dict(teacher_spec or {}),
        }
    tok = tokenizer_hash(tokenizer)
    return {
        "teacher": t,
        "tokenizer": {"sha256": tok} if tok else None,
        "data": {
            "spec": dict(data_spec or {}),
            "splits": {
                k: {"rows": len(d), "fingerprint": data_fingerprint(d)} for k, d in splits.items()
            },
        },
    }


def _short(h: Any) -> str:
    return f"{h[:12]}…" if isinstance(h, str) and len(h) > 12 else repr(h)


def provenance_diffs(manifest: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a cache's provenance and the expected one."""
    diffs = []
    et, mt = expected.get("teacher"), manifest.get("teacher") or {}
    if et is not None:
        if mt.get("weights_sha256") != et["weights_sha256"]:
            diffs.append(
                f"teacher.weights_sha256: cache {_short(mt.get('weights_sha256'))} "
                f"({mt.get('name')}), recipe's teacher {_short(et['weights_sha256'])} "
                f"({et.get('name')})"
            )
        if mt.get("precision") != et.get("precision"):
            diffs.append(
                f"teacher.precision: cache {mt.get('precision')!r}, recipe {et.get('precision')!r}"
            )
    etok = (expected.get("tokenizer") or {}).get("sha256")
    mtok = (manifest.get("tokenizer") or {}).get("sha256")
    if etok != mtok:
        diffs.append(f"tokenizer.sha256: cache {_short(mtok)}, recipe {_short(etok)}")
    msplits = (manifest.get("data") or {}).get("splits", {})
    for split, info in (expected.get("data") or {}).get("splits", {}).items():
        have = msplits.get(split)
        if have is None:
            diffs.append(
                f"data.splits.{split}: the cache has no {split!r} split (it has "
                f"{', '.join(msplits) or 'none'}); cache it with --splits"
            )
        elif have.get("fingerprint") != info["fingerprint"]:
            diffs.append(
                f"data.splits.{split}.fingerprint: cache {_short(have.get('fingerprint'))} "
                f"({have.get('rows')} rows), recipe's data {_short(info['fingerprint'])} "
                f"({info['rows']} rows)"
            )
    return diffs


def check_provenance(
    manifest: Mapping[str, Any], expected: Mapping[str, Any], mode: str, where: str
) -> list[str]:
    """Compare provenances; ``strict`` raises :class:`CacheError`, ``warn`` warns."""
    if mode not in CHECK_MODES:
        raise ValueError(f"teacher.cache_check={mode!r}: choose one of {', '.join(CHECK_MODES)}")
    if mode == "off":
        return []
    diffs = provenance_diffs(manifest, expected)
    if not diffs:
        return []
    msg = (
        f"teacher cache {where} does not match this recipe: "
        + "; ".join(diffs)
        + ". Re-create it with `mentor cache RECIPE --out DIR`, or set "
        "teacher.cache_check=warn (or off) to use it anyway"
    )
    if mode == "strict":
        raise CacheError(msg)
    warnings.warn(msg, stacklevel=3)
    return diffs

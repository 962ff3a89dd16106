"""``source: cache``: teacher signals precomputed by ``mentor cache`` and read by example id."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mentor.teachers.base import SourceContext, TeacherOutput, TeacherSource, register_source


def _stack(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, Tensor):
        return torch.stack(items)
    if dataclasses.is_dataclass(first):
        return type(first)(
            **{
                f.name: _stack([getattr(x, f.name) for x in items])
                for f in dataclasses.fields(first)
            }
        )
    raise TypeError(f"cannot batch cached teacher signals of type {type(first).__name__}")


class CacheOptions(BaseModel):
    """``teacher.cache`` (a directory written by ``mentor cache``) and how strictly its
    provenance is checked against the recipe."""

    model_config = ConfigDict(extra="forbid")
    cache: str
    cache_check: Literal["strict", "warn", "off"] = "strict"


@register_source("cache")
class CachedTeacher(TeacherSource):
    """Teacher signals precomputed per example and looked up by ``batch["index"]``.

    ``store`` maps example id -> signal (a logits tensor, or a ``TopK``/``Sampled`` signal for
    one example); anything with ``__getitem__`` works, e.g. a dict or an on-disk cache reader.
    A store may also offer ``batch(ids)`` returning an already batched signal.

    ``features``: names of pooled features to read with ``store.features(ids, name)`` (a cache
    made with ``mentor cache --features``); they reach the objective's feature terms by name.
    A cache that stores features only (an embedding teacher) gives no logits, and its
    ``output`` feature is read automatically.
    """

    def __init__(self, store: Any, features: Sequence[str] = ()) -> None:
        """Wrap ``store``; check that the requested features are stored."""
        self.store = store
        self.taps = []
        self.device: torch.device | str = "cpu"
        manifest = getattr(store, "manifest", None)
        self.has_logits = getattr(store, "kind", "logits") is not None
        feats = list(dict.fromkeys(features))
        if manifest is not None:
            stored = list((manifest.get("signals", {}).get("features") or {}).keys())
            if not self.has_logits and "output" in stored and "output" not in feats:
                feats.append("output")
            missing = [f for f in feats if f not in stored]
            if missing:
                raise ValueError(
                    f"teacher cache {getattr(store, 'path', '')} has no feature {missing[0]!r} "
                    f"(stored: {', '.join(stored) or 'none'}); the objective's feature terms "
                    f"need it: re-create the cache with `mentor cache RECIPE --out DIR "
                    f"--features {' '.join(missing)}`"
                )
        self.features = feats

    Options = CacheOptions

    @classmethod
    def from_config(cls, ctx: SourceContext) -> CachedTeacher:
        """Open ``teacher.cache`` and check its provenance (``teacher.cache_check``)."""
        from mentor.cache import open_store

        o = ctx.cfg.teacher.options
        expected = ctx.expected_provenance() if o.cache_check != "off" else None
        return cls(open_store(o.cache, check=o.cache_check, expected=expected), features=ctx.taps)

    @classmethod
    def plan_parameters(cls, ctx: SourceContext) -> int | None:
        """The teacher parameter count recorded in the cache's manifest."""
        from mentor.cache.format import read_manifest

        return (read_manifest(ctx.cfg.teacher.options.cache).get("teacher") or {}).get("parameters")

    def to(self, device: torch.device | str) -> CachedTeacher:
        """Signals are moved to ``device`` as they are read."""
        self.device = device
        return self

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """Batch the stored signals (and features) of the batch's example ids."""
        if "index" not in batch:
            raise KeyError("a cached teacher needs batches with an 'index' field (example ids)")
        ids = [int(i) for i in batch["index"]]
        sig = None
        if self.has_logits and hasattr(self.store, "batch"):
            sig = self.store.batch(ids)
        elif self.has_logits:
            try:
                sig = _stack([self.store[i] for i in ids])
            except KeyError as e:
                raise KeyError(f"cached teacher has no signal for example id {e}") from None
        if hasattr(sig, "to"):
            sig = sig.to(self.device)
        feats = {n: self.store.features(ids, n).to(self.device) for n in self.features}
        return TeacherOutput(logits=sig, features=feats)

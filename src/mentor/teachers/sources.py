"""Teacher sources behind one interface: ``teacher(batch) -> TeacherOutput``.

- ``OnlineTeacher``: a frozen module, eval mode, run under ``torch.no_grad`` (optionally bf16);
  never wrapped in DDP.
- ``CachedTeacher``: signals looked up by example id (``batch["index"]``) in a store.
- ``EnsembleTeacher``: several teachers combined by mean of probabilities, mean of logits, or
  per-teacher normalised scores.
- ``EMATeacher``: an exponential moving average of the student (momentum self-distillation).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mentor.models import model_outputs
from mentor.teachers.taps import FeatureTaps


@dataclass
class TeacherOutput:
    """The teacher's signal for one batch: logits (dense or sparse) and tapped features."""

    logits: Any = None
    features: dict[str, Any] = field(default_factory=dict)


class TeacherSource:
    """Base interface. Subclasses implement ``__call__``; the hooks default to no-ops."""

    taps: list[str]

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """Teacher signal for ``batch``."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> TeacherSource:
        """Move to ``device`` (no-op for stores)."""
        return self

    def after_step(self, student: nn.Module) -> None:
        """Called after every optimizer step with the (unwrapped) student."""

    def state_dict(self) -> dict[str, Tensor]:
        """Trainable-state to checkpoint (only EMA teachers have one)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what ``state_dict`` returned."""


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class OnlineTeacher(TeacherSource):
    """A frozen module run on each batch under ``torch.no_grad()``."""

    def __init__(
        self, module: nn.Module, *, precision: str = "fp32", taps: Sequence[str] = ()
    ) -> None:
        """Freeze ``module``; ``taps`` are module paths whose outputs feature losses compare."""
        self.module = _freeze(module)
        self.precision = precision
        self.taps = list(taps)
        self._hooks = FeatureTaps(self.module, self.taps, role="teacher") if self.taps else None

    def to(self, device: torch.device | str) -> OnlineTeacher:
        """Move the frozen module to ``device``."""
        self.module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """Run the teacher (bf16 autocast when ``precision='bf16'``)."""
        self.module.eval()
        dev = next(self.module.parameters(), torch.empty(0)).device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = model_outputs(self.module, batch)
        feats = self._hooks.pop() if self._hooks else {}
        return TeacherOutput(logits=logits, features=feats)

    @torch.no_grad()
    def head_output(self, batch: dict[str, Any]) -> TeacherOutput:
        """Like calling the teacher, but its logits stay as final hidden states + output head.

        For a Hugging Face causal LM whose logits are ``lm_head(hidden)``: returns a
        :class:`~mentor.signals.HeadLogits` that a fused loss turns into logits chunk by chunk.
        """
        from mentor.signals import HeadLogits

        self.module.eval()
        head = linear_head(self.module)
        if head is None:
            raise ValueError(
                f"{type(self.module).__name__} has no plain linear output head (needs a Hugging "
                "Face *ForCausalLM whose logits are lm_head(hidden), without soft-capping/scale)"
            )
        dev = next(self.module.parameters(), torch.empty(0)).device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.module.base_model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
            )
        feats = self._hooks.pop() if self._hooks else {}
        return TeacherOutput(
            logits=HeadLogits(out.last_hidden_state, head.weight, head.bias), features=feats
        )


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The output head of a causal LM whose logits are exactly ``head(base_model(...))``.

    None when there is no ``base_model``/linear head, or the config rescales the logits
    (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``).
    """
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(head, nn.Linear) or not hasattr(model, "base_model"):
        return None
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return head


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


class EnsembleTeacher(TeacherSource):
    """Combine several teachers into one signal.

    ``aggregate``: ``mean_probs`` -> log of the weighted mean of probabilities (returned as
    logits; softmax recovers the mixture), ``mean_logits`` -> weighted mean of logits,
    ``normalized_scores`` -> weighted mean of per-teacher standardised scores (each teacher's
    row z-scored first, so teachers with different score scales count equally; cf. Hofstätter
    et al., "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
    Distillation", 2020). Weights default to uniform and are normalised to sum to 1.
    """

    def __init__(
        self,
        teachers: Sequence[TeacherSource],
        *,
        aggregate: str = "mean_probs",
        weights: Sequence[float] | None = None,
    ) -> None:
        """Check the aggregation and weights."""
        if len(teachers) < 1:
            raise ValueError("an ensemble needs at least one teacher")
        if aggregate not in ("mean_probs", "mean_logits", "normalized_scores"):
            raise ValueError(
                f"aggregate={aggregate!r}: choose mean_probs, mean_logits or normalized_scores"
            )
        w = torch.tensor(list(weights) if weights is not None else [1.0] * len(teachers))
        if len(w) != len(teachers) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("ensemble weights must be one non-negative number per teacher")
        self.teachers = list(teachers)
        self.aggregate = aggregate
        self.weights = (w / w.sum()).tolist()
        self.taps = []

    def to(self, device: torch.device | str) -> EnsembleTeacher:
        """Move every member."""
        for t in self.teachers:
            t.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """Aggregate the members' dense logits."""
        outs = [t(batch).logits for t in self.teachers]
        for o in outs:
            if not isinstance(o, Tensor):
                raise TypeError(
                    "ensembles combine dense logits; sparse cached members are not supported"
                )
        zs = [o.float() for o in outs]
        if self.aggregate == "mean_logits":
            agg = sum(w * z for w, z in zip(self.weights, zs))
        elif self.aggregate == "normalized_scores":
            agg = sum(
                w * (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
                for w, z in zip(self.weights, zs)
            )
        else:
            logp = torch.stack([torch.log_softmax(z, -1) for z in zs])
            logw = torch.tensor(self.weights, dtype=logp.dtype, device=logp.device).log()
            agg = torch.logsumexp(logp + logw.view(-1, *([1] * (logp.dim() - 1))), dim=0)
        return TeacherOutput(logits=agg)


class EMATeacher(OnlineTeacher):
    """Exponential moving average of the student as the teacher (momentum self-distillation).

    ``θ_T ← d·θ_T + (1−d)·θ_S`` after every optimizer step (buffers are copied). Cf. Tarvainen &
    Valpola, "Mean teachers are better role models", 2017; Caron et al., "Emerging Properties in
    Self-Supervised Vision Transformers" (DINO), 2021.
    """

    def __init__(
        self, student: nn.Module, *, decay: float = 0.999, taps: Sequence[str] = ()
    ) -> None:
        """Start from a frozen copy of ``student``."""
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        super().__init__(copy.deepcopy(student), taps=taps)
        self.decay = decay

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        """Move the average towards the student's current weights."""
        s_params = dict(student.named_parameters())
        for name, p in self.module.named_parameters():
            p.mul_(self.decay).add_(s_params[name].detach(), alpha=1 - self.decay)
        s_bufs = dict(student.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(s_bufs[name])

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the averaged weights."""
        self.module.load_state_dict(dict(state))

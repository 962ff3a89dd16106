"""Sparse teacher signals: what a teacher hands the logit losses instead of full logits.

* :class:`TopK` — the teacher's ``k`` most likely classes, their log-probabilities (temperature
  1) and the log of the remaining mass (the *tail*). ``TopK.from_logits(logits, k=V)`` is exact.
* :class:`Sampled` — class ids drawn from the teacher with their counts (random-sampling KD,
  Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", 2025).

Both are small dataclasses over tensors with the teacher's leading shape (``[N]`` or ``[B, T]``)
and support ``.to(device)``, ``.detach()``, ``.reshape(*lead)`` and indexing/slicing along the
leading dims (``sig[:, :128]``, ``sig[mask]``), which the chunked losses and caches use.
How each loss treats the missing tail is documented in ``docs/losses.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _lead_index(idx: Any) -> Any:
    """Normalise an index so that it only touches leading dims (the last dim is kept)."""
    if isinstance(idx, tuple) and any(i is Ellipsis for i in idx):
        raise IndexError("signals support indexing along leading dims only (no Ellipsis)")
    return idx


@dataclass
class TopK:
    """Teacher top-k: ``indices`` ``[..., k]`` (long), ``logprobs`` ``[..., k]``, ``tail`` ``[...]``.

    ``logprobs`` are log-softmax values at temperature 1; ``tail = log(1 - sum(exp(logprobs)))``
    is the log of the probability mass outside the kept classes (``-inf`` when ``k = V``).
    """

    indices: Tensor
    logprobs: Tensor
    tail: Tensor

    def __post_init__(self) -> None:
        if self.indices.shape != self.logprobs.shape:
            raise ValueError(
                f"TopK: indices {tuple(self.indices.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must have the same shape [..., k]"
            )
        if self.tail.shape != self.logprobs.shape[:-1]:
            raise ValueError(
                f"TopK: tail has shape {tuple(self.tail.shape)}, expected "
                f"{tuple(self.logprobs.shape[:-1])} (the leading shape)"
            )

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> TopK:
        """Keep the ``k`` most likely classes of ``logits`` ``[..., V]`` (computed in float32+)."""
        v = logits.shape[-1]
        if not 1 <= k <= v:
            raise ValueError(f"TopK.from_logits: k must be in [1, {v}], got {k}")
        with torch.no_grad():
            lp = F.log_softmax(_upcast(logits.detach()), dim=-1)
            vals, idx = lp.topk(k, dim=-1)
            rest = lp.scatter(-1, idx, float("-inf"))
            tail = torch.logsumexp(rest, dim=-1)
        return cls(idx, vals, tail)

    @property
    def k(self) -> int:
        """Number of kept classes."""
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Leading shape (the shape of the logits without the class dim)."""
        return self.tail.shape

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.logprobs.device

    def to(self, device: Any) -> TopK:
        """Move to ``device`` (or dtype-free ``.to`` arguments)."""
        return TopK(self.indices.to(device), self.logprobs.to(device), self.tail.to(device))

    def detach(self) -> TopK:
        """Detached copy (indices unchanged)."""
        return TopK(self.indices, self.logprobs.detach(), self.tail.detach())

    def reshape(self, *lead: int) -> TopK:
        """Reshape the leading dims (``-1`` allowed)."""
        k = self.k
        return TopK(
            self.indices.reshape(*lead, k),
            self.logprobs.reshape(*lead, k),
            self.tail.reshape(*lead),
        )

    def __getitem__(self, idx: Any) -> TopK:
        idx = _lead_index(idx)
        return TopK(self.indices[idx], self.logprobs[idx], self.tail[idx])

    def __len__(self) -> int:
        return self.tail.shape[0]


@dataclass
class Sampled:
    """Teacher samples: ``indices`` ``[..., n]`` drawn ids and ``counts`` ``[..., n]`` (long).

    Each row lists distinct ids with how often they were drawn; unused slots have count 0.
    ``logprobs`` (optional, ``[..., n]``) are the teacher's log-probabilities of those ids at
    ``temperature`` (the temperature the samples were drawn at). With ``logprobs`` the
    forward-KL estimate is unbiased in value and gradient; without, only in gradient (see
    ``docs/losses.md``).
    """

    indices: Tensor
    counts: Tensor
    logprobs: Tensor | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.indices.shape != self.counts.shape:
            raise ValueError(
                f"Sampled: indices {tuple(self.indices.shape)} and counts "
                f"{tuple(self.counts.shape)} must have the same shape [..., n]"
            )
        if self.logprobs is not None and self.logprobs.shape != self.indices.shape:
            raise ValueError("Sampled: logprobs must have the shape of indices")

    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        n: int,
        generator: torch.Generator | None = None,
        *,
        temperature: float = 1.0,
    ) -> Sampled:
        """Draw ``n`` ids per row from ``softmax(logits / temperature)`` (with replacement)."""
        if n < 1:
            raise ValueError(f"Sampled.from_logits: n must be >= 1, got {n}")
        lead, v = logits.shape[:-1], logits.shape[-1]
        with torch.no_grad():
            lp = F.log_softmax(_upcast(logits.detach()).reshape(-1, v) / temperature, dim=-1)
            draws = torch.multinomial(lp.exp(), n, replacement=True, generator=generator)
            draws, _ = draws.sort(dim=-1)
            first = torch.ones_like(draws, dtype=torch.bool)
            first[:, 1:] = draws[:, 1:] != draws[:, :-1]
            group = first.long().cumsum(-1) - 1  # slot of each draw's distinct id
            ids = torch.zeros_like(draws).scatter_(1, group, draws)
            counts = torch.zeros_like(draws).scatter_add_(1, group, torch.ones_like(draws))
            logp = lp.gather(1, ids)
        return cls(
            ids.reshape(*lead, n),
            counts.reshape(*lead, n),
            logp.reshape(*lead, n),
            float(temperature),
        )

    @property
    def shape(self) -> torch.Size:
        """Leading shape."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.indices.device

    def to(self, device: Any) -> Sampled:
        """Move to ``device``."""
        lp = None if self.logprobs is None else self.logprobs.to(device)
        return Sampled(self.indices.to(device), self.counts.to(device), lp, self.temperature)

    def detach(self) -> Sampled:
        """Detached copy."""
        lp = None if self.logprobs is None else self.logprobs.detach()
        return Sampled(self.indices, self.counts, lp, self.temperature)

    def reshape(self, *lead: int) -> Sampled:
        """Reshape the leading dims (``-1`` allowed)."""
        n = self.indices.shape[-1]
        lp = None if self.logprobs is None else self.logprobs.reshape(*lead, n)
        return Sampled(
            self.indices.reshape(*lead, n), self.counts.reshape(*lead, n), lp, self.temperature
        )

    def __getitem__(self, idx: Any) -> Sampled:
        idx = _lead_index(idx)
        lp = None if self.logprobs is None else self.logprobs[idx]
        return Sampled(self.indices[idx], self.counts[idx], lp, self.temperature)

    def __len__(self) -> int:
        return self.indices.shape[0]


Teacher = Tensor | TopK | Sampled

__all__ = ["Sampled", "Teacher", "TopK"]


@dataclass
class HeadLogits:
    """Dense logits kept as final hidden states and the output head: ``hidden @ weight.T + bias``.

    ``hidden`` ``[..., H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None. A fused loss
    (:func:`mentor.losses.fused_linear_loss`, the engine's ``train.fused_loss_chunk``) computes
    the teacher logits of each chunk of rows from this, so the teacher's ``[N, V]`` logits never
    exist; every other consumer calls :meth:`logits`. Behaves like a dense logits tensor for
    shape checks and position slicing (``sig[:, :-1]``).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape of the logits this stands for: ``[..., V]``."""
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def dtype(self) -> torch.dtype:
        """The logits' dtype."""
        return torch.promote_types(self.hidden.dtype, self.weight.dtype)

    @property
    def requires_grad(self) -> bool:
        """Whether any part needs a gradient (a frozen teacher: no)."""
        return any(x is not None and x.requires_grad for x in (self.hidden, self.weight, self.bias))

    def __getitem__(self, idx: Any) -> HeadLogits:
        """Select positions (leading dims only); the head is shared."""
        return HeadLogits(self.hidden[_lead_index(idx)], self.weight, self.bias)

    def logits(self) -> Tensor:
        """Materialise the full logits."""
        return F.linear(self.hidden, self.weight, self.bias)

    def to(self, device: Any) -> HeadLogits:
        """Move to ``device``."""
        b = None if self.bias is None else self.bias.to(device)
        return HeadLogits(self.hidden.to(device), self.weight.to(device), b)

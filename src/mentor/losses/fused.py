"""Fused output-head + logit loss: the loss from hidden states without full student logits."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mentor.losses._base import LOSSES
from mentor.losses._rows import run_fused
from mentor.losses.logit import ROWWISE
from mentor.registry import did_you_mean


def fused_linear_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    teacher: Any,
    *,
    loss: str = "forward_kl",
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    **hp: Any,
) -> Tensor:
    """Logit loss ``loss`` of ``hidden @ lm_head_weight.T + bias`` computed chunk by chunk.

    ``hidden`` ``[..., H]`` (e.g. ``[B, T, H]``), ``lm_head_weight`` ``[V, H]``, ``bias`` ``[V]``;
    ``teacher`` dense logits ``[..., V]``, :class:`~mentor.signals.TopK` or
    :class:`~mentor.signals.Sampled` (as the loss allows). A custom autograd function computes,
    for ``chunk_size`` rows at a time, the logits, the loss and its gradient with respect to
    ``hidden``, ``lm_head_weight`` and ``bias``, so the full ``[N, V]`` student logits and their
    intermediates never exist at once. Value and gradients equal the plain path
    ``get_loss(loss, **hp)(F.linear(hidden, W, bias), teacher, ...)``. The teacher is treated
    as constant (no gradient). Every row-wise logit loss works (not ``sinkhorn``/``dist``).
    """
    if loss not in ROWWISE:
        names = sorted(ROWWISE)
        if loss in LOSSES:
            raise ValueError(
                f"loss {loss!r} couples rows of the batch and has no fused form; use one of "
                f"{', '.join(names)}"
            )
        raise ValueError(
            f"unknown loss {loss!r}.{did_you_mean(loss, names)} Fused losses: {', '.join(names)}"
        )
    defaults = dict(LOSSES.get(loss).defaults)
    defaults.pop("chunk_size", None)
    unknown = [k for k in hp if k not in defaults]
    if unknown:
        raise ValueError(
            f"loss {loss!r} has no hyperparameter {unknown[0]!r}."
            f"{did_you_mean(unknown[0], list(defaults))} Valid hyperparameters: "
            f"{', '.join(sorted(defaults)) or '(none)'}"
        )
    builder, check = ROWWISE[loss]
    full = {**defaults, **hp}
    check(chunk_size=chunk_size, **full)
    spec = builder(**full)
    return run_fused(
        spec,
        hidden,
        lm_head_weight,
        bias,
        teacher,
        labels,
        mask,
        chunk_size=chunk_size,
        temperature=full.get("temperature", 1.0),
    )


class FusedLinearLoss(nn.Module):
    """Module form of :func:`fused_linear_loss` holding the loss name and hyperparameters."""

    def __init__(self, loss: str = "forward_kl", *, chunk_size: int = 1024, **hp: Any) -> None:
        """Store the loss name, chunk size and hyperparameters."""
        super().__init__()
        self.loss, self.chunk_size, self.hp = loss, chunk_size, hp

    def forward(
        self,
        hidden: Tensor,
        lm_head_weight: Tensor,
        teacher: Any,
        *,
        bias: Tensor | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Compute the fused loss (keyword arguments override stored hyperparameters)."""
        return fused_linear_loss(
            hidden,
            lm_head_weight,
            teacher,
            loss=self.loss,
            bias=bias,
            chunk_size=self.chunk_size,
            labels=labels,
            mask=mask,
            **{**self.hp, **kwargs},
        )

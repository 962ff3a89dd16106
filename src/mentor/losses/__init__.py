"""Distillation objectives: every loss of the spec as a pure function plus a thin module.

Logit losses accept dense teacher logits or the sparse signals of :mod:`mentor.signals`
(``TopK``, ``Sampled``) where meaningful, and a ``chunk_size`` for LLM-sized ``[B, T, V]``
logits; :func:`fused_linear_loss` computes them from hidden states and the output head without
materialising the student logits. :mod:`mentor.losses.sequence` holds the objectives for
distillation with generation (``kepo``, ``paced``, ``tsd_kd``, ``mgsr_span``), which also take
per-sequence ``groups`` / ``rewards``; :mod:`mentor.losses.xtok` the cross-tokenizer losses
(``uld``, ``gold_hybrid``) for a teacher and student with different tokenizers. See
``docs/losses.md``.
"""

from mentor.losses._base import LOSSES, Loss, get_loss, list_losses, register_loss
from mentor.losses.cts import cts_kl as cts_kl  # CTS-KL (mentor.pruning.cts)
from mentor.losses.feature import (
    attention_transfer,
    cosine_embedding,
    hint_mse,
    squarehead,
    token_relation,
)
from mentor.losses.fused import FusedLinearLoss, fused_linear_loss
from mentor.losses.logit import (
    bd_kd,
    ce,
    dist,
    dkd,
    forward_kl,
    jsd,
    kd,
    logit_mse,
    pld,
    reverse_kl,
    sinkhorn,
    skew_kl,
    skew_reverse_kl,
    taid,
    tvd,
)
from mentor.losses.objective import Objective, build_projector, describe_losses
from mentor.losses.ranking import listwise_kl, margin_mse
from mentor.losses.relational import gram_kl, rkd_angle, rkd_distance, spkd
from mentor.losses.sequence import kepo, mgsr_span, paced, step_by_step, tsd_kd
from mentor.losses.taid_schedule import TAIDScheduler
from mentor.losses.tgeo import TGeoKDLoss, tgeo_kd
from mentor.losses.xtok import align_spans, build_vocab_map, gold_hybrid, uld
from mentor.signals import Sampled, TopK

__all__ = [
    "LOSSES",
    "FusedLinearLoss",
    "Loss",
    "Objective",
    "Sampled",
    "TAIDScheduler",
    "TGeoKDLoss",
    "TopK",
    "align_spans",
    "attention_transfer",
    "bd_kd",
    "build_projector",
    "build_vocab_map",
    "ce",
    "cosine_embedding",
    "describe_losses",
    "dist",
    "dkd",
    "forward_kl",
    "gold_hybrid",
    "fused_linear_loss",
    "get_loss",
    "gram_kl",
    "hint_mse",
    "jsd",
    "kd",
    "kepo",
    "list_losses",
    "listwise_kl",
    "logit_mse",
    "margin_mse",
    "mgsr_span",
    "paced",
    "step_by_step",
    "pld",
    "register_loss",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "sinkhorn",
    "skew_kl",
    "skew_reverse_kl",
    "spkd",
    "squarehead",
    "taid",
    "tgeo_kd",
    "token_relation",
    "tsd_kd",
    "tvd",
    "uld",
]

"""CTS-KL: the pruning objective of Concrete Ticket Search (sparse network vs its dense self).

Registered as ``cts_kl``; used by :func:`mentor.pruning.cts.concrete_ticket_search`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mentor.losses import _checks as C
from mentor.losses._rows import RowSpec, kl_rows, pair_logprobs
from mentor.losses.logit import DENSE, _closed, _rkl_part, logit_loss


@logit_loss("cts_kl", check=C.checker(temperature=C.positive, chunk_size=C.chunk))
def cts_kl(*, temperature: float = 1.0) -> RowSpec:
    """CTS-KL: reverse KL(p_sparse^tau ‖ p_dense^tau) of a pruned net to its dense self, row mean.

    Paper: Arora & Teuscher, "Winning the Lottery by Preserving Network Training Dynamics with
    Concrete Ticket Search", 2025. The student is the sparse (masked) network, the teacher the
    same network with dense weights: ``L = (1/n) Σ_r Σ_c p_S^τ (log p_S^τ − log p_T^τ)`` over
    the counted rows; default τ = 1; no τ². The value equals ``reverse_kl`` with the same τ;
    the separate name marks the CTS objective (mask search) in recipes and logs. Teacher: dense
    only (the dense network is the same model, so its full logits are always at hand).
    """

    def rows(s: Tensor, t: Any, labels: Tensor | None) -> Tensor:
        lp_s, lp_t = pair_logprobs(s, t, temperature, "tail_bucket", name="cts_kl")
        return kl_rows(lp_s, lp_t)

    return RowSpec(
        "cts_kl",
        rows,
        teachers=DENSE,
        closed_form=_closed((_rkl_part(temperature), 1.0, 0)),
    )

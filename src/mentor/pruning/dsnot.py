"""DSnoT: training-free prune-and-grow refinement of an existing sparse mask.

Paper: Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs",
2023 (ICLR 2024). Given a mask (e.g. from Wanda) and per-input-feature calibration statistics,
each output row swaps one pruned weight in and one kept weight out per cycle, so that the
expected reconstruction error of the row's output shrinks while the row keeps its number of
weights (and, for N:M masks, each group keeps N).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mentor.pruning.masks import Forward, _collect, _module_dict, _rows, parse_pattern


@dataclass
class FeatureStats:
    """Calibration statistics of one module's input features (columns of ``W.reshape(out, -1)``).

    ``mean`` and ``var`` (population variance) are float32 ``[features]`` on the weight's
    device; ``count`` is the number of rows (tokens / conv patches) seen.
    """

    mean: Tensor
    var: Tensor
    count: int

    @property
    def norm(self) -> Tensor:
        """Wanda's ‖X_j‖₂ = sqrt(count·(var + mean²))."""
        return (self.count * (self.var + self.mean * self.mean)).clamp_min(0).sqrt()


def calibration_stats(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward,
    modules: Mapping[str, nn.Module],
) -> dict[str, FeatureStats]:
    """Mean and variance of every input feature of ``modules`` over the calibration batches.

    Collected like :func:`~mentor.pruning.masks.calibration_norms` (forward hooks, eval mode,
    ``torch.no_grad``, training flags restored; Linear rows = tokens, Conv2d rows = unfolded
    patches). Batch moments are computed in float32 and merged in float64 (Chan's update), so
    the variance does not suffer from the Σx² − n·mean² cancellation.
    """
    accs = _collect(model, batches, forward, modules, moments=True)
    mods = _module_dict(modules)
    out: dict[str, FeatureStats] = {}
    for name, a in accs.items():
        dev = mods[name].weight.device
        var = (a.m2 / a.count).clamp_min(0)  # type: ignore[operator]
        out[name] = FeatureStats(
            mean=a.mean.float().to(dev),  # type: ignore[union-attr]
            var=var.float().to(dev),
            count=a.count,
        )
    return out


def _row_error(eps: Tensor, varsum: Tensor) -> Tensor:
    return eps * eps + varsum


@torch.no_grad()
def dsnot(
    modules: Mapping[str, nn.Module],
    masks: dict[str, Tensor],
    stats: Mapping[str, FeatureStats],
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    *,
    pattern: str | tuple[int, int] | None = "unstructured",
    var_power: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """Refine ``masks`` in place by DSnoT prune-and-grow; returns per-module swap counts and errors.

    Paper: Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse
    LLMs", 2023 (ICLR 2024). For output row ``i`` with dense weights ``W_i``, keep-mask ``M_i``
    and input feature means ``μ`` and variances ``σ²``:

    * expected error of the row's output (what the pruned weights would have contributed):
      ``ε_i = Σ_{j pruned} W_ij μ_j``;
    * **grow** the pruned weight with the largest ``sign(ε_i)·W_ij μ_j / (σ_j²)^p`` among those
      with ``sign(ε_i)·W_ij μ_j > 0`` (it moves ε toward 0; the variance term prefers features
      whose contribution is steady — ``p = var_power``, 1 as in the official default);
    * **prune** the kept weight with the smallest Wanda score ``|W_ij|·‖X_j‖₂`` among those with
      ``sign(ε_i)·W_ij μ_j ≤ 0`` (removing it does not push ε away from 0). With an N:M
      ``pattern`` the pruned weight is instead the lowest-Wanda kept weight of the grown
      weight's group of M (any sign), so every group keeps N weights;
    * a row's swap is accepted if ``|ε_i| > update_threshold`` and it lowers the row's expected
      squared error ``ε_i² + Σ_{j pruned} W_ij² σ_j²`` (the error ``E‖(W_i − W_i⊙M_i)x‖²`` with
      the input covariance approximated by its diagonal). A rejected grow candidate is not
      tried again; weights swapped once are not swapped back.

    One swap per row per cycle, all rows in parallel, for at most ``max_cycles`` cycles or until
    no row can improve. Each row keeps its number of weights.

    **Deviation from the official code** (which accepts a swap when |ε| > threshold and ε keeps
    its sign, and stops a row at its first rejection): acceptance here is the decrease of the
    diagonal-covariance squared error (mean and variance terms), and a row keeps trying its
    next grow candidate after a rejection. The weights must still be dense (call before
    :meth:`~mentor.pruning.masks.MaskSet.apply`); they are not modified.

    Returns ``{name: {"swaps", "cycles", "error_before", "error_after", "mean_error_before",
    "mean_error_after"}}``: ``error_*`` is ``Σ_i (ε_i² + Σ_{j pruned} W_ij² σ_j²)`` (expected
    squared output error per token, diagonal covariance), ``mean_error_*`` is ``‖ε‖₂``.
    """
    if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 0:
        raise ValueError(f"max_cycles must be an integer >= 0, got {max_cycles!r}")
    thr = update_threshold
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not thr >= 0:
        raise ValueError(f"update_threshold must be a number >= 0, got {thr!r}")
    if isinstance(var_power, bool) or not isinstance(var_power, (int, float)) or var_power < 0:
        raise ValueError(f"var_power must be a number >= 0, got {var_power!r}")
    nm = parse_pattern(pattern)
    mods = _module_dict(modules)
    results: dict[str, dict[str, Any]] = {}
    for name, mod in mods.items():
        if name not in masks:
            raise ValueError(f"dsnot: no mask for module {name!r}")
        if name not in stats:
            raise ValueError(f"dsnot: no calibration stats for module {name!r}")
        w = mod.weight.detach()
        mask = masks[name]
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(
                f"mask for module {name!r} has shape {tuple(mask.shape)} but the module's weight "
                f"has shape {tuple(w.shape)}"
            )
        new_mask, info = _dsnot_module(name, w, mask, stats[name], max_cycles, thr, nm, var_power)
        masks[name] = new_mask.reshape(w.shape).to(mask.device)
        results[name] = info
    return results


def _dsnot_module(
    name: str,
    weight: Tensor,
    mask: Tensor,
    st: FeatureStats,
    max_cycles: int,
    thr: float,
    nm: tuple[int, int] | None,
    var_power: float,
) -> tuple[Tensor, dict[str, Any]]:
    dev = weight.device
    W = _rows(weight).double()
    keep = _rows(mask.to(dev, torch.bool)).clone()
    r, c = W.shape
    mu = st.mean.to(dev).double().reshape(-1)
    var = st.var.to(dev).double().reshape(-1)
    if mu.shape[0] != c or var.shape[0] != c:
        raise ValueError(
            f"calibration stats for module {name!r} have {mu.shape[0]} features but its weight "
            f"{tuple(weight.shape)} has {c} per row"
        )
    if nm is not None:
        n, m = nm
        if c % m:
            raise ValueError(
                f"pattern '{n}:{m}': module {name!r} has weight shape {tuple(weight.shape)}, "
                f"whose row length {c} is not divisible by M={m}"
            )
        per_group = keep.reshape(r, c // m, m).sum(-1)
        if not bool((per_group == n).all()):
            raise ValueError(
                f"pattern '{n}:{m}': the mask of module {name!r} does not keep exactly {n} of "
                f"every {m} weights (build it with compute_masks(..., pattern='{n}:{m}'))"
            )
    pruned = ~keep
    if bool(pruned.any()) and bool((W[pruned] == 0).all()):
        raise ValueError(
            f"dsnot: every pruned weight of module {name!r} is already zero: run dsnot on the "
            f"dense weights, before MaskSet.apply / enforce"
        )

    contrib = W * mu  # c_ij = W_ij μ_j
    q = W * W * var  # variance contribution W_ij² σ_j²
    norm = (st.count * (var + mu * mu)).clamp_min(0).sqrt()
    wanda = W.abs() * norm
    grow_metric = contrib / var.clamp_min(1e-12).pow(var_power)

    eps = (contrib * pruned).sum(1)
    varsum = (q * pruned).sum(1)
    err_before = _row_error(eps, varsum)
    mean_before = float(eps.norm())

    frozen = torch.zeros_like(keep)  # swapped once: not touched again
    tried = torch.zeros_like(keep)  # grow candidates that were rejected
    active = eps.abs() > thr
    rows = torch.arange(r, device=dev)
    swaps = 0
    cycles = 0
    neg_inf = torch.tensor(float("-inf"), dtype=W.dtype, device=dev)
    pos_inf = torch.tensor(float("inf"), dtype=W.dtype, device=dev)
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        s = torch.sign(eps).unsqueeze(1)
        signed = s * contrib
        can_grow = ~keep & ~frozen & ~tried & (signed > 0) & active.unsqueeze(1)
        has_g = can_grow.any(1)
        g = torch.where(can_grow, s * grow_metric, neg_inf).argmax(1)
        if nm is None:
            can_prune = keep & ~frozen & (signed <= 0)
            has_p = can_prune.any(1)
            p = torch.where(can_prune, wanda, pos_inf).argmin(1)
        else:
            m = nm[1]
            start = (g // m) * m
            cols = start.unsqueeze(1) + torch.arange(m, device=dev)  # [R, m]
            cand = keep.gather(1, cols) & ~frozen.gather(1, cols)
            has_p = cand.any(1)
            p = cols.gather(1, torch.where(cand, wanda.gather(1, cols), pos_inf).argmin(1, True))
            p = p.squeeze(1)
        ok = active & has_g & has_p
        c_g, c_p = contrib[rows, g], contrib[rows, p]
        q_g, q_p = q[rows, g], q[rows, p]
        eps_new = eps + c_p - c_g
        var_new = varsum + q_p - q_g
        better = _row_error(eps_new, var_new) < _row_error(eps, varsum)
        accept = ok & better
        reject = active & has_g & ~accept
        if bool(accept.any()):
            ar = rows[accept]
            keep[ar, g[accept]] = True
            keep[ar, p[accept]] = False
            frozen[ar, g[accept]] = True
            frozen[ar, p[accept]] = True
            eps = torch.where(accept, eps_new, eps)
            varsum = torch.where(accept, var_new, varsum)
            swaps += int(accept.sum())
        if bool(reject.any()):
            tried[rows[reject], g[reject]] = True
        # finished rows: nothing left to grow, nothing to prune (unstructured), or small error
        done = ~has_g | (~has_p if nm is None else torch.zeros_like(has_p))
        active = active & ~done & (eps.abs() > thr)
    err_after = _row_error(eps, varsum)
    info = {
        "swaps": swaps,
        "cycles": cycles,
        "error_before": float(err_before.sum()),
        "error_after": float(err_after.sum()),
        "mean_error_before": mean_before,
        "mean_error_after": float(eps.norm()),
    }
    return keep, info

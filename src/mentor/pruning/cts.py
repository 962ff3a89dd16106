"""Concrete Ticket Search: learn a sparse mask by a Concrete relaxation and the CTS-KL objective.

Paper: Arora & Teuscher, "Winning the Lottery by Preserving Network Training Dynamics with
Concrete Ticket Search", 2025 (arXiv 2512.07142).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mentor.losses.cts import cts_kl
from mentor.pruning.masks import Forward, _check_unit_interval, _module_dict, n_pruned

SCOPES = ("global", "layer")


class _Call(nn.Module):
    """``forward(model, batch)`` as a module, so ``functional_call`` can swap the weights."""

    def __init__(self, model: nn.Module, fn: Forward) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


def _logits_of(out: Any, where: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(
        f"concrete_ticket_search: forward(model, batch) must return the logits tensor (or an "
        f"object with .logits); got {type(out).__name__} from the {where} pass"
    )


def _positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name} must be a number > 0, got {v!r}")


def concrete_ticket_search(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Any],
    forward: Forward,
    sparsity: float,
    steps: int = 300,
    lr: float = 0.1,
    temperature: float = 0.5,
    seed: int = 0,
    *,
    kl_temperature: float = 1.0,
    init_scale: float = 1.0,
    scope: str = "global",
    log: list[dict[str, float]] | None = None,
) -> dict[str, Tensor]:
    """Search keep-masks (bool, weight-shaped) for ``modules`` at ``sparsity`` by CTS with CTS-KL.

    Paper: Arora & Teuscher, "Winning the Lottery by Preserving Network Training Dynamics with
    Concrete Ticket Search", 2025. Each weight ``w`` gets a retention logit ``θ``; a step draws a
    Binary Concrete mask ``m = σ((θ + log u − log(1 − u)) / temperature)``, ``u ~ U(0, 1)``
    (Maddison et al., "The Concrete Distribution: A Continuous Relaxation of Discrete Random
    Variables", 2017; seeded by ``seed``), runs ``forward(model, batch)`` with the weights
    ``w·m`` (``torch.func.functional_call``; the model's own parameters are untouched and get no
    gradients) and minimises CTS-KL, the reverse KL ``KL(p_sparse^τ ‖ p_dense^τ)`` to the dense
    model's outputs on the same batch (:func:`mentor.losses.cts_kl`, τ = ``kl_temperature``,
    mean over rows). The logits take Adam steps (β = 0.9, 0.999) of size ``lr``. Batches are
    cycled; the dense outputs are computed once per batch and kept (memory: one logits tensor
    per calibration batch, plus θ and two Adam moments shaped like the pruned weights). The hard mask keeps the top-k
    logits, ``k = numel − floor(sparsity·numel + 0.5)`` — over all modules together
    (``scope="global"``, the paper's setting: layer densities are learned) or per module
    (``scope="layer"``).

    **GradBalance (reconstruction).** The paper controls sparsity with a gradient-balancing
    scheme, GRADBALANCE, whose exact rule could not be read. Here: with the expected density
    ``d(θ) = mean σ(θ)`` (per scope group) and the Adam direction ``a``, the step is
    ``θ ← θ − lr·(a + λ ∇d)`` with ``λ`` chosen every step so that, to first order, the step
    lands the expected density on the target ``κ = 1 − sparsity``:
    ``λ = ((d − κ)/lr − ⟨∇d, a⟩) / ‖∇d‖²``. The density constraint is thus met without a
    penalty weight to tune, and the objective only re-distributes density among weights.
    **Initialisation (assumption):** ``θ = logit(κ) + init_scale·z`` with ``z`` the per-module
    standardised ``|w|`` (magnitude ranking as the starting point; ``init_scale=0`` starts
    uniform). The paper searches near initialisation; here any (trained) model can be pruned.

    ``forward(model, batch)`` must return the logits (a tensor, or an object with ``.logits``).
    The model runs in eval mode; submodule training flags are restored. ``log``, if given,
    receives one ``{"step", "loss", "density"}`` record per step.
    """
    _check_unit_interval(sparsity)
    for key, v in (("steps", steps), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "steps" else 0):
            raise ValueError(f"{key} must be an integer >= {1 if key == 'steps' else 0}, got {v!r}")
    _positive("lr", lr)
    _positive("temperature", temperature)
    _positive("kl_temperature", kl_temperature)
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)):
        raise ValueError(f"init_scale must be a number, got {init_scale!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}; got {scope!r}")
    mods = _module_dict(modules)
    if not mods:
        raise ValueError("concrete_ticket_search: modules is empty")
    data = list(batches)
    if not data:
        raise ValueError("concrete_ticket_search: batches is empty (pass at least one batch)")

    names = list(mods)
    weights = {n: mods[n].weight.detach() for n in names}
    keys = {n: ("model." + n if n else "model") + ".weight" for n in names}
    kappa = 1.0 - float(sparsity)
    base = math.log(kappa) - math.log1p(-kappa) if 0 < kappa < 1 else 0.0

    thetas: dict[str, Tensor] = {}
    for n in names:
        a = weights[n].float().abs()
        z = (a - a.mean()) / (a.std(correction=0) + 1e-12) if a.numel() > 1 else a * 0
        thetas[n] = (base + float(init_scale) * z).detach().requires_grad_(True)
    groups = [names] if scope == "global" else [[n] for n in names]
    totals = [sum(thetas[n].numel() for n in grp) for grp in groups]

    wrapper = _Call(model, forward)
    gens: dict[torch.device, torch.Generator] = {}

    def gen(dev: torch.device) -> torch.Generator:
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(seed)
        return gens[dev]

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            dense = [_logits_of(forward(model, b), "dense").detach() for b in data]
        m1 = {n: torch.zeros_like(thetas[n]) for n in names}
        m2 = {n: torch.zeros_like(thetas[n]) for n in names}
        b1, b2, adam_eps = 0.9, 0.999, 1e-8
        for step in range(1, steps + 1):
            i = (step - 1) % len(data)
            params = {}
            for n in names:
                th = thetas[n]
                u = torch.rand(th.shape, generator=gen(th.device), device=th.device)
                u = u.clamp(1e-6, 1 - 1e-6)
                noise = torch.log(u) - torch.log1p(-u)
                mask = torch.sigmoid((th + noise) / temperature)
                params[keys[n]] = weights[n] * mask.to(weights[n].dtype)
            out = _logits_of(functional_call(wrapper, params, (data[i],)), "sparse")
            loss = cts_kl(out, dense[i], temperature=kl_temperature)
            grads = torch.autograd.grad(loss, [thetas[n] for n in names], allow_unused=True)
            with torch.no_grad():
                direction = {}
                for n, g in zip(names, grads):
                    g = torch.zeros_like(thetas[n]) if g is None else g
                    m1[n].mul_(b1).add_(g, alpha=1 - b1)
                    m2[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                    mh = m1[n] / (1 - b1**step)
                    vh = m2[n] / (1 - b2**step)
                    direction[n] = mh / (vh.sqrt() + adam_eps)
                dens_all = 0.0
                for grp, total in zip(groups, totals):
                    sig = {n: torch.sigmoid(thetas[n]) for n in grp}
                    d = sum(float(sig[n].double().sum()) for n in grp) / total
                    gd = {n: sig[n] * (1 - sig[n]) / total for n in grp}  # ∇d
                    gd_sq = sum(float(gd[n].double().pow(2).sum()) for n in grp)
                    gd_a = sum(float((gd[n].double() * direction[n].double()).sum()) for n in grp)
                    lam = ((d - kappa) / lr - gd_a) / gd_sq if gd_sq > 0 else 0.0
                    for n in grp:
                        thetas[n].sub_(lr * (direction[n] + lam * gd[n]))
                    dens_all += d * total
            if log is not None:
                log.append(
                    {
                        "step": step,
                        "loss": float(loss.detach()),
                        "density": dens_all / float(sum(totals)),
                    }
                )
    finally:
        for m, was in flags:
            m.training = was

    masks: dict[str, Tensor] = {}
    for grp in groups:
        flat = torch.cat([thetas[n].detach().reshape(-1).float().cpu() for n in grp])
        k_prune = n_pruned(flat.numel(), float(sparsity))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        if k_prune:
            order = torch.sort(flat, stable=True).indices
            keep[order[:k_prune]] = False
        off = 0
        for n in grp:
            size = thetas[n].numel()
            masks[n] = keep[off : off + size].reshape(weights[n].shape).to(weights[n].device)
            off += size
    return {n: masks[n] for n in names}

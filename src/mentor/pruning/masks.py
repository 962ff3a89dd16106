"""Sparse masks for the ``nn.Linear`` / ``nn.Conv2d`` weights of any model.

A mask is a bool tensor shaped like the module's weight (True = keep). The pieces:

* :func:`prunable` — which modules to prune (by qualified name, exclusion by substring).
* :func:`calibration_norms` — Wanda's ‖X_j‖₂ per input feature, from forward hooks.
* :func:`compute_masks` — magnitude or Wanda scores, unstructured or N:M (e.g. 2:4).
* :class:`MaskSet` — applies, enforces, saves, loads and checks masks on a model; also the
  mask updates of adaptive sparse training (:meth:`MaskSet.update_from_weights`,
  :meth:`MaskSet.decay_masked`) driven by :class:`ASTSchedule`.

Weight layout. Every weight is viewed as rows ``W.reshape(out, -1)``: for ``nn.Linear`` the
``[out, in]`` matrix; for ``nn.Conv2d`` the ``[out, in/groups · kh · kw]`` flattening in PyTorch
order (input channel major, then kernel row, then kernel column). "Input features", Wanda
norms and N:M groups all refer to the columns of that view. Transformers' ``Conv1D`` (GPT-2,
weight stored ``[in, out]``) is not a Linear and is ignored by :func:`prunable`.

Rounding. A sparsity ``s`` over ``n`` weights prunes exactly ``floor(s·n + 0.5)`` of them
(round half up) and keeps the rest; ties in the score are broken by position (the earlier
weight is pruned first), so the count is always exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "embed", "classifier", "score")
METHODS = ("magnitude", "wanda")

# forward(model, batch) runs the model on one calibration batch (its return value is ignored by
# the statistics collectors; concrete_ticket_search uses it as the logits).
Forward = Callable[[nn.Module, Any], Any]


# ------------------------------------------------------------------------------ selection


def prunable(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = DEFAULT_EXCLUDE,
) -> dict[str, nn.Module]:
    """Qualified name -> module for every ``nn.Linear`` / ``nn.Conv2d`` to prune, in model order.

    A module is skipped when its qualified name contains any ``exclude`` substring (default:
    ``lm_head``, ``embed``, ``classifier``, ``score`` — the output heads of HF models, which
    are usually kept dense); with ``include`` it must also contain one of those substrings.
    Selection is by name only: the last Linear of a plain ``nn.Sequential`` (named ``"4"``,
    say) is pruned unless excluded explicitly. ``transformers.pytorch_utils.Conv1D`` (GPT-2)
    is not a Linear and is not listed. ``nn.MultiheadAttention.out_proj`` is a Linear whose
    forward never runs (the attention calls it functionally): prune it by magnitude only.
    """
    inc = _substrings(include, "include")
    exc = _substrings(exclude, "exclude") or ()
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if any(s in name for s in exc):
            continue
        if inc is not None and not any(s in name for s in inc):
            continue
        out[name] = mod
    return out


def _substrings(v: Sequence[str] | str | None, what: str) -> tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return (v,)
    items = tuple(v)
    if not all(isinstance(s, str) for s in items):
        raise ValueError(f"{what} must be a list of name substrings, got {v!r}")
    return items


# ---------------------------------------------------------------------------- statistics


@contextmanager
def _eval_no_grad(model: nn.Module):
    """Eval mode and no_grad for calibration; every submodule's training flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was in flags:
            m.training = was


def _features(module: nn.Module, x: Tensor) -> Tensor:
    """The module's input as ``[rows, features]`` matching the columns of ``W.reshape(out, -1)``."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"grouped Conv2d (groups={module.groups}) has no per-input-feature statistics "
                f"here: prune it by magnitude or exclude it"
            )
        if x.dim() == 3:  # unbatched [C, H, W]
            x = x.unsqueeze(0)
        pad = list(module._reversed_padding_repeated_twice)
        if any(pad):
            if module.padding_mode == "zeros":
                x = F.pad(x, pad)
            else:
                x = F.pad(x, pad, mode=module.padding_mode)
        cols = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride
        )  # [B, C·kh·kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class _FeatureAccumulator:
    """Per-feature count, Σx² and (optionally) mean / M2 (Chan's parallel update), in float64.

    Each batch is reduced in float32 on its device; the running totals are float64.
    """

    def __init__(self, moments: bool) -> None:
        self.moments = moments
        self.count = 0
        self.sumsq: Tensor | None = None
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach().float()
        n_b = x.shape[0]
        if n_b == 0:
            return
        sumsq = (x * x).sum(0).double()
        if self.sumsq is None:
            self.sumsq = torch.zeros_like(sumsq)
        self.sumsq += sumsq
        if self.moments:
            mean_b = x.mean(0)
            m2_b = ((x - mean_b) ** 2).sum(0).double()
            mean_b = mean_b.double()
            if self.mean is None:
                self.mean, self.m2 = mean_b, m2_b
            else:
                n_a = self.count
                n = n_a + n_b
                delta = mean_b - self.mean
                self.mean = self.mean + delta * (n_b / n)
                self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b / n)
        self.count += n_b


def _collect(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward,
    modules: Mapping[str, nn.Module],
    moments: bool,
) -> dict[str, _FeatureAccumulator]:
    """Run ``forward(model, batch)`` over ``batches`` with input hooks on ``modules``."""
    modules = _module_dict(modules)
    accs = {name: _FeatureAccumulator(moments) for name in modules}
    errors: list[BaseException] = []

    def hook_for(name: str, mod: nn.Module):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
            if not isinstance(x, Tensor):
                return
            try:
                accs[name].add(_features(mod, x))
            except ValueError as e:
                errors.append(ValueError(f"module {name!r}: {e}"))

        return hook

    handles = [
        mod.register_forward_hook(hook_for(name, mod), with_kwargs=True)
        for name, mod in modules.items()
    ]
    n_batches = 0
    try:
        with _eval_no_grad(model):
            for batch in batches:
                forward(model, batch)
                n_batches += 1
                if errors:
                    raise errors[0]
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ValueError("calibration: batches is empty (pass at least one batch)")
    silent = [name for name, a in accs.items() if a.count == 0]
    if silent:
        raise ValueError(
            f"calibration: module(s) {silent[:5]} never ran during the calibration forward "
            f"passes (does forward(model, batch) call them?)"
        )
    return accs


def calibration_norms(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward,
    modules: Mapping[str, nn.Module],
) -> dict[str, Tensor]:
    """Wanda's ‖X_j‖₂: the L2 norm over all calibration rows of each input feature, per module.

    Paper: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"
    (Wanda), 2023. ``forward(model, batch)`` runs the model on one batch (e.g.
    ``lambda m, b: m(**b)`` for HF dict batches); forward hooks on ``modules`` read each
    module's input. Rows are all tokens (``x.reshape(-1, in_features)``) for a Linear; for a
    Conv2d they are the unfolded patches (``F.unfold`` with the module's kernel, stride,
    dilation and padding, padding zeros included), so a norm is per column of
    ``W.reshape(out, -1)``, i.e. per (input channel, kernel position). Grouped convolutions are
    refused. Σx² is reduced in float32 per batch and accumulated in float64; the result is a
    float32 tensor ``[features]`` on the module's weight device. The model runs in eval mode
    under ``torch.no_grad``; every submodule's training flag is restored afterwards.
    """
    accs = _collect(model, batches, forward, modules, moments=False)
    mods = _module_dict(modules)
    return {
        name: a.sumsq.sqrt().float().to(mods[name].weight.device)  # type: ignore[union-attr]
        for name, a in accs.items()
    }


# ---------------------------------------------------------------------------------- masks


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"unstructured"``/None -> None; ``"N:M"`` (0 < N < M) or ``(N, M)`` -> ``(N, M)``."""
    if pattern is None or pattern == "unstructured":
        return None
    nm: tuple[int, int] | None = None
    if isinstance(pattern, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if m:
            nm = (int(m.group(1)), int(m.group(2)))
    elif (
        isinstance(pattern, tuple)
        and len(pattern) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)
    ):
        nm = (pattern[0], pattern[1])
    if nm is None or not 0 < nm[0] < nm[1]:
        raise ValueError(
            f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}"
        )
    return nm


def _check_sparsity(sparsity: Any, nm: tuple[int, int] | None) -> float:
    """The sparsity to use; for N:M it is implied (1 − N/M) and, if given, must agree."""
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None:
            _check_unit_interval(sparsity)
            if abs(float(sparsity) - implied) > 1e-9:
                raise ValueError(
                    f"sparsity={sparsity!r} contradicts pattern '{nm[0]}:{nm[1]}' (which prunes "
                    f"{implied:g}); leave sparsity=None with an N:M pattern"
                )
        return implied
    if sparsity is None:
        raise ValueError("sparsity is required with pattern='unstructured' (a number in [0, 1))")
    _check_unit_interval(sparsity)
    return float(sparsity)


def _check_unit_interval(sparsity: Any) -> None:
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not 0 <= sparsity < 1
    ):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def n_pruned(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a sparsity prunes: ``floor(sparsity·n + 0.5)`` (round half up)."""
    return min(n, int(math.floor(sparsity * n + 0.5)))


def _module_dict(modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    if not isinstance(modules, Mapping):
        raise ValueError(
            "modules must be a mapping of qualified name -> module (e.g. prunable(model)), got "
            f"{type(modules).__name__}"
        )
    for name, mod in modules.items():
        if not isinstance(getattr(mod, "weight", None), Tensor):
            raise ValueError(f"module {name!r} ({type(mod).__name__}) has no weight tensor")
    return dict(modules)


def _rows(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1)


def _prune_lowest(score: Tensor, k: int) -> Tensor:
    """Keep-mask over the last dim of ``score`` pruning the ``k`` lowest (stable: earlier first)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=-1, stable=True).indices[..., :k]
        keep.scatter_(-1, idx, False)
    return keep


def _nm_keep(score: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive columns of ``score [R, C]``."""
    r, c = score.shape
    groups = score.reshape(r, c // m, m)
    return _prune_lowest(groups, m - n).reshape(r, c)


def _scores(name: str, mod: nn.Module, method: str, norms: Mapping[str, Tensor] | None) -> Tensor:
    rows = _rows(mod.weight.detach()).float().abs()
    if method == "wanda":
        norm = None if norms is None else norms.get(name)
        if norm is None:
            raise ValueError(
                f"method='wanda' needs norms for module {name!r} (compute them with "
                f"calibration_norms(model, batches, forward, modules))"
            )
        norm = norm.detach().reshape(-1).float().to(rows.device)
        if norm.shape[0] != rows.shape[1]:
            raise ValueError(
                f"norms for module {name!r} have {norm.shape[0]} features but its weight "
                f"{tuple(mod.weight.shape)} has {rows.shape[1]} per row"
            )
        rows = rows * norm.unsqueeze(0)
    return rows


def compute_masks(
    modules: Mapping[str, nn.Module],
    method: str = "magnitude",
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | None = "unstructured",
    norms: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep-masks (bool, True = keep, weight-shaped) for ``modules`` by magnitude or Wanda.

    * ``method="magnitude"``: score ``|W_ij|``; unstructured masks threshold the whole layer
      (exactly ``floor(s·numel + 0.5)`` weights of the layer pruned). As in Han et al.,
      "Learning both Weights and Connections for Efficient Neural Networks", 2015.
    * ``method="wanda"``: score ``|W_ij|·‖X_j‖₂`` (``norms`` from :func:`calibration_norms`),
      compared per output row (each row prunes ``floor(s·row_len + 0.5)``). Paper: Sun et al.,
      "A Simple and Effective Pruning Approach for Large Language Models" (Wanda), 2023.
    * ``pattern="N:M"`` (e.g. ``"2:4"``): in every group of M consecutive columns of each row of
      ``W.reshape(out, -1)`` keep the N highest scores (both methods). The sparsity is then
      ``1 − N/M``; ``sparsity`` may be left None (if given it must agree). Each module's row
      length must be divisible by M. The 2:4 format of sparse tensor cores: Mishra et al.,
      "Accelerating Sparse Deep Neural Networks", 2021.

    Ties are broken by position (earlier pruned first), so the counts are exact. Bad settings
    raise ``ValueError`` naming the setting (and the module, where one is at fault).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    nm = parse_pattern(pattern)
    s = _check_sparsity(sparsity, nm)
    mods = _module_dict(modules)
    if nm is not None:
        for name, mod in mods.items():
            cols = _rows(mod.weight).shape[1]
            if cols % nm[1]:
                raise ValueError(
                    f"pattern '{nm[0]}:{nm[1]}': module {name!r} has weight shape "
                    f"{tuple(mod.weight.shape)}, whose row length {cols} is not divisible by "
                    f"M={nm[1]}; exclude it or use pattern='unstructured'"
                )
    out: dict[str, Tensor] = {}
    for name, mod in mods.items():
        score = _scores(name, mod, method, norms)
        if nm is not None:
            keep = _nm_keep(score, *nm)
        elif method == "wanda":
            keep = _prune_lowest(score, n_pruned(score.shape[1], s))
        else:
            keep = _prune_lowest(score.reshape(-1), n_pruned(score.numel(), s))
        out[name] = keep.reshape(mod.weight.shape).to(mod.weight.device)
    return out


# -------------------------------------------------------------------------------- MaskSet


def _as_bool(t: Any, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"mask for module {name!r} must be a tensor, got {type(t).__name__}")
    if t.dtype == torch.bool:
        return t
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"mask for module {name!r} must be bool (or hold only 0/1), got {t.dtype}")
    return t != 0


class MaskSet:
    """Keep-masks of a model's prunable weights, keyed by qualified module name.

    Typical use::

        mods = prunable(model)
        norms = calibration_norms(model, batches, lambda m, b: m(**b), mods)
        masks = MaskSet.compute(mods, "wanda", 0.5, norms=norms)   # or pattern="2:4"
        masks.apply(model)                  # zero the pruned weights once
        ...                                 # every training step:
        optimizer.step(); masks.enforce(model)

    ``enforce`` after every optimizer step keeps pruned weights exactly 0 (AdamW's weight decay
    and momentum would otherwise move them). :meth:`attach_grad_hooks` additionally zeroes the
    gradients of pruned weights so Adam's moments for them stay 0. Checkpoint the masks with
    :meth:`state_dict` / :meth:`load_state_dict` (bool tensors keyed ``mask.<module name>``).
    ``pattern`` records the N:M pattern the masks were built with (used by
    :meth:`update_from_weights`); it is not part of the state dict.
    """

    def __init__(
        self, masks: Mapping[str, Tensor] | None = None, *, pattern: str | None = None
    ) -> None:
        self.masks: dict[str, Tensor] = {
            name: _as_bool(t, name) for name, t in (masks or {}).items()
        }
        nm = parse_pattern(pattern)
        self.pattern: str | None = None if nm is None else f"{nm[0]}:{nm[1]}"

    # ------------------------------------------------------------------ construction
    @classmethod
    def compute(
        cls,
        modules: Mapping[str, nn.Module],
        method: str = "magnitude",
        sparsity: float | None = None,
        pattern: str | tuple[int, int] | None = "unstructured",
        norms: Mapping[str, Tensor] | None = None,
    ) -> MaskSet:
        """:func:`compute_masks` wrapped in a MaskSet that remembers the pattern."""
        masks = compute_masks(modules, method, sparsity, pattern, norms)
        nm = parse_pattern(pattern)
        return cls(masks, pattern=None if nm is None else f"{nm[0]}:{nm[1]}")

    @classmethod
    def from_zeros(
        cls, model: nn.Module, modules: Mapping[str, nn.Module] | Iterable[str] | None = None
    ) -> MaskSet:
        """Masks from the exact zeros of a saved sparse model (``weight != 0`` = keep).

        ``modules``: a name -> module mapping, a list of names, or None for :func:`prunable`.
        A weight that happens to be exactly 0 in a dense model also counts as pruned.
        """
        if modules is None:
            names = list(prunable(model))
        elif isinstance(modules, Mapping):
            names = list(modules)
        else:
            names = list(modules)
        out = cls()
        for name in names:
            w = out._weight(model, name, check=False)
            out.masks[name] = w.detach() != 0
        return out

    # ----------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def __iter__(self):
        return iter(self.masks)

    def __getitem__(self, name: str) -> Tensor:
        return self.masks[name]

    def names(self) -> list[str]:
        """Module names, in insertion order."""
        return list(self.masks)

    def _module(self, model: nn.Module, name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"mask for module {name!r}: the model has no such submodule") from None

    def _weight(self, model: nn.Module, name: str, check: bool = True) -> Tensor:
        mod = self._module(model, name)
        w = getattr(mod, "weight", None)
        if not isinstance(w, Tensor):
            raise ValueError(f"mask for module {name!r}: {type(mod).__name__} has no weight tensor")
        if check:
            mask = self.masks[name]
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(
                    f"mask for module {name!r} has shape {tuple(mask.shape)} but the module's "
                    f"weight has shape {tuple(w.shape)}"
                )
            if mask.device != w.device:  # follow the model (moved once, not every step)
                self.masks[name] = mask.to(w.device)
        return w

    def check_shapes(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (naming the module and both shapes) on any shape mismatch."""
        for name in self.masks:
            self._weight(model, name)

    # ----------------------------------------------------------------- application
    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Set the pruned weights to exactly +0.0, in place."""
        for name in self.masks:
            w = self._weight(model, name)
            w.masked_fill_(~self.masks[name], 0.0)

    def enforce(self, model: nn.Module) -> None:
        """Same as :meth:`apply`; call it after every ``optimizer.step()`` (and after loading)."""
        self.apply(model)

    def attach_grad_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """Zero the gradients of pruned weights as they are computed; returns the hook handles.

        With zero gradients Adam's moments for pruned weights stay 0, so together with
        :meth:`enforce` nothing of a pruned weight survives. The hooks read the current mask
        at every backward (mask updates are seen). Remove them with ``h.remove()``.
        """
        handles = []
        for name in self.masks:
            w = self._weight(model, name)
            handles.append(w.register_hook(self._grad_hook(name)))
        return handles

    def _grad_hook(self, name: str) -> Callable[[Tensor], Tensor]:
        def hook(g: Tensor) -> Tensor:
            return g.masked_fill(~self.masks[name].to(g.device), 0.0)

        return hook

    # --------------------------------------------------------------------- reports
    @torch.no_grad()
    def sparsity(self, model: nn.Module) -> dict[str, Any]:
        """Fraction of exact zeros in the masked weights, per module and overall.

        ``{"modules": {name: {"nonzero", "total", "sparsity"}}, "nonzero", "total",
        "sparsity"}`` — counts are parameter counts of the weights (biases not included).
        """
        per: dict[str, dict[str, Any]] = {}
        nz_all = tot_all = 0
        for name in self.masks:
            w = self._weight(model, name, check=False)
            nz, tot = int((w != 0).sum()), w.numel()
            per[name] = {"nonzero": nz, "total": tot, "sparsity": 1 - nz / tot if tot else 0.0}
            nz_all += nz
            tot_all += tot
        return {
            "modules": per,
            "nonzero": nz_all,
            "total": tot_all,
            "sparsity": 1 - nz_all / tot_all if tot_all else 0.0,
        }

    @torch.no_grad()
    def check_nm(self, model: nn.Module, n: int = 2, m: int = 4, strict: bool = False) -> bool:
        """True if every group of ``m`` consecutive weights of each row has at most ``n`` nonzeros.

        Checks the model's weights (what sparse kernels see), for the modules of this set,
        along the columns of ``W.reshape(out, -1)``. A row length not divisible by ``m`` fails.
        ``strict=True`` raises ``ValueError`` naming the module, row and group instead.
        """
        parse_pattern(f"{n}:{m}")
        for name in self.masks:
            rows = _rows(self._weight(model, name, check=False).detach())
            if rows.shape[1] % m:
                if strict:
                    raise ValueError(
                        f"module {name!r}: row length {rows.shape[1]} of weight "
                        f"{tuple(self._weight(model, name, check=False).shape)} is not "
                        f"divisible by M={m}"
                    )
                return False
            nz = (rows != 0).reshape(rows.shape[0], -1, m).sum(-1)
            bad = nz > n
            if bool(bad.any()):
                if strict:
                    r, g = (int(v) for v in bad.nonzero()[0])
                    raise ValueError(
                        f"module {name!r} breaks the {n}:{m} pattern: row {r}, group {g} "
                        f"(columns {g * m}..{g * m + m - 1}) has {int(nz[r, g])} nonzeros"
                    )
                return False
        return True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        """``{"mask.<module name>": bool tensor}`` (CPU copies), e.g. for safetensors."""
        return {f"mask.{name}": t.detach().to("cpu", copy=True) for name, t in self.masks.items()}

    def load_state_dict(
        self, state: Mapping[str, Tensor], model: nn.Module | None = None, strict: bool = True
    ) -> None:
        """Restore masks saved by :meth:`state_dict` exactly.

        Keys must be ``mask.<module name>``. When this set already holds masks, a mask of a
        different shape raises ``ValueError`` naming the module and both shapes, and (with
        ``strict``) the module names must be the same. With ``model`` the shapes are also
        checked against its weights and the masks moved to their devices.
        """
        new: dict[str, Tensor] = {}
        for key, t in state.items():
            if not key.startswith("mask."):
                raise ValueError(
                    f"unexpected key {key!r} in a MaskSet state dict (keys are 'mask.<module name>')"
                )
            name = key[len("mask.") :]
            t = _as_bool(t, name)
            old = self.masks.get(name)
            if old is not None and tuple(old.shape) != tuple(t.shape):
                raise ValueError(
                    f"mask for module {name!r} in the state dict has shape {tuple(t.shape)} but "
                    f"this MaskSet's mask has shape {tuple(old.shape)}"
                )
            new[name] = t.detach().clone()
        if strict and self.masks and set(new) != set(self.masks):
            missing = sorted(set(self.masks) - set(new))
            unexpected = sorted(set(new) - set(self.masks))
            raise ValueError(
                f"MaskSet state dict does not match: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}"
            )
        old_masks = self.masks
        self.masks = new
        if model is not None:
            try:
                self.check_shapes(model)
            except ValueError:
                self.masks = old_masks
                raise

    # -------------------------------------------------------- adaptive sparse training
    @torch.no_grad()
    def update_from_weights(
        self,
        model: nn.Module,
        method: str = "magnitude",
        sparsity: float | None = None,
        pattern: str | tuple[int, int] | None = None,
        norms: Mapping[str, Tensor] | None = None,
    ) -> int:
        """Recompute every mask from the model's current weights; returns how many entries flipped.

        ``pattern`` defaults to the set's own (``self.pattern``, else unstructured). With an
        unstructured pattern and ``sparsity=None`` each module keeps its current number of
        weights (so non-uniform layer densities, e.g. from CTS, are preserved). Used by
        adaptive sparse training (:class:`ASTSchedule`): pruned weights that grew back become
        kept, kept weights that shrank become pruned — the mask update of Huang et al.,
        "Pruning Large Language Models with Semi-Structural Adaptive Sparse Training", 2024.
        """
        if pattern is None:
            pattern = self.pattern or "unstructured"
        nm = parse_pattern(pattern)
        flips = 0
        new: dict[str, Tensor] = {}
        for name, old in self.masks.items():
            mod = self._module(model, name)
            self._weight(model, name)
            s = sparsity
            if nm is None and s is None:
                n = old.numel()
                s = (n - int(old.sum())) / n if n else 0.0
            keep = compute_masks({name: mod}, method, s, pattern, norms)[name]
            flips += int((keep != self.masks[name]).sum())
            new[name] = keep
        self.masks = new
        if nm is not None:
            self.pattern = f"{nm[0]}:{nm[1]}"
        return flips

    @torch.no_grad()
    def decay_masked(self, model: nn.Module, strength: float) -> None:
        """Shrink the pruned weights in place: ``W ← (1 − strength)·W`` where the mask is False.

        The soft alternative to :meth:`apply` (``strength=1`` is the same as apply) used by
        adaptive sparse training between mask updates: the decay term of SR-STE (Zhou et al.,
        "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch", 2021) as
        annealed by AST (Huang et al., "Pruning Large Language Models with Semi-Structural
        Adaptive Sparse Training", 2024), applied as a decoupled step (see :class:`ASTSchedule`).
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        if strength == 0:
            return
        for name in self.masks:
            w = self._weight(model, name)
            pruned = ~self.masks[name]
            if strength == 1:
                w.masked_fill_(pruned, 0.0)
            else:
                w.copy_(torch.where(pruned, w * (1 - strength), w))


# ------------------------------------------------------------------------------------ AST


@dataclass
class ASTSchedule:
    """Adaptive sparse training: masks re-selected from the weights, pruned weights decayed.

    Paper: Huang et al., "Pruning Large Language Models with Semi-Structural Adaptive Sparse
    Training" (AST), 2024 (AAAI 2025). AST trains a 2:4 (or unstructured) sparse student by
    distillation from its dense self while the mask stays free: every few steps the mask is
    recomputed from the current weights by magnitude (or Wanda), so pruned weights that grow
    back can return; pruned weights are pushed to zero by a decay term (annealed SR-STE) rather
    than cut. The decay coefficient rises linearly from 0 to its maximum over the first part of
    training and then stays constant ("annealing"); a final hard mask ends it.

    **Reconstruction / deviation.** AST (and SR-STE: Zhou et al., "Learning N:M Fine-grained
    Structured Sparse Neural Networks From Scratch", 2021) run the forward pass with the sparse
    weights ``W⊙M`` and pass the gradient straight through to the dense weights, adding
    ``λ_W(t)·(¬M)⊙W`` to the gradient (inside AdamW). mentor trains ordinary modules, so here
    the forward pass uses the dense weights and, after each optimizer step, the pruned weights
    are shrunk multiplicatively by ``decay(t)`` (:meth:`MaskSet.decay_masked`) — the decay term
    applied as a decoupled step. Schedule as in the official code: ``decay(t) = max_decay ·
    min(1, t / ramp_steps)``, mask update every ``update_every`` steps (official default 10);
    the ramp defaults to half of training (official: ``increase_step = max_iters / 2``). At
    ``harden_at`` (default 90% of ``total_steps``) the mask is recomputed one last time and
    applied hard; from then on every call enforces it. ``max_decay`` (default 0.01 per step)
    is this reconstruction's own setting, not the paper's λ_W (which is a gradient coefficient).

    Use::

        ast = ASTSchedule(total_steps=T, pattern="2:4")
        masks = ast.init_masks(model)            # magnitude (or method="wanda" + norms)
        for step in range(1, T + 1):
            ... loss.backward(); optimizer.step()
            info = ast.after_step(masks, model, step)   # {"flipped", "decay", "hard"}

    The schedule holds no state besides its settings: on resume restore the masks
    (:meth:`MaskSet.load_state_dict`) and keep calling :meth:`after_step` with the step count.
    """

    total_steps: int
    pattern: str = "2:4"
    sparsity: float | None = None
    method: str = "magnitude"
    update_every: int = 10
    max_decay: float = 0.01
    ramp_steps: int | None = None
    harden_at: int | None = None
    norms: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        for key in ("total_steps", "update_every"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        nm = parse_pattern(self.pattern)
        _check_sparsity(self.sparsity, nm)
        if self.method not in METHODS:
            raise ValueError(
                f"method must be one of {', '.join(map(repr, METHODS))}; got {self.method!r}"
            )
        if self.method == "wanda" and self.norms is None:
            raise ValueError("method='wanda' needs norms (from calibration_norms)")
        d = self.max_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise ValueError(f"max_decay must be a number in [0, 1], got {d!r}")
        if self.ramp_steps is None:
            self.ramp_steps = max(1, self.total_steps // 2)
        if self.harden_at is None:
            self.harden_at = max(1, int(round(0.9 * self.total_steps)))
        for key in ("ramp_steps", "harden_at"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")

    def decay(self, step: int) -> float:
        """The per-step shrink factor of pruned weights after ``step`` optimizer steps."""
        return float(self.max_decay) * min(1.0, step / float(self.ramp_steps))  # type: ignore[arg-type]

    def init_masks(
        self, model: nn.Module, modules: Mapping[str, nn.Module] | None = None
    ) -> MaskSet:
        """The starting masks (``modules`` default :func:`prunable`); weights are not changed."""
        mods = prunable(model) if modules is None else modules
        return MaskSet.compute(mods, self.method, self.sparsity, self.pattern, self.norms)

    def after_step(self, masks: MaskSet, model: nn.Module, step: int) -> dict[str, Any]:
        """Call after every optimizer step with the number of steps completed (1, 2, ...)."""
        flipped = 0
        if step >= self.harden_at:  # type: ignore[operator]
            if step == self.harden_at:
                flipped = masks.update_from_weights(
                    model, self.method, self.sparsity, self.pattern, self.norms
                )
            masks.enforce(model)
            return {"flipped": flipped, "decay": 1.0, "hard": True}
        if step % self.update_every == 0:
            flipped = masks.update_from_weights(
                model, self.method, self.sparsity, self.pattern, self.norms
            )
        d = self.decay(step)
        masks.decay_masked(model, d)
        return {"flipped": flipped, "decay": d, "hard": False}

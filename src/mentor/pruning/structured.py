"""Structured (width and depth) pruning that leaves a genuinely smaller dense model.

Rows and columns of the weight matrices are removed and the model's config is updated, so
the pruned model runs as is, and ``save_pretrained`` / ``from_pretrained`` (and mentor's
``save_model`` / ``load_model``) reproduce it. Minitron's recipe: score units on a few
calibration batches (:mod:`mentor.pruning.importance`), keep the most important ones, then
distil from the original model (Muralidharan et al., "Compact Language Models via Pruning and
Knowledge Distillation", 2024; Sreenivas et al., "LLM Pruning and Distillation in Practice:
The Minitron Approach", 2024).

Supported:

- Llama-family decoders (:func:`prune_heads`, :func:`prune_mlp`, :func:`prune_hidden`,
  :func:`prune_depth`, :func:`prune_structured`, :func:`width_prune_plan`);
- BERT-style encoders, bare or in ``HFClassifier`` / ``HFEmbedder`` (heads, intermediate
  channels, depth); see :func:`restore_pruned_heads` for reloading head-pruned encoders;
- ``nn.Sequential`` CNNs as built by mentor's ``cnn`` builder (:func:`prune_channels`).

Transformer functions prune **in place** and return the model (copy it first to keep the
original). Index lists always refer to the model's current numbering. Counts are numbers of
units **kept**; fractions (floats in (0, 1]) are fractions kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mentor.pruning.importance import (
    BertLayout,
    LlamaLayout,
    TransformerImportance,
    conv_layers,
    filter_l1_importance,
    layout,
)

GQA_MODES = ("queries", "groups")

# ----------------------------------------------------------------------------- tensor surgery


def _idx(keep: Sequence[int], device: torch.device) -> Tensor:
    return torch.as_tensor(list(keep), dtype=torch.long, device=device)


def _expand(units: Sequence[int], size: int) -> list[int]:
    """Indices of the ``size``-wide blocks ``units`` (e.g. the rows of some heads)."""
    return [u * size + k for u in units for k in range(size)]


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=like.requires_grad)


def _slice_linear(
    lin: nn.Linear, out: Sequence[int] | None = None, inp: Sequence[int] | None = None
) -> None:
    """Keep output rows ``out`` and input columns ``inp`` of ``lin`` (in place)."""
    w = lin.weight.data
    if out is not None:
        w = w.index_select(0, _idx(out, w.device))
        if lin.bias is not None:
            lin.bias = _param(lin.bias.data.index_select(0, _idx(out, w.device)), lin.bias)
        lin.out_features = len(out)
    if inp is not None:
        w = w.index_select(1, _idx(inp, w.device))
        lin.in_features = len(inp)
    lin.weight = _param(w, lin.weight)


def _slice_vector_params(m: nn.Module, keep: Sequence[int], scale: float = 1.0) -> None:
    """Keep entries ``keep`` of a norm's weight (times ``scale``) and bias (in place)."""
    w = m.weight.data
    new = w.index_select(0, _idx(keep, w.device))
    if scale != 1.0:
        new = (new.float() * scale).to(w.dtype)
    m.weight = _param(new, m.weight)
    b = getattr(m, "bias", None)
    if isinstance(b, nn.Parameter):
        m.bias = _param(b.data.index_select(0, _idx(keep, w.device)), b)
    if hasattr(m, "normalized_shape"):
        m.normalized_shape = (len(keep),)


def _set_attrs(m: nn.Module, names: Sequence[str], value: Any) -> None:
    for n in names:
        if isinstance(getattr(m, n, None), int):
            setattr(m, n, value)


def _check_config(cfg: Any, setting: str, **changes: Any) -> None:
    """Fail early (naming ``setting``) when the new config would not reload in transformers."""
    trial = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(trial, k, v)
    validate = getattr(trial, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as e:  # transformers' strict-config errors wrap the reason
            reason = str(getattr(e, "__cause__", None) or e).strip().splitlines()[-1]
            new = ", ".join(f"{k}={v}" for k, v in changes.items())
            raise ValueError(
                f"{setting}: the pruned model's config ({new}) fails "
                f"{type(cfg).__name__}'s own check, so it could not be reloaded: {reason}"
            ) from None


# ----------------------------------------------------------------------------- choosing units


def _count(value: Any, total: int, setting: str, unit: str) -> int:
    """Units to keep: an int count (1..total) or a float fraction kept in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{setting}={value!r}: give a count (int) or a fraction in (0, 1]")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0 or math.isnan(value):
            raise ValueError(f"{setting}={value}: a fraction kept must be in (0, 1]")
        return max(1, round(value * total))
    if value > total:
        raise ValueError(
            f"{setting}={value}: the model has {total} {unit}; a prune keeps 1..{total}"
        )
    if value < 1:
        raise ValueError(f"{setting}={value}: must keep at least one of the {total} {unit}")
    return int(value)


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending (ties: lower index first)."""
    s = scores.detach().float().cpu()
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    return sorted(order[:k])


def _check_indices(keep: Sequence[int], n: int, setting: str, unit: str) -> list[int]:
    try:
        ks = [int(i) for i in keep]
    except (TypeError, ValueError):
        raise ValueError(f"{setting}: {keep!r} is not a list of {unit} indices") from None
    if not ks:
        raise ValueError(f"{setting}: keeps no {unit}; keep at least one of {n}")
    bad = [i for i in ks if not 0 <= i < n]
    if bad:
        raise ValueError(f"{setting}: {unit} indices {bad} are out of range 0..{n - 1}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"{setting}: {unit} indices {ks} are duplicated")
    return sorted(ks)


def _scores(
    importance: TransformerImportance | None, attr: str, n_layers: int, setting: str
) -> list[Tensor] | Tensor | None:
    if importance is None:
        return None
    v = getattr(importance, attr)
    if attr in ("heads", "intermediate") and len(v) != n_layers:
        raise ValueError(
            f"{setting}: importance has {len(v)} layers, the model {n_layers} (score the "
            "model being pruned, before any depth pruning)"
        )
    return v


def _per_layer(
    keep: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    counts: Sequence[int],
    setting: str,
    unit: str,
) -> list[list[int]]:
    """Normalise explicit per-layer index lists (a list per layer, or {layer: list})."""
    n = len(counts)
    if isinstance(keep, Mapping):
        bad = [i for i in keep if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"{setting}: layers {bad} are out of range 0..{n - 1}")
        rows = [keep.get(i, keep.get(str(i), range(counts[i]))) for i in range(n)]  # type: ignore[call-overload]
    else:
        rows = list(keep)
        if len(rows) != n:
            raise ValueError(
                f"{setting}: got index lists for {len(rows)} layers, the model has {n}"
            )
    return [
        _check_indices(r, counts[i], f"{setting} (layer {i})", unit) for i, r in enumerate(rows)
    ]


# ----------------------------------------------------------------------------- Llama family


def _llama_head_dim(lay: LlamaLayout) -> int:
    return int(lay.layers[0].self_attn.head_dim)


def _llama_heads(lay: LlamaLayout) -> tuple[int, int]:
    attn = lay.layers[0].self_attn
    hd = attn.head_dim
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd


def _select_llama_heads(
    lay: LlamaLayout, n_keep: int, scores: list[Tensor] | None, gqa: str, setting: str
) -> list[list[int]]:
    """Per-layer query heads to keep: top-``n_keep`` by score, honouring the KV groups."""
    h, kv = _llama_heads(lay)
    g = h // kv
    out = []
    for i, layer in enumerate(lay.layers):
        if scores is not None:
            s = scores[i].float().cpu()
            if len(s) != h:
                raise ValueError(f"{setting}: importance has {len(s)} heads in layer {i}, not {h}")
        else:  # data-free: norm of each head's columns of o_proj
            w = layer.self_attn.o_proj.weight.detach().float()
            s = w.reshape(w.shape[0], h, -1).norm(dim=(0, 2)).cpu()
        if gqa == "queries":
            if n_keep % kv:
                raise ValueError(
                    f"{setting}={n_keep}: with gqa='queries' every one of the "
                    f"num_key_value_heads={kv} KV groups keeps the same number of query heads, "
                    f"so the count kept must be a multiple of {kv} (or use gqa='groups')"
                )
            per = n_keep // kv
            keep = []
            for grp in range(kv):
                keep += [grp * g + j for j in _top(s[grp * g : (grp + 1) * g], per)]
        else:
            if n_keep % g:
                raise ValueError(
                    f"{setting}={n_keep}: with gqa='groups' whole KV groups of {g} query heads "
                    f"are kept, so the count kept must be a multiple of {g} (or use "
                    "gqa='queries')"
                )
            grp_scores = s.reshape(kv, g).sum(1)
            keep = _expand(_top(grp_scores, n_keep // g), g)
        out.append(sorted(keep))
    return out


def _llama_head_plan(
    lay: LlamaLayout, keep: list[list[int]], setting: str
) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    """Per-layer (query heads, KV heads) kept, and the new head counts; refuses what GQA can't do."""
    h, kv = _llama_heads(lay)
    g = h // kv
    plans = []
    for i, ks in enumerate(keep):
        groups: dict[int, list[int]] = {}
        for q in ks:
            groups.setdefault(q // g, []).append(q)
        sizes = sorted({len(v) for v in groups.values()})
        if len(sizes) != 1:
            detail = ", ".join(f"group {k}: {v}" for k, v in sorted(groups.items()))
            raise ValueError(
                f"{setting}: layer {i} keeps query heads {ks} ({detail}); with grouped-query "
                f"attention ({h} query heads sharing {kv} KV heads) every KV group that stays "
                "must keep the same number of its query heads"
            )
        plans.append((ks, sorted(groups)))
    shapes = sorted({(len(q), len(k)) for q, k in plans})
    if len(shapes) != 1:
        raise ValueError(
            f"{setting}: layers keep different numbers of (query, KV) heads {shapes}; one "
            "config describes every layer, so all layers must keep the same numbers"
        )
    return plans, shapes[0][0], shapes[0][1]


def _prune_llama_heads(
    lay: LlamaLayout, plans: list[tuple[list[int], list[int]]], new_h: int, new_kv: int
) -> None:
    hd = _llama_head_dim(lay)
    for layer, (qs, kvs) in zip(lay.layers, plans):
        attn = layer.self_attn
        q_rows, kv_rows = _expand(qs, hd), _expand(kvs, hd)
        _slice_linear(attn.q_proj, out=q_rows)
        _slice_linear(attn.k_proj, out=kv_rows)
        _slice_linear(attn.v_proj, out=kv_rows)
        _slice_linear(attn.o_proj, inp=q_rows)
        attn.num_key_value_groups = new_h // new_kv
        _set_attrs(attn, ("num_heads", "num_attention_heads"), new_h)
        _set_attrs(attn, ("num_key_value_heads", "num_kv_heads"), new_kv)
    cfg = lay.config
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = new_h, new_kv, hd


def _prune_llama_mlp(lay: LlamaLayout, keep: list[list[int]]) -> None:
    for layer, ks in zip(lay.layers, keep):
        mlp = layer.mlp
        _slice_linear(mlp.gate_proj, out=ks)
        _slice_linear(mlp.up_proj, out=ks)
        _slice_linear(mlp.down_proj, inp=ks)
        _set_attrs(mlp, ("intermediate_size",), len(ks))
    lay.config.intermediate_size = len(keep[0])


def _rms_eps_attr(m: nn.Module) -> str | None:
    for a in ("variance_epsilon", "eps"):
        if isinstance(getattr(m, a, None), float):
            return a
    return None


def _plain_rmsnorm(norm: nn.Module) -> bool:
    """True when ``norm(x) == weight * x / sqrt(mean(x**2) + eps)`` (checked on a probe)."""
    w = getattr(norm, "weight", None)
    a = _rms_eps_attr(norm)
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or a is None:
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, w.shape[0], generator=g).to(device=w.device, dtype=torch.float32)
    with torch.no_grad():
        want = w.float() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(norm, a))
        got = norm(x.to(w.dtype)).float()
    return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-4))


def _llama_extra_heads(lay: LlamaLayout, setting: str) -> list[nn.Linear]:
    """Linear heads on the final hidden states besides the output embeddings (e.g. score)."""
    core, base = lay.core, lay.base
    d = base.embed_tokens.embedding_dim
    out_emb = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    extra = []
    for n, m in core.named_children():
        if m is base or m is out_emb:
            continue
        if not (isinstance(m, nn.Linear) and m.in_features == d):
            raise ValueError(
                f"{setting}: {type(core).__name__}.{n} ({type(m).__name__}) is not a linear "
                "head on the hidden states; hidden pruning supports Llama-family models "
                "whose only other parts are such heads (lm_head, score)"
            )
        extra.append(m)
    return extra


def _prune_llama_hidden(lay: LlamaLayout, keep: list[int], norm_compensation: bool) -> None:
    core, base, cfg = lay.core, lay.base, lay.config
    d = base.embed_tokens.embedding_dim
    k = len(keep)
    extra = _llama_extra_heads(lay, "hidden")
    out_emb = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    tied = out_emb is not None and out_emb.weight is base.embed_tokens.weight
    # RMSNorm over the kept channels: scale its weight by sqrt(d/k) and eps by d/k so the
    # norm's output is unchanged when the pruned channels are zero (exact) or small.
    hidden_norms = [base.norm] + [
        n for layer in lay.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    has_qk_norms = any(
        isinstance(getattr(layer.self_attn, name, None), nn.Module)
        for layer in lay.layers
        for name in ("q_norm", "k_norm")
    )
    scale = math.sqrt(d / k) if norm_compensation else 1.0
    eps_too = norm_compensation and not has_qk_norms and isinstance(cfg.rms_norm_eps, float)
    emb = base.embed_tokens
    emb.weight = _param(emb.weight.data.index_select(1, _idx(keep, emb.weight.device)), emb.weight)
    emb.embedding_dim = k
    for nm in hidden_norms:
        _slice_vector_params(nm, keep, scale)
        a = _rms_eps_attr(nm)
        if eps_too and a is not None:
            setattr(nm, a, getattr(nm, a) * d / k)
    for layer in lay.layers:
        at, mlp = layer.self_attn, layer.mlp
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            _slice_linear(lin, inp=keep)
        _slice_linear(at.o_proj, out=keep)
        _slice_linear(mlp.down_proj, out=keep)
        _set_attrs(layer, ("hidden_size",), k)
        _set_attrs(mlp, ("hidden_size",), k)
    if tied:
        out_emb.weight = emb.weight
    elif out_emb is not None:
        _slice_linear(out_emb, inp=keep)
    for m in extra:
        _slice_linear(m, inp=keep)
    cfg.hidden_size = k
    cfg.head_dim = _llama_head_dim(lay)
    if eps_too:
        cfg.rms_norm_eps = cfg.rms_norm_eps * d / k


# ----------------------------------------------------------------------------- BERT family


def _bert_heads(layer: nn.Module) -> int:
    sa = layer.attention.self
    return sa.query.out_features // sa.attention_head_size


def _pruned_heads(cfg: Any) -> dict[int, set[int]]:
    raw = getattr(cfg, "pruned_heads", None) or {}
    return {int(k): {int(h) for h in v} for k, v in raw.items()}


def _store_pruned_heads(cfg: Any, pruned: dict[int, set[int]]) -> None:
    cfg.pruned_heads = {i: sorted(v) for i, v in sorted(pruned.items()) if v}


def _slice_bert_heads(layer: nn.Module, keep: list[int]) -> None:
    sa = layer.attention.self
    rows = _expand(keep, sa.attention_head_size)
    for lin in (sa.query, sa.key, sa.value):
        _slice_linear(lin, out=rows)
    _slice_linear(layer.attention.output.dense, inp=rows)
    sa.num_attention_heads = len(keep)
    sa.all_head_size = len(rows)


def _check_bert_record(lay: BertLayout) -> None:
    """Refuse a model whose head counts disagree with its ``config.pruned_heads``."""
    n_orig = int(lay.config.num_attention_heads)
    pruned = _pruned_heads(lay.config)
    for i, layer in enumerate(lay.layers):
        cur, left = _bert_heads(layer), n_orig - len(pruned.get(i, ()))
        if cur != left:
            raise ValueError(
                f"heads: layer {i} has {cur} heads but config.pruned_heads leaves it {left}; "
                "the config does not describe this model"
            )


def _prune_bert_heads(lay: BertLayout, keep: list[list[int]]) -> None:
    n_orig = int(lay.config.num_attention_heads)
    pruned = _pruned_heads(lay.config)
    for i, (layer, ks) in enumerate(zip(lay.layers, keep)):
        cur = _bert_heads(layer)
        if len(ks) == cur:
            continue
        remaining = [h for h in range(n_orig) if h not in pruned.get(i, set())]
        pruned.setdefault(i, set()).update(remaining[j] for j in range(cur) if j not in ks)
        _slice_bert_heads(layer, ks)
    _store_pruned_heads(lay.config, pruned)


def _prune_bert_mlp(lay: BertLayout, keep: list[list[int]]) -> None:
    for layer, ks in zip(lay.layers, keep):
        _slice_linear(layer.intermediate.dense, out=ks)
        _slice_linear(layer.output.dense, inp=ks)
    lay.config.intermediate_size = len(keep[0])


def restore_pruned_heads(model: nn.Module) -> nn.Module:
    """Re-apply ``config.pruned_heads`` to a BERT-style model freshly built from its config.

    transformers 5 no longer prunes heads itself, so a head-pruned encoder saved with its
    config rebuilds at full width; call this after ``AutoModel.from_config(config)`` and
    before loading the saved weights (as :func:`load_pruned` does). Layers
    already pruned are left alone; models without ``pruned_heads`` are returned unchanged.
    The entry has transformers 4's meaning (``{layer: [original head indices removed]}``), so
    transformers 4 applies it on its own when loading.
    """
    lay = layout(model)
    pruned = _pruned_heads(lay.config)
    if not pruned or not isinstance(lay, BertLayout):
        return model
    n_orig = int(lay.config.num_attention_heads)
    for i, removed in pruned.items():
        if not 0 <= i < len(lay.layers):
            raise ValueError(f"config.pruned_heads names layer {i}; the model has "
                             f"{len(lay.layers)} layers")  # fmt: skip
        layer = lay.layers[i]
        cur = _bert_heads(layer)
        if cur == n_orig - len(removed):
            continue
        if cur != n_orig:
            raise ValueError(
                f"config.pruned_heads: layer {i} has {cur} heads, neither {n_orig} (full) nor "
                f"{n_orig - len(removed)} (pruned)"
            )
        _slice_bert_heads(layer, [h for h in range(n_orig) if h not in removed])
    return model


def load_pruned(folder: str | Path, cls: Any = None) -> nn.Module:
    """Load a model saved by ``save_pretrained`` after :func:`prune_structured`.

    Pruned Llama-family models need nothing special (``cls.from_pretrained`` works); a
    head-pruned BERT-style model is built from its config, :func:`restore_pruned_heads`
    applied, then its ``model.safetensors`` loaded. ``cls`` defaults to ``AutoModel``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    cls = cls or AutoModel
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not getattr(config, "pruned_heads", None):
        return cls.from_pretrained(folder, local_files_only=True)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    restore_pruned_heads(model)
    weights = Path(folder) / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: no model.safetensors (sharded checkpoints: load "
                                "with from_config + restore_pruned_heads + your loader)")  # fmt: skip
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        model.tie_weights()
        left = [k for k in missing if k not in _tied_keys(model)]
        if unexpected or left:
            raise ValueError(f"{folder}: weights do not match the pruned model "
                             f"(missing {left[:5]}, unexpected {unexpected[:5]})")  # fmt: skip
    return model.eval()


def _tied_keys(model: nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if isinstance(keys, (dict, list, set, tuple)) else set()


# ----------------------------------------------------------------------------- public API


def _n_heads(lay: LlamaLayout | BertLayout) -> list[int]:
    if isinstance(lay, LlamaLayout):
        return [_llama_heads(lay)[0]] * len(lay.layers)
    return [_bert_heads(layer) for layer in lay.layers]


def _n_inter(lay: LlamaLayout | BertLayout) -> list[int]:
    if isinstance(lay, LlamaLayout):
        return [layer.mlp.down_proj.in_features for layer in lay.layers]
    return [layer.output.dense.in_features for layer in lay.layers]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_lists(v: Any) -> bool:
    return isinstance(v, (Sequence, Mapping)) and not isinstance(v, (str, bytes))


def _plan_heads(
    lay: LlamaLayout | BertLayout,
    value: Any,
    importance: TransformerImportance | None,
    gqa: str,
) -> list[list[int]]:
    counts = _n_heads(lay)
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa={gqa!r}: choose one of {', '.join(GQA_MODES)}")
    if _is_lists(value):
        return _per_layer(value, counts, "heads", "head")
    if not _is_number(value):
        raise ValueError(f"heads={value!r}: give a count, a fraction or per-layer index lists")
    scores = _scores(importance, "heads", len(lay.layers), "heads")
    if isinstance(lay, LlamaLayout):
        n = _count(value, counts[0], "heads", "attention heads per layer")
        if isinstance(value, float):  # round a fraction to a count the KV groups allow
            h, kv = _llama_heads(lay)
            step = kv if gqa == "queries" else h // kv
            n = max(step, round(n / step) * step)
        return _select_llama_heads(lay, n, scores, gqa, "heads")  # type: ignore[arg-type]
    keep = []
    for i, layer in enumerate(lay.layers):
        n = _count(value, counts[i], "heads", f"attention heads in layer {i}")
        if scores is not None:
            s = scores[i]  # type: ignore[index]
            if len(s) != counts[i]:
                raise ValueError(f"heads: importance has {len(s)} heads in layer {i}, the "
                                 f"model {counts[i]}")  # fmt: skip
        else:  # data-free: norm of each head's columns of the output projection
            w = layer.attention.output.dense.weight.detach().float()
            s = w.reshape(w.shape[0], counts[i], -1).norm(dim=(0, 2))
        keep.append(_top(s, n))
    return keep


def _plan_mlp(
    lay: LlamaLayout | BertLayout, value: Any, importance: TransformerImportance | None
) -> list[list[int]]:
    counts = _n_inter(lay)
    if _is_lists(value):
        keep = _per_layer(value, counts, "intermediate", "channel")
    elif _is_number(value):
        cur = max(counts)
        if isinstance(value, int) and value > cur:
            raise ValueError(
                f"intermediate={value} is larger than the current intermediate_size={cur}; "
                "pruning only shrinks"
            )
        n = _count(value, cur, "intermediate", "MLP channels per layer")
        scores = _scores(importance, "intermediate", len(lay.layers), "intermediate")
        keep = []
        for i, layer in enumerate(lay.layers):
            if scores is not None:
                s = scores[i]  # type: ignore[index]
                if len(s) != counts[i]:
                    raise ValueError(f"intermediate: importance has {len(s)} channels in "
                                     f"layer {i}, the model {counts[i]}")  # fmt: skip
            else:  # data-free: norm of each channel's column of the down projection
                down = layer.mlp.down_proj if isinstance(lay, LlamaLayout) else layer.output.dense
                s = down.weight.detach().float().norm(dim=0)
            keep.append(_top(s, n))
    else:
        raise ValueError(f"intermediate={value!r}: give a size, a fraction or per-layer "
                         "index lists")  # fmt: skip
    sizes = sorted({len(k) for k in keep})
    if len(sizes) != 1:
        raise ValueError(
            f"intermediate: layers keep different numbers of MLP channels {sizes}; one config "
            "(intermediate_size) describes every layer"
        )
    return keep


def _plan_hidden(
    lay: LlamaLayout | BertLayout, value: Any, importance: TransformerImportance | None
) -> list[int]:
    if not isinstance(lay, LlamaLayout):
        raise ValueError(
            f"hidden: hidden-size pruning supports Llama-family decoders only, not "
            f"{type(lay.core).__name__} (BERT's LayerNorm centres over all channels and its "
            "head size is hidden_size / num_attention_heads)"
        )
    _llama_extra_heads(lay, "hidden")
    norms = [lay.base.norm] + [
        n for layer in lay.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    if not all(_plain_rmsnorm(n) for n in norms):
        raise ValueError(
            f"hidden: {type(lay.core).__name__}'s norms are not plain RMSNorms "
            "(weight * x / rms(x), e.g. Gemma's (1 + weight) form), so hidden-size pruning is "
            "not supported for it; heads, intermediate and layers are"
        )
    d = lay.base.embed_tokens.embedding_dim
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return _check_indices(value, d, "hidden", "channel")
    if not _is_number(value):
        raise ValueError(f"hidden={value!r}: give a size, a fraction or channel indices")
    if isinstance(value, int) and value > d:
        raise ValueError(f"hidden={value} is larger than the current hidden_size={d}")
    n = _count(value, d, "hidden", "hidden channels")
    scores = _scores(importance, "hidden", len(lay.layers), "hidden")
    if scores is None:  # data-free: norm of each embedding column
        scores = lay.base.embed_tokens.weight.detach().float().norm(dim=0)
    if len(scores) != d:  # type: ignore[arg-type]
        raise ValueError(f"hidden: importance has {len(scores)} channels, the model {d}")  # type: ignore[arg-type]
    return _top(scores, n)  # type: ignore[arg-type]


def _plan_layers(
    lay: LlamaLayout | BertLayout, value: Any, importance: TransformerImportance | None
) -> list[int]:
    n = len(lay.layers)
    if _is_lists(value) and not isinstance(value, Mapping):
        return _check_indices(value, n, "layers", "block")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"layers={value!r}: give a number of blocks or a list of block indices")
    k = _count(value, n, "layers", "blocks")
    if importance is None:
        raise ValueError(
            f"layers={value}: a count needs importance (its block scores); or give the list of "
            "blocks to keep"
        )
    if len(importance.blocks) != n:
        raise ValueError(f"layers: importance has {len(importance.blocks)} blocks, the model {n}")
    return _top(importance.blocks, k)


def _apply(
    model: nn.Module,
    lay: LlamaLayout | BertLayout,
    *,
    heads: list[list[int]] | None = None,
    mlp: list[list[int]] | None = None,
    hidden: list[int] | None = None,
    layers: list[int] | None = None,
    norm_compensation: bool = True,
) -> nn.Module:
    """Check the whole change against the config class, then cut (heads, MLP, hidden, depth)."""
    changes: dict[str, Any] = {}
    names = []
    head_plan = None
    if heads is not None:
        names.append("heads")
        if isinstance(lay, LlamaLayout):
            head_plan = _llama_head_plan(lay, heads, "heads")
            changes.update(num_attention_heads=head_plan[1], num_key_value_heads=head_plan[2])
            changes["head_dim"] = _llama_head_dim(lay)
        else:
            _check_bert_record(lay)
    if mlp is not None:
        names.append("intermediate")
        changes["intermediate_size"] = len(mlp[0])
    if hidden is not None:
        names.append("hidden")
        changes.update(hidden_size=len(hidden), head_dim=_llama_head_dim(lay))  # type: ignore[arg-type]
    if layers is not None:
        names.append("layers")
        changes["num_hidden_layers"] = len(layers)
        for attr in ("layer_types", "mlp_only_layers"):
            v = getattr(lay.config, attr, None)
            if isinstance(v, list) and len(v) == len(lay.layers):
                changes[attr] = [v[i] for i in layers]
    if changes:
        _check_config(lay.config, "/".join(names), **changes)
    if heads is not None:
        if head_plan is not None:
            _prune_llama_heads(lay, *head_plan)  # type: ignore[arg-type]
        else:
            _prune_bert_heads(lay, heads)  # type: ignore[arg-type]
    if mlp is not None:
        if isinstance(lay, LlamaLayout):
            _prune_llama_mlp(lay, mlp)
        else:
            _prune_bert_mlp(lay, mlp)
    if hidden is not None and len(hidden) < lay.base.embed_tokens.embedding_dim:  # type: ignore[union-attr]
        _prune_llama_hidden(lay, hidden, norm_compensation)  # type: ignore[arg-type]
    if layers is not None and len(layers) < len(lay.layers):
        _prune_depth(model, lay, layers)
    return model


def prune_heads(
    model: nn.Module,
    keep_per_layer: int | float | Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    importance: TransformerImportance | None = None,
    *,
    gqa: str = "queries",
) -> nn.Module:
    """Remove attention heads (in place): q/k/v output rows and o_proj input columns.

    ``keep_per_layer``: per-layer lists of the (query) head indices to keep (a list per layer,
    or ``{layer: [...]}`` with unlisted layers kept whole), or a count / fraction kept per
    layer, chosen by ``importance.heads`` (Minitron's activation score, see
    :func:`mentor.pruning.importance.transformer_importance`) or, without importance, by the
    data-free norm of each head's output-projection columns.

    Llama family: ``num_attention_heads`` / ``num_key_value_heads`` in the config change,
    ``head_dim`` stays. Grouped-query attention (``num_key_value_heads <
    num_attention_heads``): a KV head is removed exactly when none of its query heads stays,
    and every KV group that stays must keep the same number of query heads (the model maps
    query head ``j`` to KV head ``j // group``); explicit lists that break this are refused.
    With a count, ``gqa="queries"`` (default) keeps every KV head and the best
    ``count / num_key_value_heads`` query heads of each group -- consistent with the released
    Minitron-4B config (24 query heads over Nemotron-4 15B's 8 KV groups; the paper does not
    state the rule, so this is a reconstruction); ``gqa="groups"`` keeps whole KV groups ranked
    by the sum of their query heads' scores. A fraction is rounded to the nearest count the
    mode allows. All layers keep the same numbers (one config); a count transformers' config
    check refuses (Llama: ``hidden_size`` must be a multiple of ``num_attention_heads``) is
    refused before anything is cut.

    BERT style: layers may keep different numbers of heads; the removed original indices are
    recorded in ``config.pruned_heads`` (transformers 4's format) -- reload with
    :func:`load_pruned` or :func:`restore_pruned_heads`.
    """
    lay = layout(model)
    return _apply(model, lay, heads=_plan_heads(lay, keep_per_layer, importance, gqa))


def prune_mlp(
    model: nn.Module,
    intermediate_size: int | float | Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    importance: TransformerImportance | None = None,
) -> nn.Module:
    """Remove MLP (intermediate) channels of every block (in place); sets ``intermediate_size``.

    ``intermediate_size``: the new size (count kept per layer) or fraction kept, each layer
    keeping its own top channels by ``importance.intermediate`` (Minitron's neuron score) or,
    without importance, by the norm of each channel's ``down_proj`` (BERT: ``output.dense``)
    column; or explicit per-layer index lists of equal length. Llama: rows of ``gate_proj`` /
    ``up_proj`` and columns of ``down_proj``; BERT: rows of ``intermediate.dense`` and columns
    of ``output.dense``.
    """
    lay = layout(model)
    return _apply(model, lay, mlp=_plan_mlp(lay, intermediate_size, importance))


def prune_hidden(
    model: nn.Module,
    hidden_size: int | float | Sequence[int],
    importance: TransformerImportance | None = None,
    *,
    norm_compensation: bool = True,
) -> nn.Module:
    """Remove embedding (hidden) channels everywhere (in place); sets ``hidden_size``.

    Llama family only. The same channels leave ``embed_tokens`` (columns), the input columns
    of q/k/v/gate/up projections and of ``lm_head`` (tied embeddings stay tied) or another
    linear head (``score``), the output rows of ``o_proj`` / ``down_proj``, and every
    hidden-size RMSNorm. ``hidden_size``: the new size or fraction kept (top channels by
    ``importance.hidden``, Minitron's summed norm-output score, or without importance the norm
    of each embedding column), or the explicit channel indices. Refused when the norms are
    not plain RMSNorms (checked on a probe: Gemma's ``(1 + weight)`` form is refused).

    ``norm_compensation`` (default on; our addition, not in the Minitron papers, which retrain
    anyway): an RMSNorm averages over the channels it sees, so its weight is multiplied by
    ``sqrt(d_old/d_new)`` and its eps by ``d_old/d_new`` (config ``rms_norm_eps`` too; the eps
    is left alone when the model has q/k norms sharing it). The pruned model then computes
    exactly the original function when the removed channels carry no signal, and nearly so
    when they carry little.
    """
    lay = layout(model)
    keep = _plan_hidden(lay, hidden_size, importance)
    return _apply(model, lay, hidden=keep, norm_compensation=norm_compensation)


def _prune_depth(model: nn.Module, lay: LlamaLayout | BertLayout, keep: list[int]) -> None:
    from mentor.models.hf import find_layers, set_layers

    path, blocks = find_layers(model)
    n = len(blocks)
    set_layers(model, path, nn.ModuleList(blocks[i] for i in keep))
    for j, blk in enumerate(find_layers(model)[1]):
        for m in blk.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j  # the KV-cache slot of the block
    cfg = lay.config
    cfg.num_hidden_layers = len(keep)
    for attr in ("layer_types", "mlp_only_layers"):
        v = getattr(cfg, attr, None)
        if isinstance(v, list) and len(v) == n:
            setattr(cfg, attr, [v[i] for i in keep])
    if isinstance(lay, BertLayout):
        pruned = _pruned_heads(cfg)
        _store_pruned_heads(cfg, {j: pruned[i] for j, i in enumerate(keep) if i in pruned})


def prune_depth(
    model: nn.Module,
    keep_layers: int | Sequence[int],
    importance: TransformerImportance | None = None,
) -> nn.Module:
    """Keep only some blocks (in place, in their original order).

    ``keep_layers``: the block indices to keep (distinct, in range), or a number of blocks
    with the highest ``importance.blocks`` (ShortGPT's Block Importance, Men et al., 2024;
    Minitron's depth pruning, Sreenivas et al., 2024). Updates ``num_hidden_layers`` (and
    per-layer config lists such as ``layer_types``), the attention modules' ``layer_idx``
    (their KV-cache slot) and, for BERT, the keys of ``config.pruned_heads``.
    """
    lay = layout(model)
    return _apply(model, lay, layers=_plan_layers(lay, keep_layers, importance))


def prune_structured(
    model: nn.Module,
    importance: TransformerImportance | None = None,
    *,
    heads: int | float | None = None,
    intermediate: int | float | None = None,
    hidden: int | float | None = None,
    layers: int | Sequence[int] | None = None,
    gqa: str = "queries",
    norm_compensation: bool = True,
) -> nn.Module:
    """Minitron width/depth pruning to the given sizes, keeping the most important units.

    Each setting is ``None`` (axis untouched), a count kept (``heads`` per layer,
    ``intermediate`` = the new ``intermediate_size``, ``hidden`` = the new ``hidden_size``) or
    a float fraction kept in (0, 1]; ``layers`` is a number of blocks (highest
    ``importance.blocks`` kept) or the list of block indices to keep. Units are ranked by
    ``importance`` from :func:`mentor.pruning.importance.transformer_importance`, computed on
    this model before pruning; without it the width axes fall back to data-free weight norms
    and ``layers`` must be a list. Every setting is checked (and the new config validated by
    its transformers class) before anything is cut; then heads, MLP channels, hidden channels
    and finally blocks are removed (Muralidharan et al., "Compact Language Models via Pruning
    and Knowledge Distillation", 2024; Sreenivas et al., "LLM Pruning and Distillation in
    Practice: The Minitron Approach", 2024). In place; returns the model. See
    :func:`prune_heads` (``gqa``) and :func:`prune_hidden` (``norm_compensation``).
    """
    lay = layout(model)
    plans: dict[str, Any] = {}
    if hidden is not None:
        plans["hidden"] = _plan_hidden(lay, hidden, importance)
    if heads is not None:
        plans["heads"] = _plan_heads(lay, heads, importance, gqa)
    if intermediate is not None:
        plans["mlp"] = _plan_mlp(lay, intermediate, importance)
    if layers is not None:
        plans["layers"] = _plan_layers(lay, layers, importance)
    return _apply(model, lay, norm_compensation=norm_compensation, **plans)


# ----------------------------------------------------------------------------- planning


def _llama_params(lay: LlamaLayout, d: int, inter: int, h: int, kv: int) -> int:
    """Parameters of the Llama-family model at widths (d, inter, h, kv), same depth/vocab."""
    base, core = lay.base, lay.core
    hd = _llama_head_dim(lay)
    v = base.embed_tokens.num_embeddings
    total = v * d + d  # embeddings, final norm
    out = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    if out is not None and out.weight is not base.embed_tokens.weight:
        total += out.weight.shape[0] * d + (out.bias.numel() if out.bias is not None else 0)
    for layer in lay.layers:
        a, m = layer.self_attn, layer.mlp
        total += d * h * hd + d * 2 * kv * hd + h * hd * d + 2 * d
        total += sum(lin.bias is not None for lin in (a.q_proj,)) * h * hd
        total += sum(lin.bias is not None for lin in (a.k_proj, a.v_proj)) * kv * hd
        total += (a.o_proj.bias is not None) * d
        total += 3 * d * inter + 2 * inter * (m.gate_proj.bias is not None)
        total += d * (m.down_proj.bias is not None)
        total += sum(
            p.numel() for n in ("q_norm", "k_norm") for p in getattr(a, n, nn.Module()).parameters()
        )
    return total


def width_prune_plan(model: nn.Module, target_params_fraction: float) -> dict[str, int]:
    """Hidden and MLP sizes that bring a Llama-family model to ~``target_params_fraction``.

    Rule (ours, after the Llama-3.1-Minitron-4B-Width architecture of Sreenivas et al.,
    2024, which shrank the hidden and MLP widths and kept heads and depth): one factor ``r``
    scales both ``hidden_size`` (rounded to a multiple of lcm(num_attention_heads, 8) when
    that leaves at least 4 choices, else of num_attention_heads, as transformers' Llama
    config requires) and ``intermediate_size`` (rounded to a multiple of 8 when >= 64); the
    candidate whose total parameter count (embeddings included) is closest to the target wins.
    Returns ``{"hidden": ..., "intermediate": ...}`` for :func:`prune_structured`.
    """
    if isinstance(target_params_fraction, bool) or not 0.0 < float(target_params_fraction) <= 1.0:
        raise ValueError(f"target_params_fraction={target_params_fraction}: must be in (0, 1]")
    lay = layout(model)
    if not isinstance(lay, LlamaLayout):
        raise ValueError(f"width_prune_plan supports Llama-family decoders, not "
                         f"{type(lay.core).__name__}")  # fmt: skip
    d = lay.base.embed_tokens.embedding_dim
    inter = lay.layers[0].mlp.down_proj.in_features
    h, kv = _llama_heads(lay)
    full = _llama_params(lay, d, inter, h, kv)
    target = float(target_params_fraction) * full
    step = math.lcm(h, 8)
    if d // step < 4:
        step = h
    best: tuple[float, int, int] | None = None
    for hid in range(step, d + 1, step):
        r = hid / d
        i = max(1, round(r * inter))
        if i >= 64:
            i = max(8, round(i / 8) * 8)
        i = min(i, inter)
        gap = abs(_llama_params(lay, hid, i, h, kv) - target)
        if best is None or gap < best[0]:
            best = (gap, hid, i)
    assert best is not None
    return {"hidden": best[1], "intermediate": best[2]}


def count_params_at(model: nn.Module, **dims: int) -> int:
    """Parameter count of a Llama-family ``model`` at other widths (``hidden``,
    ``intermediate``, ``heads``, ``kv_heads``), for planning."""
    lay = layout(model)
    if not isinstance(lay, LlamaLayout):
        raise ValueError("count_params_at supports Llama-family decoders")
    h, kv = _llama_heads(lay)
    return _llama_params(
        lay,
        dims.get("hidden", lay.base.embed_tokens.embedding_dim),
        dims.get("intermediate", lay.layers[0].mlp.down_proj.in_features),
        dims.get("heads", h),
        dims.get("kv_heads", kv),
    )


# ----------------------------------------------------------------------------- CNNs

_PASS_THROUGH = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.ReLU6,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)


def prune_channels(
    seq: nn.Sequential,
    keep: float | Sequence[int],
    importance: Sequence[Tensor] | None = None,
) -> tuple[nn.Sequential, list[int]]:
    """Remove output channels of every ``Conv2d`` of a sequential CNN; returns a pruned copy.

    ``keep``: a fraction of each convolution's channels kept (in (0, 1]) or a count per
    convolution. The kept channels are the top ones by ``importance`` (one tensor per
    convolution, e.g. :func:`mentor.pruning.importance.conv_channel_importance`) or, without
    it, by the L1 norm of each filter (Li et al., "Pruning Filters for Efficient ConvNets",
    2017). Each removal also drops the matching ``BatchNorm2d`` entries, the input channels of
    the next ``Conv2d``, or -- after ``Flatten`` -- the matching ``C*H*W`` input features of the
    first ``Linear`` (channel-major blocks of ``H*W``). Elementwise layers and pooling pass
    through; anything else between a pruned convolution and its consumer is refused.

    Returns ``(pruned, channels)``: ``channels`` lists the convolutions' new widths, the
    ``channels`` parameter of mentor's ``cnn`` builder, which rebuilds the same shapes.
    """
    if not isinstance(seq, nn.Sequential):
        raise ValueError(f"prune_channels needs an nn.Sequential CNN, got {type(seq).__name__}")
    new = copy.deepcopy(seq)
    convs = conv_layers(new)
    if not convs:
        raise ValueError("prune_channels: the model has no Conv2d layers")
    if any(next(m.children(), None) is not None for m in new):
        raise ValueError("prune_channels supports a flat nn.Sequential (no nested containers)")
    scores = list(importance) if importance is not None else filter_l1_importance(new)
    if len(scores) != len(convs):
        raise ValueError(f"channels importance: {len(scores)} tensors for {len(convs)} Conv2d "
                         "layers")  # fmt: skip
    if isinstance(keep, float):
        counts = [_count(keep, c.out_channels, "channels", "channels") for c in convs]
    elif _is_lists(keep) and not isinstance(keep, Mapping):
        if len(keep) != len(convs):
            raise ValueError(f"channels: {len(keep)} counts for {len(convs)} Conv2d layers")
        counts = []
        for i, (k, c) in enumerate(zip(keep, convs)):
            if not isinstance(k, int) or isinstance(k, bool):
                raise ValueError(f"channels[{i}]={k!r}: give a count of channels kept")
            counts.append(_count(k, c.out_channels, f"channels[{i}]", "channels"))
    else:
        raise ValueError(
            f"channels={keep!r}: give a fraction kept (float in (0, 1]) or a list of counts, "
            "one per Conv2d"
        )
    for i, (c, s) in enumerate(zip(convs, scores)):
        if c.groups != 1:
            raise ValueError(f"channels: Conv2d {i} has groups={c.groups}; only groups=1")
        if len(s) != c.out_channels:
            raise ValueError(f"channels importance[{i}] has {len(s)} entries, Conv2d {i} has "
                             f"{c.out_channels} channels")  # fmt: skip
    pending: list[int] | None = None  # kept channels of the last pruned conv
    before = 0  # channel count before pruning of the pending tensor
    flat = False
    k = 0
    for m in new:
        if isinstance(m, nn.Conv2d):
            if flat:
                raise ValueError("prune_channels: a Conv2d after Flatten is not supported")
            if pending is not None:
                w = m.weight.data.index_select(1, _idx(pending, m.weight.device))
                m.weight = _param(w, m.weight)
                m.in_channels = len(pending)
            ks = _top(scores[k], counts[k])
            before = m.out_channels
            w = m.weight.data.index_select(0, _idx(ks, m.weight.device))
            m.weight = _param(w, m.weight)
            if m.bias is not None:
                m.bias = _param(m.bias.data.index_select(0, _idx(ks, w.device)), m.bias)
            m.out_channels = len(ks)
            pending, k = ks, k + 1
        elif isinstance(m, nn.BatchNorm2d) and pending is not None and not flat:
            idx = _idx(pending, m.running_mean.device if m.running_mean is not None else "cpu")
            if m.affine:
                m.weight = _param(m.weight.data.index_select(0, idx), m.weight)
                m.bias = _param(m.bias.data.index_select(0, idx), m.bias)
            if m.running_mean is not None:
                m.running_mean = m.running_mean.index_select(0, idx)
                m.running_var = m.running_var.index_select(0, idx)
            m.num_features = len(pending)
        elif isinstance(m, nn.Flatten):
            flat = True
        elif isinstance(m, nn.Linear) and flat and pending is not None:
            if m.in_features % before:
                raise ValueError(f"prune_channels: Linear in_features={m.in_features} is not "
                                 f"a multiple of the last Conv2d's {before} channels")  # fmt: skip
            _slice_linear(m, inp=_expand(pending, m.in_features // before))
            pending = None
        elif isinstance(m, nn.Linear) and pending is not None:
            raise ValueError("prune_channels: a Linear reads conv features without Flatten")
        elif isinstance(m, (nn.Unflatten, *_PASS_THROUGH)) or pending is None:
            continue
        else:
            raise ValueError(f"prune_channels: {type(m).__name__} between a pruned Conv2d and "
                             "its consumer is not supported")  # fmt: skip
    if pending is not None:
        raise ValueError("prune_channels: the last Conv2d's output is not read by a Linear "
                         "after Flatten")  # fmt: skip
    return new, [c.out_channels for c in conv_layers(new)]


__all__ = [
    "GQA_MODES",
    "count_params_at",
    "load_pruned",
    "prune_channels",
    "prune_depth",
    "prune_heads",
    "prune_hidden",
    "prune_mlp",
    "prune_structured",
    "restore_pruned_heads",
    "width_prune_plan",
]

"""Activation-based importance of heads, channels and blocks from a few calibration batches.

Scores rank the units a structured prune (:mod:`mentor.pruning.structured`) keeps: the most
important ``k`` heads / MLP channels / hidden channels / blocks survive.

- :func:`transformer_importance`: every width axis and block importance in one pass, as in
  Minitron (Muralidharan et al., "Compact Language Models via Pruning and Knowledge
  Distillation", 2024; Sreenivas et al., "LLM Pruning and Distillation in Practice: The
  Minitron Approach", 2024), for Llama-family decoders and BERT-style encoders;
- :func:`block_importance`: ShortGPT's Block Importance only (Men et al., "ShortGPT: Layers in
  Large Language Models are More Redundant Than You Expect", 2024), for any Hugging Face model
  whose blocks :func:`mentor.models.hf.find_layers` finds;
- :func:`block_importance_ppl`: Minitron's depth score, the perplexity increase when one block
  is skipped;
- :func:`conv_channel_importance` / :func:`filter_l1_importance`: per-output-channel scores of
  the ``Conv2d`` layers of a CNN (mean absolute activation; or the data-free L1 norm of each
  filter, Li et al., "Pruning Filters for Efficient ConvNets", 2017).

All functions run under ``torch.no_grad`` with the model in eval mode, restore every module's
train/eval flag afterwards and remove their hooks. A batch is whatever ``forward(model, batch)``
accepts; the default runs :func:`mentor.models.model_outputs` on dict batches (``input_ids``
+ ``attention_mask``, or ``inputs``), ``model(x)`` on an ``(x, y)`` pair and ``model(batch)``
on a bare tensor. A 2-D
``attention_mask`` in a dict batch excludes padding tokens from every token aggregate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Forward = Callable[[nn.Module, Any], Any]

AGGREGATIONS = ("mean", "l2")

_LLAMA_LAYER = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_LLAMA_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_LLAMA_ATTN_EXTRA = {"q_norm", "k_norm", "rotary_emb"}
_LLAMA_MLP = {"gate_proj", "up_proj", "down_proj"}
_LLAMA_MLP_EXTRA = {"act_fn"}
_LLAMA_BASE = {"embed_tokens", "layers", "norm"}
_LLAMA_BASE_EXTRA = {"rotary_emb"}

SUPPORTED = (
    "Llama-family decoders (model.layers[i].self_attn.{q,k,v,o}_proj, "
    "mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, model.embed_tokens, "
    "model.norm; e.g. LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) and BERT-style "
    "encoders (encoder.layer[i].attention.self.{query,key,value}, attention.output.dense, "
    "intermediate.dense, output.dense; e.g. BertModel), bare or inside "
    "HFClassifier/HFEmbedder"
)


# ----------------------------------------------------------------------------- layouts


@dataclass
class LlamaLayout:
    """Where the parts of a Llama-family decoder live."""

    core: nn.Module  # the PreTrainedModel (e.g. LlamaForCausalLM or LlamaModel)
    base: nn.Module  # the module holding embed_tokens, layers, norm
    layers: nn.ModuleList
    config: Any
    kind: str = "llama"


@dataclass
class BertLayout:
    """Where the parts of a BERT-style encoder live."""

    core: nn.Module  # the PreTrainedModel (e.g. BertModel)
    layers: nn.ModuleList  # core.encoder.layer
    config: Any
    kind: str = "bert"


def _children(m: nn.Module) -> set[str]:
    return {n for n, _ in m.named_children()}


def _is_llama_layer(layer: nn.Module) -> bool:
    kids = _children(layer)
    if kids != _LLAMA_LAYER:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    a, m = _children(attn), _children(mlp)
    return (
        _LLAMA_ATTN <= a <= _LLAMA_ATTN | _LLAMA_ATTN_EXTRA
        and _LLAMA_MLP <= m <= _LLAMA_MLP | _LLAMA_MLP_EXTRA
        and all(isinstance(getattr(attn, n), nn.Linear) for n in _LLAMA_ATTN)
        and all(isinstance(getattr(mlp, n), nn.Linear) for n in _LLAMA_MLP)
        and isinstance(getattr(attn, "head_dim", None), int)
    )


def _is_bert_layer(layer: nn.Module) -> bool:
    try:
        sa = layer.attention.self
        parts = (sa.query, sa.key, sa.value, layer.attention.output.dense)
        parts += (layer.intermediate.dense, layer.output.dense)
    except AttributeError:
        return False
    return all(isinstance(p, nn.Linear) for p in parts) and isinstance(
        getattr(sa, "attention_head_size", None), int
    )


def layout(model: nn.Module) -> LlamaLayout | BertLayout:
    """The Llama-family or BERT-style layout of ``model`` (an HF model or mentor adapter).

    Raises ``ValueError`` naming the class and the supported layouts otherwise.
    """
    from mentor.models.hf import hf_core

    core = hf_core(model)
    if core is not None:
        base = getattr(core, "model", None)
        if not isinstance(getattr(base, "layers", None), nn.ModuleList):
            base = core
        layers = getattr(base, "layers", None)
        if (
            isinstance(layers, nn.ModuleList)
            and len(layers)
            and _LLAMA_BASE <= _children(base) <= _LLAMA_BASE | _LLAMA_BASE_EXTRA
            and isinstance(base.embed_tokens, nn.Embedding)
            and all(_is_llama_layer(layer) for layer in layers)
        ):
            return LlamaLayout(core, base, layers, core.config)
        enc = getattr(core, "encoder", None)
        layers = getattr(enc, "layer", None)
        if (
            isinstance(layers, nn.ModuleList)
            and len(layers)
            and all(_is_bert_layer(layer) for layer in layers)
        ):
            return BertLayout(core, layers, core.config)
    name = type(core if core is not None else model).__name__
    raise ValueError(f"structured pruning does not support {name}; supported: {SUPPORTED}")


# ----------------------------------------------------------------------------- running


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch.

    Dicts go through :func:`mentor.models.model_outputs`; an ``(inputs, labels, ...)`` tuple or
    list runs ``model(inputs)``; anything else ``model(batch)``.
    """
    if isinstance(batch, dict):
        from mentor.models import model_outputs

        return model_outputs(model, batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return p.device if p is not None else None


def _to(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _token_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, dict):
        m = batch.get("attention_mask")
        if isinstance(m, Tensor) and m.dim() == 2:
            return m
    return None


@contextlib.contextmanager
def _calibrating(model: nn.Module) -> Iterator[list[Any]]:
    """Eval mode + no grad; restores every module's mode and removes the hooks put in the list."""
    modes = [(m, m.training) for m in model.modules()]
    hooks: list[Any] = []
    model.eval()
    try:
        with torch.no_grad():
            yield hooks
    finally:
        for h in hooks:
            h.remove()
        for m, t in modes:
            m.training = t


class _State:
    """The token mask of the batch being run (hooks read it)."""

    mask: Tensor | None = None


def _run(model: nn.Module, batches: Iterable[Any], forward: Forward | None, state: _State) -> int:
    fwd = forward or default_forward
    dev = _device(model)
    n = 0
    for batch in batches:
        batch = _to(batch, dev)
        state.mask = _token_mask(batch)
        fwd(model, batch)
        n += 1
    state.mask = None
    if n == 0:
        raise ValueError("importance needs at least one calibration batch, got none")
    return n


def _check_agg(batch_agg: str, seq_agg: str) -> None:
    for name, v in (("batch_agg", batch_agg), ("seq_agg", seq_agg)):
        if v not in AGGREGATIONS:
            raise ValueError(f"{name}={v!r}: choose one of {', '.join(AGGREGATIONS)}")


class _Agg:
    """Per-channel aggregate of ``[B, T, C]`` activations: over tokens, then over samples.

    ``seq``: ``l2`` (root of the sum of squares over real tokens) or ``mean`` (mean absolute
    value); ``batch``: ``mean`` or ``l2`` over all calibration samples.
    """

    def __init__(self, seq: str, batch: str) -> None:
        self.seq, self.batch = seq, batch
        self.total: Tensor | None = None
        self.n = 0

    def add(self, a: Tensor, mask: Tensor | None) -> None:
        a = a.detach().float()
        if a.dim() == 2:  # [T, C] without batch dimension
            a = a.unsqueeze(0)
        if mask is not None and mask.shape == a.shape[:2]:
            m = mask.to(device=a.device, dtype=a.dtype).unsqueeze(-1)
        else:
            m = torch.ones_like(a[..., :1])
        if self.seq == "l2":
            per = (a.pow(2) * m).sum(1).sqrt()
        else:
            per = (a.abs() * m).sum(1) / m.sum(1).clamp_min(1.0)
        per = per.sum(0) if self.batch == "mean" else per.pow(2).sum(0)
        self.total = per if self.total is None else self.total + per
        self.n += a.shape[0]

    def result(self) -> Tensor:
        if self.total is None:
            raise RuntimeError("a calibration hook never ran: the forward skipped this module")
        t = self.total.cpu()
        return t / max(1, self.n) if self.batch == "mean" else t.sqrt()


class _BI:
    """ShortGPT Block Importance accumulator: mean over real tokens of 1 - cos(in, out)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0

    def add(self, x: Tensor, y: Tensor, mask: Tensor | None) -> None:
        cos = F.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)  # [B, T]
        if mask is not None and mask.shape == cos.shape:
            m = mask.to(device=cos.device, dtype=cos.dtype)
        else:
            m = torch.ones_like(cos)
        self.total += float(((1.0 - cos) * m).sum())
        self.count += float(m.sum())

    def result(self) -> float:
        if self.count == 0:
            raise RuntimeError("a calibration hook never ran on a block")
        return self.total / self.count


def _block_io(args: tuple, kwargs: dict, output: Any) -> tuple[Tensor, Tensor]:
    x = args[0] if args else kwargs.get("hidden_states")
    y = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise RuntimeError("cannot read a block's input and output hidden states")
    return x, y


def _hook_blocks(blocks: Sequence[nn.Module], hooks: list[Any], state: _State) -> list[_BI]:
    accs = [_BI() for _ in blocks]

    def make(acc: _BI) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x, y = _block_io(args, kwargs, output)
            acc.add(x, y, state.mask)

        return hook

    for blk, acc in zip(blocks, accs):
        hooks.append(blk.register_forward_hook(make(acc), with_kwargs=True))
    return accs


# ----------------------------------------------------------------------------- transformers


@dataclass
class TransformerImportance:
    """Importance scores of a transformer's prunable units (higher = more important).

    ``heads[i]``: one score per (query) head of block ``i``; ``intermediate[i]``: one per MLP
    channel of block ``i``; ``hidden``: one per embedding (hidden) channel; ``blocks``: one
    Block Importance per block. ``arch`` is ``"llama"`` or ``"bert"``; ``samples`` the number
    of calibration sequences.
    """

    heads: list[Tensor]
    intermediate: list[Tensor]
    hidden: Tensor | None
    blocks: Tensor
    arch: str
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def transformer_importance(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Forward | None = None,
    batch_agg: str = "mean",
    seq_agg: str = "l2",
) -> TransformerImportance:
    """Minitron's activation-based importance of heads, MLP channels, hidden channels, blocks.

    One forward pass per calibration batch scores every axis (Muralidharan et al., "Compact
    Language Models via Pruning and Knowledge Distillation", 2024):

    - head ``h`` of block ``i``: the per-token L2 norm of the head's attention output (its
      slice of the input of ``o_proj`` / BERT's ``attention.output.dense``);
    - MLP channel ``j``: the channel's activation entering ``down_proj`` (BERT:
      ``output.dense``), i.e. ``act(gate) * up`` (BERT: ``act(intermediate.dense(x))``);
    - hidden channel ``c``: the outputs of every LayerNorm/RMSNorm of hidden width (Llama: both
      norms of every block and the final norm; BERT: the embedding LayerNorm and both
      LayerNorms of every block), aggregated per norm and summed over norms;
    - block ``i``: ShortGPT's Block Importance ``1 - cos(x_in, x_out)`` averaged over real
      tokens (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than
      You Expect", 2024).

    Width aggregation: over the tokens of each sequence by ``seq_agg`` (``l2``: root of the
    sum of squares, default; ``mean``: mean absolute value), then over all calibration
    sequences by ``batch_agg`` (``mean``, default; ``l2``). Minitron compares several
    (batch, sequence) aggregations of this kind; the defaults (mean over the batch, L2 over
    the sequence) are our reading of its choice, not a verified transcription, and either can
    be changed. Padding tokens (``attention_mask == 0``) are left out.
    """
    _check_agg(batch_agg, seq_agg)
    lay = layout(model)
    state = _State()
    heads = [_Agg(seq_agg, batch_agg) for _ in lay.layers]
    inter = [_Agg(seq_agg, batch_agg) for _ in lay.layers]
    with _calibrating(model) as hooks:

        def head_hook(acc: _Agg, hd: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple) -> None:
                a = args[0]
                per = a.reshape(*a.shape[:-1], -1, hd).float().norm(dim=-1)  # [B, T, H]
                acc.add(per, state.mask)

            return hook

        def input_hook(acc: _Agg) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple) -> None:
                acc.add(args[0], state.mask)

            return hook

        def output_hook(acc: _Agg) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                acc.add(output, state.mask)

            return hook

        norms: list[nn.Module] = []
        for i, layer in enumerate(lay.layers):
            if isinstance(lay, LlamaLayout):
                o, hd, down = layer.self_attn.o_proj, layer.self_attn.head_dim, layer.mlp.down_proj
                norms += [layer.input_layernorm, layer.post_attention_layernorm]
            else:
                o = layer.attention.output.dense
                hd = layer.attention.self.attention_head_size
                down = layer.output.dense
                norms += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
            hooks.append(o.register_forward_pre_hook(head_hook(heads[i], hd)))
            hooks.append(down.register_forward_pre_hook(input_hook(inter[i])))
        if isinstance(lay, LlamaLayout):
            norms.append(lay.base.norm)
        else:
            emb_norm = getattr(getattr(lay.core, "embeddings", None), "LayerNorm", None)
            if isinstance(emb_norm, nn.Module):
                norms.insert(0, emb_norm)
        norm_accs = [_Agg(seq_agg, batch_agg) for _ in norms]
        for nm, acc in zip(norms, norm_accs):
            hooks.append(nm.register_forward_hook(output_hook(acc)))
        bis = _hook_blocks(list(lay.layers), hooks, state)
        _run(model, batches, forward, state)
    hidden = torch.stack([a.result() for a in norm_accs]).sum(0) if norm_accs else None
    return TransformerImportance(
        heads=[a.result() for a in heads],
        intermediate=[a.result() for a in inter],
        hidden=hidden,
        blocks=torch.tensor([b.result() for b in bis]),
        arch=lay.kind,
        samples=heads[0].n,
    )


def block_importance(
    model: nn.Module, batches: Iterable[Any], *, forward: Forward | None = None
) -> Tensor:
    """ShortGPT Block Importance of every transformer block: ``[num_blocks]``, higher = keep.

    ``BI_i = 1 - E_tokens[cos(x_i, x_{i+1})]`` with ``x_i`` the hidden states entering block
    ``i`` (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You
    Expect", 2024); Minitron uses it as its cheap depth score (Sreenivas et al., "LLM Pruning
    and Distillation in Practice: The Minitron Approach", 2024). Any Hugging Face model or
    mentor adapter whose blocks :func:`mentor.models.hf.find_layers` finds.
    """
    from mentor.models.hf import find_layers

    _, blocks = find_layers(model)
    state = _State()
    with _calibrating(model) as hooks:
        accs = _hook_blocks(list(blocks), hooks, state)
        _run(model, batches, forward, state)
    return torch.tensor([a.result() for a in accs])


def lm_loss(outputs: Any, batch: Any) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy and token count of causal-LM logits ``[B, T, V]``."""
    logits = getattr(outputs, "logits", outputs)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(batch, dict) or "input_ids" not in batch or logits.dim() != 3:
        raise ValueError(
            "block_importance_ppl's default loss needs causal-LM logits [B, T, V] and batches "
            "with input_ids; pass loss=fn(outputs, batch) for other models"
        )
    ids = batch["input_ids"]
    target = ids[:, 1:]
    mask = batch.get("attention_mask")
    m = (mask[:, 1:] if isinstance(mask, Tensor) else torch.ones_like(target)).float()
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    )
    return (ce * m.reshape(-1)).sum(), m.sum()


def block_importance_ppl(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    forward: Forward | None = None,
    loss: Callable[[Any, Any], Tensor] | None = None,
) -> Tensor:
    """Minitron's depth score: how much worse the model gets when block ``i`` is skipped.

    Each block in turn is bypassed (its output replaced by its input) and the calibration
    batches are run again: ``[num_blocks]`` of ``PPL(without block i) - PPL(full model)``
    for causal LMs (next-token perplexity over real tokens), or of the increase of
    ``loss(outputs, batch)`` (a mean over the batch) when ``loss`` is given. Sreenivas et al.,
    "LLM Pruning and Distillation in Practice: The Minitron Approach", 2024 (also Muralidharan
    et al., 2024). ``batches`` must be re-iterable (a list): they run ``num_blocks + 1``
    times.
    """
    from mentor.models.hf import find_layers

    _, blocks = find_layers(model)
    batches = list(batches)
    fwd = forward or default_forward
    dev = _device(model)

    def score() -> float:
        tot, cnt = 0.0, 0.0
        for b in batches:
            b = _to(b, dev)
            out = fwd(model, b)
            if loss is None:
                s, n = lm_loss(out, b)
                tot, cnt = tot + float(s), cnt + float(n)
            else:
                tot, cnt = tot + float(loss(out, b)), cnt + 1.0
        if cnt == 0:
            raise ValueError("block_importance_ppl needs at least one calibration batch")
        mean = tot / cnt
        return math.exp(min(mean, 80.0)) if loss is None else mean

    def skip(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x, _ = _block_io(args, kwargs, output)
        if isinstance(output, tuple):
            return (x, *output[1:])
        return x

    with _calibrating(model):
        base = score()
        out = []
        for blk in blocks:
            h = blk.register_forward_hook(skip, with_kwargs=True)
            try:
                out.append(score() - base)
            finally:
                h.remove()
    return torch.tensor(out)


# ----------------------------------------------------------------------------- CNNs


def conv_layers(model: nn.Module) -> list[nn.Conv2d]:
    """The ``Conv2d`` modules of ``model`` in registration order."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def conv_channel_importance(
    model: nn.Module, batches: Iterable[Any], *, forward: Forward | None = None
) -> list[Tensor]:
    """Mean absolute activation of each output channel of every ``Conv2d`` (data-driven).

    One ``[out_channels]`` tensor per convolution (order of :func:`conv_layers`), the mean of
    ``|conv(x)|`` over samples and spatial positions (before the nonlinearity). An
    activation-based criterion in the spirit of Minitron's (Muralidharan et al., 2024) applied
    to filters; the data-free alternative is :func:`filter_l1_importance`.
    """
    convs = conv_layers(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layers to score")
    sums: list[Tensor | None] = [None] * len(convs)
    counts = [0] * len(convs)
    state = _State()
    with _calibrating(model) as hooks:

        def make(k: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                o = output.detach().float()
                if o.dim() == 3:
                    o = o.unsqueeze(0)
                s = o.abs().mean(dim=(2, 3)).sum(0).cpu()
                sums[k] = s if sums[k] is None else sums[k] + s
                counts[k] += o.shape[0]

            return hook

        for k, c in enumerate(convs):
            hooks.append(c.register_forward_hook(make(k)))
        _run(model, batches, forward, state)
    if any(s is None for s in sums):
        raise RuntimeError("a Conv2d layer never ran on the calibration batches")
    return [s / n for s, n in zip(sums, counts)]  # type: ignore[operator]


def filter_l1_importance(model: nn.Module) -> list[Tensor]:
    """L1 norm of each filter of every ``Conv2d`` (data-free; bias not counted).

    Li et al., "Pruning Filters for Efficient ConvNets", 2017: filters with the smallest sum
    of absolute kernel weights are pruned first.
    """
    convs = conv_layers(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layers to score")
    return [c.weight.detach().abs().sum(dim=(1, 2, 3)).float().cpu() for c in convs]


__all__ = [
    "AGGREGATIONS",
    "BertLayout",
    "LlamaLayout",
    "SUPPORTED",
    "TransformerImportance",
    "block_importance",
    "block_importance_ppl",
    "conv_channel_importance",
    "conv_layers",
    "default_forward",
    "filter_l1_importance",
    "layout",
    "lm_loss",
    "transformer_importance",
]

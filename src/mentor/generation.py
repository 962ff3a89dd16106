"""Sampling from causal language models: the generation layer of on-policy and sequence-level KD.

On-policy distillation (GKD: Agarwal et al., "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", 2024) trains the student on completions it samples
itself; sequence-level KD (Kim & Rush, "Sequence-Level Knowledge Distillation", 2016) trains it
on the teacher's (beam or greedy) outputs. Both need the same primitive, provided here for the
training engine, the CLI and evaluation:

* :class:`SamplingConfig` — how to decode: ``max_new_tokens``, ``temperature`` (0 = greedy),
  ``top_k`` / ``top_p`` (nucleus) filtering, and whether to stop a sequence at EOS.
* :func:`generate` — batched decoding of a Hugging Face causal LM over a **left-padded** prompt
  batch, with a KV cache and ``position_ids`` computed from the attention mask. It calls the
  model itself rather than ``model.generate`` so that every draw comes from the given
  :class:`torch.Generator`: the same generator state gives the same samples, and a run resumed
  from a checkpoint that stored ``generator.get_state()`` continues exactly.
* :class:`Generation` — prompt + completion ids ``[B, P + T]`` with the attention mask and a
  ``completion_mask`` that marks exactly the generated tokens that count (EOS included).
* :func:`left_pad`, :func:`filter_logits`, :func:`sample_next_token` — the building blocks.

Sampling never touches the global RNG when a generator is given, runs under ``no_grad`` with the
model in eval mode, and puts every submodule's training flag back afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mentor.models import VOCAB_LIMIT_ATTR


@dataclass
class SamplingConfig:
    """How :func:`generate` decodes.

    Attributes:
        max_new_tokens: most tokens generated per sequence (> 0).
        temperature: softmax temperature (>= 0); ``0`` means greedy (argmax) decoding, in which
            case ``top_k`` and ``top_p`` have no effect.
        top_p: nucleus sampling — keep the smallest set of most likely tokens whose probability
            reaches ``top_p`` (in ``(0, 1]``; ``1`` = off).
        top_k: keep only the ``top_k`` most likely tokens (``0`` = off).
        stop_on_eos: end a sequence at its first EOS token (the EOS itself counts); later
            positions become padding. With ``False`` every sequence runs ``max_new_tokens``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_on_eos: bool = True

    def check(self) -> SamplingConfig:
        """Validate the settings; raise ``ValueError`` naming the first bad one. Returns ``self``."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not float(self.temperature) >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        return self

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (``temperature == 0``)."""
        return float(self.temperature) == 0.0


@dataclass
class Generation:
    """The result of :func:`generate` for a batch of ``B`` prompts of padded length ``P``.

    Attributes:
        input_ids: ``[B, P + T]`` long — the prompt (still left-padded, as given) followed by the
            completion (right-padded with ``pad_token_id`` after EOS).
        attention_mask: ``[B, P + T]`` long — the prompt mask followed by ``completion_mask``'s
            completion part: 1 on every real token.
        completion_mask: ``[B, P + T]`` long — 1 exactly on the generated tokens that count
            (up to and including a sequence's EOS), 0 on the prompt, padding and after EOS.
        prompt_length: ``P``, where the completion starts.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_length: int

    @property
    def completion_ids(self) -> Tensor:
        """The completion part of ``input_ids``: ``[B, T]``."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def completion_lengths(self) -> Tensor:
        """Number of generated tokens that count per sequence (EOS included): ``[B]`` long."""
        return self.completion_mask.sum(dim=-1)

    def to(self, device: torch.device | str) -> Generation:
        """A copy with every tensor moved to ``device``."""
        return Generation(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.prompt_length,
        )


def left_pad(
    seqs: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Build a left-padded prompt batch from token-id lists.

    Returns ``(ids, mask)``, both ``[B, P]`` long with ``P`` the longest prompt: ``ids`` holds
    each prompt right-aligned after ``pad_token_id`` fill, ``mask`` is 1 on prompt tokens.
    Raises ``ValueError`` for no prompts or an empty prompt (generation needs a last token).
    """
    if len(seqs) == 0:
        raise ValueError("left_pad needs at least one prompt")
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus to ``-inf`` (over the last dim; a new tensor).

    ``top_k`` keeps the ``k`` largest logits (ties at the k-th value are kept); ``top_p`` keeps
    the smallest set of most likely tokens whose softmax mass reaches ``top_p`` — a token is
    dropped when the mass of the tokens ranked above it already reaches ``top_p``, so the most
    likely token always stays. ``top_k = 0`` and ``top_p = 1`` are no-ops.
    """
    out = logits
    if top_k > 0 and top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass ranked strictly above each token
        drop = before >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        out = torch.full_like(out, float("-inf")).scatter(-1, order, sorted_logits)
    return out


Generators = torch.Generator | Sequence[torch.Generator] | None


def sample_next_token(logits: Tensor, cfg: SamplingConfig, generator: Generators = None) -> Tensor:
    """Pick one token per row of ``logits`` ``[B, V]`` as ``cfg`` says; returns ``[B]`` long.

    Greedy (``temperature == 0``) takes the argmax. Otherwise the logits (upcast to float32)
    are divided by the temperature, filtered by :func:`filter_logits`, and one token is drawn
    per row by inverting the cumulative distribution (float64) at a uniform draw ``u`` from
    ``generator`` (about 10x cheaper than ``torch.multinomial`` over a 49k vocabulary; a token
    of probability 0 is never drawn). ``generator`` may be one generator for the batch or a
    sequence of ``B`` generators, one per row: row ``i`` then draws from ``generator[i]`` only,
    so its samples do not depend on which other rows share the batch (the engine seeds one per
    example, which makes a multi-process run sample what a single process samples). The draws
    come from each generator's device, so a CPU generator also drives sampling on an
    accelerator.
    """
    if cfg.greedy:
        return logits.argmax(dim=-1)
    scores = filter_logits(
        logits.float() / float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p)
    )
    cdf = scores.softmax(dim=-1).double().cumsum(dim=-1)
    b = cdf.shape[0]
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else cdf.device
        u = torch.rand(b, 1, generator=generator, device=dev, dtype=torch.float64)
    else:
        if len(generator) != b:
            raise ValueError(f"{len(generator)} generators for {b} rows: give one per row")
        u = torch.stack(
            [
                torch.rand(1, generator=g, device=g.device, dtype=torch.float64).cpu()
                for g in generator
            ]
        )
    u = u.to(cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    return token.squeeze(-1).to(logits.device)


def _forward_names(model: nn.Module) -> tuple[str, str | None]:
    """The model's keyword for the KV cache and for keeping only the last logits (or None).

    Recent transformers call the cache argument ``cache`` (``past_key_values`` before); the
    last-logits switch is ``logits_to_keep`` (``num_logits_to_keep`` in 4.45–4.49).
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep


def _returned_cache(out: Any) -> Any:
    """The KV cache a model call returned (``out.cache`` or ``out.past_key_values``)."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    if isinstance(out, (tuple, list)) and len(out) > 1:
        return out[1]
    raise TypeError(
        f"{type(out).__name__} carries no KV cache; generate() needs a causal LM that returns "
        "one with use_cache=True"
    )


def _last_logits(model: nn.Module, out: Any) -> Tensor:
    """The logits of the last position ``[B, V]``, cut to the model's common vocabulary."""
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits[:, -1, :]
    limit = getattr(model, VOCAB_LIMIT_ATTR, None)
    if limit is not None and logits.shape[-1] > limit:
        logits = logits[..., :limit]
    return logits


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor | None:
    """EOS ids as a 1-D long tensor on ``device`` (None when there are none)."""
    if eos_token_id is None:
        return None
    ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter (``fallback`` for a parameterless model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else fallback


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cfg: SamplingConfig,
    *,
    generator: Generators = None,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
) -> Generation:
    """Sample completions of a left-padded prompt batch from a Hugging Face causal LM.

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=, position_ids=,
            use_cache=True, <cache>=)`` whose output has ``.logits`` and a KV cache (e.g.
            ``transformers.LlamaForCausalLM``).
        prompt_ids: ``[B, P]`` long, **left-padded** (every row's last position is a real
            token; see :func:`left_pad`).
        prompt_mask: ``[B, P]``, 1 on prompt tokens and 0 on left padding.
        cfg: the decoding settings (validated with :meth:`SamplingConfig.check`).
        generator: the source of every random draw (``None`` = the global RNG), or one
            generator per row. Store ``generator.get_state()`` to make sampling resumable.
        eos_token_id: id(s) that end a sequence (with ``cfg.stop_on_eos``); ``None`` = none.
        pad_token_id: id written after a sequence's EOS.

    The prompt runs once; each new token then runs alone against the KV cache, at position
    ``(number of real tokens before it)`` so left padding does not shift positions. A sequence
    ends at its first EOS (counted in ``completion_mask``); decoding stops early when every
    sequence has ended. The model runs in eval mode without gradients, and each submodule's
    training flag is restored afterwards. Returns a :class:`Generation` on the model's device.
    """
    cfg.check()
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            "prompt_ids and prompt_mask must both be [B, P]; got "
            f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}"
        )
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"empty prompt batch {tuple(prompt_ids.shape)}")
    device = _model_device(model, prompt_ids.device)
    ids = prompt_ids.to(device=device, dtype=torch.long)
    mask = prompt_mask.to(device=device, dtype=torch.long)
    if not bool((mask[:, -1] == 1).all()):
        raise ValueError(
            "prompts must be left-padded with at least one token each: prompt_mask[:, -1] must "
            "be 1 for every row (use mentor.generation.left_pad)"
        )
    eos = _eos_tensor(eos_token_id, device)
    cache_name, keep_name = _forward_names(model)
    extra = {keep_name: 1} if keep_name is not None else {}

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        batch = ids.shape[0]
        position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        next_position = mask.sum(dim=-1, keepdim=True)  # [B, 1]: real tokens so far
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **extra,
        )
        cache = _returned_cache(out)
        attention = mask
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens: list[Tensor] = []
        counted: list[Tensor] = []
        for step in range(cfg.max_new_tokens):
            token = sample_next_token(_last_logits(model, out), cfg, generator)
            live = ~finished
            token = torch.where(live, token, torch.full_like(token, int(pad_token_id)))
            tokens.append(token)
            counted.append(live)
            if cfg.stop_on_eos and eos is not None:
                finished = finished | (live & torch.isin(token, eos))
            if step == cfg.max_new_tokens - 1 or bool(finished.all()):
                break
            attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=-1)
            out = model(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=next_position,
                use_cache=True,
                **{cache_name: cache},
                **extra,
            )
            cache = _returned_cache(out)
            next_position = next_position + 1
    finally:
        for module, flag in flags:
            module.training = flag

    completion = torch.stack(tokens, dim=1)
    completion_mask = torch.stack(counted, dim=1).long()
    return Generation(
        input_ids=torch.cat([ids, completion], dim=1),
        attention_mask=torch.cat([mask, completion_mask], dim=1),
        completion_mask=torch.cat([torch.zeros_like(mask), completion_mask], dim=1),
        prompt_length=ids.shape[1],
    )


class AnswerReward:
    """A verifier reward: 1 when a sample's decoded completion contains its reference answer.

    ``tokenizer`` decodes the completion tokens (``completion_mask``) of each row; the answer
    is the row's value of the batch field ``field`` (a list, one per row). Both are compared
    after collapsing whitespace; an empty answer never matches. Returns float ``[B]`` in
    {0, 1}, the ``rewards`` that quality-gated objectives (KEPO, PACED, TSD-KD) read.
    """

    def __init__(self, tokenizer: Any, field: str) -> None:
        self.tokenizer, self.field = tokenizer, field

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        answers = batch.get(self.field)
        n = int(batch["input_ids"].shape[0])
        if not isinstance(answers, list) or len(answers) != n:
            raise ValueError(
                f"generation.reward_field={self.field!r}: the batch has no per-example field "
                f"{self.field!r}; pass it through with data.params.fields: [{self.field}]"
            )
        ids, comp = batch["input_ids"].cpu(), batch["completion_mask"].cpu().bool()
        out = torch.zeros(n)
        for r in range(n):
            text = " ".join(self.tokenizer.decode(ids[r][comp[r]].tolist()).split())
            answer = " ".join(str(answers[r] if answers[r] is not None else "").split())
            out[r] = float(bool(answer) and answer in text)
        return out.to(batch["input_ids"].device)


__all__ = [
    "AnswerReward",
    "Generation",
    "SamplingConfig",
    "filter_logits",
    "generate",
    "left_pad",
    "sample_next_token",
]

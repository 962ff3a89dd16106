"""Generation diagnostics: how a distilled causal LM behaves on its *own* samples.

Teacher-forced metrics (perplexity, agreement) score a student on the data's completions; a
distilled LM is used by sampling, and its errors compound on sequences it produced itself.
On-policy evaluation (Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", ICLR 2024, GKD) therefore scores the student's own samples with the
teacher, the quantities on-policy and DistiLLM-style training optimise:

* ``teacher_nll`` — mean per-token negative log-likelihood, under the teacher, of the tokens a
  model sampled (lower: the teacher finds the samples more likely);
* ``kl_student_teacher_on_samples`` — mean per-token ``KL(p_student || p_teacher)`` (the
  reverse KL GKD minimises) at the positions of the student's own completions, and the forward
  ``kl_teacher_student_on_samples`` at the same positions;
* ``distinct_1`` / ``distinct_2`` — distinct-n (Li et al., "A Diversity-Promoting Objective
  Function for Neural Conversation Models", NAACL 2016): unique n-grams / total n-grams over
  all sampled completions (a collapsed, repetitive model scores low);
* ``mean_completion_tokens`` — generated tokens per prompt (EOS included).

Prompts arrive as left-padded batches (``prompt_ids`` / ``prompt_mask``, the layout of
:func:`mentor.data.prompts.prompt_collate`); samples come from :func:`mentor.generation.generate`
with one seeded CPU :class:`torch.Generator` per model, so the numbers are reproducible. Scoring
is teacher-forced over prompt + completion with ``position_ids`` from the attention mask (see
:func:`mentor.models.model_outputs`), and the causal shift: the logits at position ``t``
predict token ``t + 1``; only ``completion_mask`` targets count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mentor.generation import Generation, SamplingConfig, generate
from mentor.models import model_outputs

Decode = Callable[[list[int]], str]


def ids_as_text(ids: list[int]) -> str:
    """Token ids written as text (``"5 17 3"``): the fallback when no tokenizer is known."""
    return " ".join(str(int(i)) for i in ids)


def eos_and_pad(model: nn.Module, pad_token_id: int | None = None) -> tuple[Any, int]:
    """A model's EOS id(s) from its config, and the pad id (given, else its pad/EOS, else 0)."""
    cfg = getattr(model, "config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if pad_token_id is not None:
        return eos, int(pad_token_id)
    pad = getattr(cfg, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else (eos if isinstance(eos, int) else 0)
    return eos, pad


def sample_completions(
    model: nn.Module,
    prompt_batches: Iterable[Mapping[str, Any]],
    sampling: SamplingConfig,
    *,
    seed: int,
    pad_token_id: int | None = None,
) -> list[Generation]:
    """Sample one completion per prompt from ``model`` (on CPU tensors), reproducibly.

    ``prompt_batches`` hold left-padded ``prompt_ids`` / ``prompt_mask``. Every draw comes
    from one CPU generator seeded with ``seed`` and consumed batch after batch, so the same
    seed, model and prompts give the same samples (greedy when ``sampling.temperature == 0``).
    """
    rng = torch.Generator().manual_seed(int(seed))
    eos, pad = eos_and_pad(model, pad_token_id)
    out = []
    for b in prompt_batches:
        gen = generate(
            model,
            b["prompt_ids"],
            b["prompt_mask"],
            sampling,
            generator=rng,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        out.append(gen.to("cpu"))
    return out


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def completion_logits(model: nn.Module, gen: Generation) -> Tensor:
    """The float logits ``[N, V]`` that predict the ``N`` counted completion tokens of ``gen``.

    The model runs teacher-forced over prompt + completion (``prompt_ids`` kept in the batch so
    :func:`mentor.models.model_outputs` passes ``position_ids`` for the left padding); logits at
    position ``t`` predict token ``t + 1``, and rows are the positions whose target is in
    ``completion_mask``, in row-major order (the order of :func:`completion_targets`).
    """
    dev = _device(model)
    batch = {
        "input_ids": gen.input_ids.to(dev),
        "attention_mask": gen.attention_mask.to(dev),
        "prompt_ids": gen.input_ids[:, : gen.prompt_length].to(dev),
    }
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model_outputs(model, batch)
    finally:
        model.train(was)
    mask = gen.completion_mask[:, 1:].to(dev).bool()
    return logits[:, :-1][mask].float().cpu()


def completion_targets(gen: Generation) -> Tensor:
    """The counted completion tokens ``[N]`` of ``gen`` (row-major), the targets of the logits."""
    return gen.input_ids[:, 1:][gen.completion_mask[:, 1:].bool()].cpu()


def completion_token_lists(samples: Sequence[Generation]) -> list[list[int]]:
    """Each sampled completion's counted tokens (EOS included, padding dropped) as a list."""
    out = []
    for gen in samples:
        ids, mask = gen.completion_ids, gen.completion_mask[:, gen.prompt_length :].bool()
        out += [row[m].tolist() for row, m in zip(ids, mask)]
    return out


def score_samples(
    teacher: nn.Module, samples: Sequence[Generation], student: nn.Module | None = None
) -> dict[str, float]:
    """Teacher NLL of sampled completion tokens and, with ``student``, the KLs at them.

    Returns ``teacher_nll`` (mean over all counted completion tokens of ``-log p_teacher``) and,
    when ``student`` is given, ``kl_student_teacher_on_samples`` = mean ``KL(p_s || p_t)`` and
    ``kl_teacher_student_on_samples`` = mean ``KL(p_t || p_s)`` over the same positions (the
    next-token distributions, temperature 1, cut to the common vocabulary). NaN when no token
    counts. This is GKD's on-policy evaluation (Agarwal et al., 2024) when ``samples`` are the
    student's own.
    """
    nll = kl_st = kl_ts = 0.0
    n = 0
    for gen in samples:
        t_logits = completion_logits(teacher, gen)
        targets = completion_targets(gen)
        if targets.numel() == 0:
            continue
        vocab = t_logits.shape[-1]
        if student is not None:
            s_logits = completion_logits(student, gen)
            vocab = min(vocab, s_logits.shape[-1])
            log_s = s_logits[:, :vocab].log_softmax(-1)
        log_t = t_logits[:, :vocab].log_softmax(-1)
        nll += float(-log_t.gather(-1, targets[:, None]).sum())
        if student is not None:
            kl_st += float((log_s.exp() * (log_s - log_t)).sum())
            kl_ts += float((log_t.exp() * (log_t - log_s)).sum())
        n += int(targets.numel())
    mean = (lambda x: x / n) if n else (lambda x: math.nan)
    out = {"teacher_nll": mean(nll)}
    if student is not None:
        out["kl_student_teacher_on_samples"] = mean(kl_st)
        out["kl_teacher_student_on_samples"] = mean(kl_ts)
    return out


def teacher_nll(teacher: nn.Module, samples: Sequence[Generation]) -> float:
    """Mean per-token NLL under ``teacher`` of the counted completion tokens of ``samples``."""
    return score_samples(teacher, samples)["teacher_nll"]


def distinct_n(sequences: Iterable[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / total n-grams over all ``sequences``.

    N-grams never cross sequences; NaN when no sequence has ``n`` tokens.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def _prompt_tokens(samples: Sequence[Generation]) -> list[list[int]]:
    out = []
    for gen in samples:
        p = gen.prompt_length
        ids, mask = gen.input_ids[:, :p], gen.attention_mask[:, :p].bool()
        out += [row[m].tolist() for row, m in zip(ids, mask)]
    return out


def sample_block(
    model: nn.Module,
    teacher: nn.Module,
    samples: Sequence[Generation],
    *,
    is_teacher: bool = False,
) -> dict[str, Any]:
    """The diagnostics of one model's ``samples``: teacher NLL, KLs (unless ``is_teacher``),
    distinct-1/2 and the mean completion length."""
    tokens = completion_token_lists(samples)
    block: dict[str, Any] = score_samples(teacher, samples, None if is_teacher else model)
    block.update(
        distinct_1=distinct_n(tokens, 1),
        distinct_2=distinct_n(tokens, 2),
        mean_completion_tokens=sum(map(len, tokens)) / len(tokens) if tokens else 0.0,
        samples=len(tokens),
    )
    return block


def generation_diagnostics(
    models: Mapping[str, nn.Module],
    prompt_batches: Sequence[Mapping[str, Any]],
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    teacher: str = "teacher",
    pad_token_id: int | None = None,
    decode: Decode | None = None,
    n_examples: int = 3,
) -> dict[str, dict[str, Any]]:
    """Generation diagnostics of every model in ``models`` against ``models[teacher]``.

    Each model samples a completion for every prompt (seeded with ``seed``, so the same call
    gives the same numbers); its block holds ``teacher_nll``, ``kl_student_teacher_on_samples``,
    ``kl_teacher_student_on_samples`` (Agarwal et al., 2024), ``distinct_1``/``distinct_2``
    (Li et al., 2016), ``mean_completion_tokens``, ``samples`` and ``examples``: the first
    ``n_examples`` prompts with this model's and the teacher's completions, decoded with
    ``decode`` (token ids as text without one). The teacher's own block (its NLL of its own
    samples, distinct-n, length) is the reference and has no KLs or examples.
    """
    if teacher not in models:
        raise ValueError(f"generation diagnostics need a {teacher!r} model; got {sorted(models)}")
    decode = decode or ids_as_text
    ref = models[teacher]
    ref_samples = sample_completions(
        ref, prompt_batches, sampling, seed=seed, pad_token_id=pad_token_id
    )
    prompts = _prompt_tokens(ref_samples)[:n_examples]
    ref_tokens = completion_token_lists(ref_samples)[:n_examples]
    out = {teacher: sample_block(ref, ref, ref_samples, is_teacher=True)}
    for name, model in models.items():
        if name == teacher:
            continue
        samples = sample_completions(
            model, prompt_batches, sampling, seed=seed, pad_token_id=pad_token_id
        )
        block = sample_block(model, ref, samples)
        own = completion_token_lists(samples)[:n_examples]
        block["examples"] = [
            {"prompt": decode(p), "completion": decode(c), "teacher_completion": decode(t)}
            for p, c, t in zip(prompts, own, ref_tokens)
        ]
        out[name] = block
    return out


__all__ = [
    "completion_logits",
    "completion_targets",
    "completion_token_lists",
    "distinct_n",
    "eos_and_pad",
    "generation_diagnostics",
    "ids_as_text",
    "sample_block",
    "sample_completions",
    "score_samples",
    "teacher_nll",
]

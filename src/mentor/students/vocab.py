"""Vocabulary and tokenizer checks run before any LM or encoder distillation.

- identical tokenizers (same token -> id map and special tokens) and output sizes: proceed;
- the same map but padded output sizes (e.g. 151,936 vs 152,064 rows): logits of both models
  are trimmed to the common size, with a warning (padding rows are never real tokens);
- different tokenizers: a clear error; token-level losses compare distributions over the same
  token ids, so use cross-tokenizer distillation (``data.source: xtok_text`` with ``uld`` /
  ``gold_hybrid``) or sequence-level distillation (train on teacher-generated text) instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from mentor.models import VOCAB_LIMIT_ATTR


class VocabMismatchError(ValueError):
    """Teacher and student tokenizers differ: token-level distillation is not possible."""


@dataclass
class VocabCheck:
    """Result of :func:`check_vocab`: the common output size and whether logits are trimmed."""

    size: int | None
    trimmed: bool = False
    message: str = ""


def output_size(model: nn.Module) -> int | None:
    """Rows of the output layer of an HF LM (``get_output_embeddings``), else None."""
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    cfg = getattr(model, "config", None)
    return int(cfg.vocab_size) if cfg is not None and hasattr(cfg, "vocab_size") else None


def _signature(tok: Any) -> tuple[dict[str, int], dict[str, Any]]:
    specials = {
        k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    return dict(tok.get_vocab()), specials


def check_vocab(
    teacher_tok: Any,
    student_tok: Any,
    teacher_size: int | None,
    student_size: int | None,
) -> VocabCheck:
    """Compare tokenizers and output sizes; raise :class:`VocabMismatchError` if they differ."""
    n_tok = None
    if teacher_tok is not None and student_tok is not None and teacher_tok is not student_tok:
        (tv, ts), (sv, ss) = _signature(teacher_tok), _signature(student_tok)
        if tv != sv:
            diff = len(set(tv.items()) ^ set(sv.items()))
            raise VocabMismatchError(
                f"teacher and student tokenizers differ ({len(tv):,} vs {len(sv):,} tokens, "
                f"{diff:,} token->id pairs not shared): token-level distillation compares "
                "distributions over the same token ids. Use a student with the teacher's "
                "tokenizer (e.g. student.builder=layer_drop or shrink), cross-tokenizer "
                "distillation (data.source=xtok_text tokenises the text per side, with uld or "
                "gold_hybrid terms: see docs/losses.md), or sequence-level distillation (train "
                "the student on teacher-generated text)."
            )
        if ts != ss:
            warnings.warn(
                f"teacher and student tokenizers share their vocabulary but not their special "
                f"tokens ({ts} vs {ss})",
                stacklevel=2,
            )
        n_tok = len(tv)
    if teacher_size is None or student_size is None or teacher_size == student_size:
        return VocabCheck(teacher_size or student_size)
    common = min(teacher_size, student_size)
    if n_tok is not None and common < n_tok:
        raise VocabMismatchError(
            f"output sizes {teacher_size:,} (teacher) and {student_size:,} (student) are not "
            f"both padded versions of the {n_tok:,}-token vocabulary: cannot align them"
        )
    msg = (
        f"teacher has {teacher_size:,} output rows, student {student_size:,}: same tokenizer "
        f"with padded vocabularies, logits are trimmed to the common {common:,}"
    )
    warnings.warn(msg, stacklevel=2)
    return VocabCheck(common, trimmed=True, message=msg)


def reconcile(
    teacher: nn.Module,
    student: nn.Module,
    teacher_tok: Any = None,
    student_tok: Any = None,
) -> VocabCheck:
    """Check ``teacher`` against ``student``; mark both for trimming when sizes are padded."""
    res = check_vocab(teacher_tok, student_tok, output_size(teacher), output_size(student))
    if res.trimmed:
        setattr(teacher, VOCAB_LIMIT_ATTR, res.size)
        setattr(student, VOCAB_LIMIT_ATTR, res.size)
    return res


__all__ = ["VocabCheck", "VocabMismatchError", "check_vocab", "output_size", "reconcile"]

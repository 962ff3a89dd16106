"""Per-family set-up shared by ``mentor.run.distill`` and ``load_run``.

Which tokenizer the data uses (the teacher's model unless the recipe names one), which
students need the teacher to be built, and the tokenizer/vocabulary check between teacher and
student before any token-level distillation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mentor.config import RunConfig
from mentor.data import DataBundle, build_data
from mentor.engine.loop import OUTPUT_TAP
from mentor.models.hf import hf_core
from mentor.students.vocab import VocabCheck, check_vocab, output_size, reconcile

# Student builders that copy or reshape the teacher, so need it even without teacher terms.
FROM_TEACHER = ("layer_drop", "shrink")


def model_spec(params: dict[str, Any]) -> str | None:
    """The ``model`` entry of builder params (asset name, folder or Hub id), if any."""
    m = params.get("model")
    return str(m) if m else None


def data_tokenizer(cfg: RunConfig) -> str | None:
    """The model spec whose tokenizer text data uses: the teacher's, else the student's."""
    tc = cfg.teacher
    for params in (tc.params, *(m.params for m in tc.members), cfg.student.params):
        spec = model_spec(params)
        if spec:
            return spec
    if cfg.student.builder.startswith("hf:"):
        return cfg.student.builder[3:]
    return None


def build_run_data(cfg: RunConfig) -> DataBundle:
    """The recipe's data, tokenised with the teacher's tokenizer when the source is text."""
    return build_data(
        cfg.data.source,
        cfg.data.params,
        cfg.data.val_fraction,
        cfg.data.split_seed,
        tokenizer=data_tokenizer(cfg),
    )


def student_needs_teacher(cfg: RunConfig) -> bool:
    """True when the student builder derives the student from the teacher module."""
    b = cfg.student.builder
    if b in FROM_TEACHER:
        return True
    return b == "tfidf_mlp" and "out_dim" not in cfg.student.params


def student_tokenizer(cfg: RunConfig) -> str | None:
    """The student's own tokenizer when it brings one (``hf:<path>``, ``hf_*`` builders)."""
    b, p = cfg.student.builder, cfg.student.params
    if b.startswith("hf:"):
        return b[3:]
    if b in ("hf", "hf_causal_lm", "hf_classifier", "hf_embedder"):
        return model_spec(p)
    return None


def check_student_vocab(
    cfg: RunConfig, bundle: DataBundle, teacher: nn.Module | None, student: nn.Module
) -> VocabCheck | None:
    """Tokenizer/vocabulary check before LM or encoder distillation (see students/vocab.py).

    The data was tokenised with the teacher's tokenizer; a student bringing its own must share
    the token -> id map. Causal LMs with padded output sizes get their logits trimmed.
    """
    if hf_core(student) is None:
        return None
    s_spec, d_spec = student_tokenizer(cfg), bundle.info.tokenizer
    if s_spec and d_spec and s_spec != d_spec:
        from mentor.models.assets import load_tokenizer

        check_vocab(load_tokenizer(d_spec), load_tokenizer(s_spec), None, None)
    n_ids = bundle.info.vocab_size
    rows = hf_core(student).get_input_embeddings().weight.shape[0]
    if n_ids and rows < n_ids:
        raise ValueError(
            f"the student embeds {rows:,} token ids but the data's tokenizer has {n_ids:,}: "
            "use a student built from the teacher (layer_drop, shrink) or with its tokenizer"
        )
    if teacher is not None and hf_core(teacher) is not None and bundle.info.task == "causal_lm":
        return reconcile(teacher, student)
    if bundle.info.task == "causal_lm":
        return VocabCheck(output_size(student))
    return None


__all__ = [
    "FROM_TEACHER",
    "OUTPUT_TAP",
    "build_run_data",
    "check_student_vocab",
    "data_tokenizer",
    "student_needs_teacher",
    "student_tokenizer",
]

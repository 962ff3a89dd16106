"""Builders for Hugging Face models and the TF-IDF student (``student.builder`` names).

- ``hf_causal_lm`` / ``hf_classifier`` / ``hf_embedder``: pretrained models (teachers, or
  students from a user's own model via ``hf:<path>``);
- ``hf_config``: a random model from a config (tiny models for tests and benchmarks);
- ``llama``: a small random Llama for the data's own tokenizer (e.g. a student BPE);
- ``layer_drop``: copy chosen teacher blocks into a shallower model of the same architecture;
- ``shrink``: the teacher's config with fewer layers or a smaller width, random init;
- ``tfidf_mlp``: TF-IDF features + a small ReLU network (Luxical).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from mentor.data.sources import DataInfo
from mentor.models.hf import (
    HFClassifier,
    HFEmbedder,
    find_layers,
    hf_core,
    load_causal_lm,
    load_encoder,
    set_layers,
)
from mentor.models.tfidf import TfidfMLP
from mentor.students.builders import BUILDERS


def _trainable(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def _wrap_encoder(
    encoder: nn.Module,
    info: DataInfo,
    *,
    task: str | None = None,
    num_classes: int | None = None,
    pooling: str = "mean",
    dropout: float = 0.0,
    normalize: bool = True,
) -> nn.Module:
    task = task or info.task
    if task == "embedding":
        return HFEmbedder(encoder, pooling=pooling, normalize=normalize)
    n = num_classes or info.num_classes
    if not n:
        raise ValueError("an encoder classifier needs num_classes (or data with known classes)")
    return HFClassifier(encoder, n, pooling=pooling, dropout=dropout)


@BUILDERS.register("hf_causal_lm")
def hf_causal_lm(
    info: DataInfo, teacher: nn.Module | None = None, *, model: str, convert: bool = True
) -> nn.Module:
    """A pretrained Hugging Face causal LM (asset name, folder, .gguf file or Hub id)."""
    return load_causal_lm(model, convert=convert)


@BUILDERS.register("hf_classifier")
def hf_classifier(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    model: str,
    num_classes: int | None = None,
    pooling: str = "mean",
    dropout: float = 0.0,
    freeze_encoder: bool = False,
) -> nn.Module:
    """A pretrained encoder + pooling + a new linear head (``freeze_encoder``: head only)."""
    m = HFClassifier(load_encoder(model), num_classes or _classes(info), pooling, dropout)
    if freeze_encoder:
        m.encoder.requires_grad_(False)
    return m


def _classes(info: DataInfo) -> int:
    if not info.num_classes:
        raise ValueError("a classifier needs data with a known number of classes")
    return info.num_classes


@BUILDERS.register("hf_embedder")
def hf_embedder(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    model: str,
    pooling: str = "mean",
    normalize: bool = True,
) -> nn.Module:
    """A pretrained encoder as a sentence embedder (mean pooling + L2 normalisation)."""
    return HFEmbedder(load_encoder(model), pooling=pooling, normalize=normalize)


@BUILDERS.register("hf")
def hf_model(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    model: str,
    pooling: str = "mean",
) -> nn.Module:
    """A user's own model (``hf:<path>``): a saved mentor model or an HF model for the task."""
    from pathlib import Path

    if (Path(model) / "mentor_model.json").exists():
        from mentor.students.builders import load_model

        return _trainable(load_model(model)[0])
    if info.task == "causal_lm":
        return _trainable(load_causal_lm(model))
    return _trainable(_wrap_encoder(load_encoder(model), info, pooling=pooling))


@BUILDERS.register("hf_config")
def hf_config(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    config: dict[str, Any],
    task: str | None = None,
    pooling: str = "mean",
    num_classes: int | None = None,
) -> nn.Module:
    """A randomly initialised HF model from a config (``config.model_type``, e.g. llama, bert).

    ``vocab_size`` defaults to the data's. The task (data's by default) picks the family:
    ``causal_lm`` -> ``AutoModelForCausalLM``, ``classification`` -> encoder + linear head,
    ``embedding`` -> encoder + mean pooling + L2 normalisation.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kw = dict(config)
    model_type = kw.pop("model_type", None)
    if not model_type:
        raise ValueError("hf_config needs config.model_type (e.g. llama, bert)")
    if info.vocab_size and "vocab_size" not in kw:
        kw["vocab_size"] = info.vocab_size
    cfg = AutoConfig.for_model(model_type, **kw)
    task = task or info.task
    if task == "causal_lm":
        return AutoModelForCausalLM.from_config(cfg).train()
    return _wrap_encoder(
        AutoModel.from_config(cfg), info, task=task, pooling=pooling, num_classes=num_classes
    ).train()


@BUILDERS.register("llama")
def llama(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    vocab_size: int | None = None,
) -> nn.Module:
    """A small Llama-shaped causal LM (random init) for the data's own tokenizer.

    Sized for the tokenizer that produced the data's ``input_ids`` (``info.vocab_size``, its
    start/end/padding token ids), e.g. a student with its own BPE vocabulary trained by
    ``data.source: xtok_text`` for cross-tokenizer distillation; the run saves that tokenizer
    with the student. Architecture: Touvron et al., "LLaMA: Open and Efficient Foundation
    Language Models" (2023). ``intermediate_size`` defaults to ~8/3 of ``hidden_size`` (a
    multiple of 16), ``num_kv_heads`` to ``num_heads``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    v = vocab_size or info.vocab_size
    if not v:
        raise ValueError("builder 'llama' needs data with a known vocab_size (or vocab_size=)")
    if hidden_size % num_heads:
        raise ValueError(f"llama: hidden_size={hidden_size} is not a multiple of "
                         f"num_heads={num_heads}")  # fmt: skip
    ex = info.extra
    cfg = LlamaConfig(
        vocab_size=int(v),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 16 * max(1, round(hidden_size * 8 / 3 / 16)),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ex.get("bos_token_id"),
        eos_token_id=ex.get("eos_token_id"),
        pad_token_id=ex.get("pad_token_id"),
    )
    return LlamaForCausalLM(cfg).train()


def _need_teacher(teacher: nn.Module | None, builder: str) -> nn.Module:
    if teacher is None:
        raise ValueError(
            f"builder {builder!r} builds the student from the teacher: the recipe needs a "
            "teacher (teacher.builder or teacher.path)"
        )
    if hf_core(teacher) is None:
        raise ValueError(
            f"builder {builder!r} needs a Hugging Face teacher, got {type(teacher).__name__}"
        )
    return teacher


def choose_layers(
    n: int,
    layers: Sequence[int] | None = None,
    every: int | None = None,
    num_layers: int | None = None,
) -> list[int]:
    """Teacher block indices to keep: explicit, every k-th, or ``num_layers`` evenly spaced."""
    given = sum(x is not None for x in (layers, every, num_layers))
    if given != 1:
        raise ValueError("layer_drop needs exactly one of layers=[...], every=k or num_layers=n")
    if layers is not None:
        keep = [int(i) + n if int(i) < 0 else int(i) for i in layers]
    elif every is not None:
        if every < 1:
            raise ValueError(f"layer_drop every={every}: must be >= 1")
        keep = list(range(0, n, every))
    else:
        if not 1 <= num_layers <= n:  # type: ignore[operator]
            raise ValueError(f"layer_drop num_layers={num_layers}: must be in 1..{n}")
        if num_layers == 1:
            keep = [0]
        else:
            keep = sorted({round(i * (n - 1) / (num_layers - 1)) for i in range(num_layers)})  # type: ignore[operator]
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep:
        raise ValueError(f"layer_drop layers {keep}: the teacher has layers 0..{n - 1}")
    if len(set(keep)) != len(keep) or keep != sorted(keep):
        raise ValueError(f"layer_drop layers {keep} must be distinct and increasing")
    return keep


def calibration_token_batches(
    data: Any, n_batches: int, batch_size: int = 4
) -> list[dict[str, Any]]:
    """Up to ``n_batches`` batches of ``batch_size`` token sequences spread evenly over ``data``.

    Items must carry ``input_ids`` (and optionally ``attention_mask``), as the token data
    sources give (``lm_text``, tokenised text datasets); all-padding columns are trimmed.
    """
    import torch

    try:
        n = len(data)
    except TypeError:
        raise ValueError("layer_drop layers: auto needs the training set as calibration "
                         "data (a dataset with a length)") from None  # fmt: skip
    if n == 0:
        raise ValueError("layer_drop layers: auto needs calibration data; the training set is "
                         "empty")  # fmt: skip
    take = min(n, n_batches * batch_size)
    idx = sorted({round(i * (n - 1) / max(1, take - 1)) for i in range(take)})
    items = [data[i] for i in idx]
    if not all(isinstance(it, dict) and "input_ids" in it for it in items):
        raise ValueError(
            "layer_drop layers: auto needs token data (items with input_ids), e.g. "
            "data.source=lm_text or a text source with a tokenizer"
        )
    out = []
    for lo in range(0, len(items), batch_size):
        chunk = items[lo : lo + batch_size]
        ids = torch.stack([torch.as_tensor(it["input_ids"]) for it in chunk])
        if all("attention_mask" in it for it in chunk):
            mask = torch.stack([torch.as_tensor(it["attention_mask"]) for it in chunk])
        else:
            mask = torch.ones_like(ids)
        used = mask.any(0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        out.append({"input_ids": ids[:, :width], "attention_mask": mask[:, :width]})
    return out


def auto_layers(
    teacher: nn.Module, data: Any, num_layers: int | None, n_batches: int = 8
) -> list[int]:
    """The ``num_layers`` teacher blocks of highest ShortGPT Block Importance, in order.

    Block Importance ``1 - cos(block input, block output)`` averaged over the tokens of up to
    ``n_batches`` calibration batches of 4 sequences from ``data`` (Men et al., "ShortGPT:
    Layers in Large Language Models are More Redundant Than You Expect", 2024; Minitron's depth
    score, Sreenivas et al., "LLM Pruning and Distillation in Practice: The Minitron Approach",
    2024). Pure ranking, as in ShortGPT: no block is kept by rule (the first block usually
    scores among the highest, so it normally stays; ties go to the earlier block).
    """
    from mentor.pruning.importance import block_importance

    n = len(find_layers(teacher)[1])
    if num_layers is None:
        raise ValueError("layer_drop layers: auto needs num_layers=n (how many blocks to keep)")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= n:
        raise ValueError(f"layer_drop num_layers={num_layers}: must be in 1..{n}")
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"layer_drop calibration_batches={n_batches}: must be an int >= 1")
    if data is None:
        raise ValueError(
            "layer_drop layers: auto scores the teacher's blocks on calibration data, but no "
            "data was given (the recipe's training set is passed when the builder is run by "
            "mentor)"
        )
    scores = block_importance(teacher, calibration_token_batches(data, n_batches))
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:num_layers])


@BUILDERS.register("layer_drop")
def layer_drop(
    info: DataInfo,
    teacher: nn.Module | None = None,
    data: Any = None,
    *,
    layers: list[int] | str | None = None,
    every: int | None = None,
    num_layers: int | None = None,
    calibration_batches: int = 8,
) -> nn.Module:
    """A shallower copy of the teacher: chosen blocks, embeddings, norms and heads copied.

    DistilBERT initialises its student from every other teacher layer (Sanh et al.,
    "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter", 2019);
    Minitron prunes depth and keeps the remaining weights before distilling (Muralidharan et
    al., "Compact Language Models via Pruning and Knowledge Distillation", 2024). Give
    ``layers`` (e.g. [0, 6, 12, 18, 24, 29]), ``every`` (every k-th from 0) or ``num_layers``
    (evenly spaced, first and last kept). ``layers: auto`` with ``num_layers: n`` keeps the
    ``n`` blocks of highest ShortGPT Block Importance measured on up to
    ``calibration_batches`` batches of 4 training sequences (see :func:`auto_layers`).
    """
    teacher = _need_teacher(teacher, "layer_drop")
    path, blocks = find_layers(teacher)
    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f"layer_drop layers={layers!r}: give a list of block indices or "
                             "'auto'")  # fmt: skip
        if every is not None:
            raise ValueError("layer_drop layers: auto takes num_layers=n, not every")
        keep = auto_layers(teacher, data, num_layers, calibration_batches)
    else:
        keep = choose_layers(len(blocks), layers, every, num_layers)
    # copy everything but the blocks, then the kept blocks (no 30-layer deep copy)
    set_layers(teacher, path, nn.ModuleList())
    try:
        student = copy.deepcopy(teacher)
    finally:
        set_layers(teacher, path, blocks)
    new = nn.ModuleList(copy.deepcopy(blocks[i]) for i in keep)
    for j, block in enumerate(new):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j  # KV-cache slot of the block in the student
    set_layers(student, path, new)
    cfg = hf_core(student).config
    cfg.num_hidden_layers = len(keep)
    for attr in ("layer_types", "mlp_only_layers"):
        v = getattr(cfg, attr, None)
        if isinstance(v, list) and len(v) == len(blocks):
            setattr(cfg, attr, [v[i] for i in keep])
    for attr in ("mentor_vocab_limit",):
        if hasattr(student, attr):
            delattr(student, attr)
    return _trainable(student)


@BUILDERS.register("shrink")
def shrink(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """The teacher's architecture and tokenizer with fewer layers / smaller width, random init.

    Keeps the vocabulary, so token-level distillation applies; ``config`` overrides any other
    config field.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    teacher = _need_teacher(teacher, "shrink")
    core = hf_core(teacher)
    cfg = copy.deepcopy(core.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    changes = {
        "num_hidden_layers": num_layers,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        **(config or {}),
    }
    for k, v in changes.items():
        if v is not None:
            setattr(cfg, k, v)
    if hidden_size is not None and hasattr(cfg, "head_dim") and "head_dim" not in (config or {}):
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    lt = getattr(cfg, "layer_types", None)
    if isinstance(lt, list) and len(lt) != cfg.num_hidden_layers:
        cfg.layer_types = lt[: cfg.num_hidden_layers]
    if core is teacher:
        return AutoModelForCausalLM.from_config(cfg).train()
    enc = AutoModel.from_config(cfg)
    if isinstance(teacher, HFEmbedder):
        return HFEmbedder(enc, pooling=teacher.pooling, normalize=teacher.normalize).train()
    return HFClassifier(enc, teacher.num_classes, teacher.pooling, teacher.dropout.p).train()


@BUILDERS.register("tfidf_mlp")
def tfidf_mlp(
    info: DataInfo,
    teacher: nn.Module | None = None,
    data: Any = None,
    *,
    out_dim: int | None = None,
    hidden: list[int] | int = 256,
    max_features: int = 20000,
    min_df: int = 2,
    ngram_range: list[int] = (1, 2),  # type: ignore[assignment]
    normalize: bool | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """TF-IDF n-grams + ReLU MLP reading raw texts (Luxical, DatologyAI 2025).

    The vocabulary and idf are fit on the training texts. ``out_dim`` defaults to the
    teacher's embedding size (embedding task) or the number of classes; outputs are
    L2-normalised for embeddings unless ``normalize`` says otherwise.
    """
    texts = getattr(data, "texts", None)
    if texts is None:
        raise ValueError(
            "tfidf_mlp needs a text data source (items with 'texts'), e.g. data.source=bbc_news"
        )
    if out_dim is None:
        if info.task == "embedding":
            core = hf_core(teacher) if teacher is not None else None
            if core is None:
                raise ValueError("tfidf_mlp: give out_dim (no HF teacher to copy it from)")
            out_dim = int(core.config.hidden_size)
        else:
            out_dim = _classes(info)
    hidden = [hidden] if isinstance(hidden, int) else list(hidden)
    return TfidfMLP.from_texts(
        list(texts),
        out_dim,
        max_features=max_features,
        min_df=min_df,
        ngram_range=ngram_range,
        hidden=hidden,
        normalize=(info.task == "embedding") if normalize is None else normalize,
        dropout=dropout,
    )


__all__ = [
    "auto_layers",
    "calibration_token_batches",
    "choose_layers",
    "hf_causal_lm",
    "hf_classifier",
    "hf_config",
    "hf_embedder",
    "hf_model",
    "layer_drop",
    "llama",
    "shrink",
    "tfidf_mlp",
]


@BUILDERS.register("llm_classifier")
def llm_classifier_builder(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    model: str,
    prompt: str | None = None,
    answers: Any = None,
    chat: bool = False,
    response_prefix: str = "",
    answer_prefix: str = " ",
    max_text_tokens: int = 256,
    batch_size: int = 8,
) -> nn.Module:
    """A causal LM as a zero-shot classifier of the data's classes (answer log-likelihoods).

    Parameters (``teacher.params``): ``model``, ``prompt`` (with ``{text}``, optionally
    ``{classes}``), ``answers`` (class name -> the word the LM answers), ``chat``,
    ``response_prefix``, ``answer_prefix``, ``max_text_tokens``, ``batch_size``. See
    :mod:`mentor.models.llm_labeler`.
    """
    from mentor.models.llm_labeler import llm_classifier

    if info.task != "classification":
        raise ValueError(
            f"teacher.builder llm_classifier labels classification data; this data's task is "
            f"{info.task!r}"
        )
    from mentor.models.llm_labeler import DEFAULT_PROMPT

    return llm_classifier(
        info.class_names, model=model, answers=answers, prompt=prompt or DEFAULT_PROMPT,
        chat=chat, response_prefix=response_prefix, answer_prefix=answer_prefix,
        max_text_tokens=max_text_tokens, batch_size=batch_size,
    )  # fmt: skip

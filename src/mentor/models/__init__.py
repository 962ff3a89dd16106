"""Adapters: run any supported model on a batch and get its logits (or embeddings).

Families: Hugging Face causal LMs (logits ``[B, T, V]``), encoders as sequence classifiers
(``[B, C]``) or sentence embedders (``[B, D]``, L2-normalised), TF-IDF + MLP students that
read raw texts, and any ``nn.Module`` returning logits.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

# Attribute set on a model whose logits must be cut to a common vocabulary (see vocab.py).
VOCAB_LIMIT_ATTR = "mentor_vocab_limit"


def position_ids(batch: dict[str, Any]) -> Tensor | None:
    """Positions of a batch of left-padded prompts (+ completions): real tokens count from 0.

    None for other batches (right padding: a model's default positions are already right).
    """
    mask = batch.get("attention_mask")
    if "prompt_ids" not in batch or mask is None:
        return None
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def model_outputs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Call ``model`` on ``batch`` and return its logits (or embeddings) tensor.

    Models with ``takes_texts = True`` (TF-IDF students) get ``batch["texts"]``, a list of
    strings. Batches with ``input_ids`` are passed as keyword arguments (Hugging Face style,
    with the attention mask); others call ``model(batch["inputs"])``. Outputs with a
    ``.logits`` attribute, tuples (first element) and bare tensors are all accepted. Logits of
    a model marked by the vocabulary check are trimmed to the common vocabulary size.
    """
    if getattr(model, "takes_texts", False) or getattr(
        getattr(model, "module", None), "takes_texts", False
    ):
        if "texts" not in batch:
            raise KeyError(
                f"{type(model).__name__} reads raw texts but the batch has no 'texts' "
                f"(keys: {sorted(batch)}); use a text data source"
            )
        out = model(batch["texts"])
    elif "input_ids" in batch:
        kwargs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
            pos = position_ids(batch)
            if pos is not None:
                kwargs["position_ids"] = pos
        out = model(**kwargs)
    elif "inputs" in batch:
        out = model(batch["inputs"])
    else:
        raise KeyError(f"batch has neither 'input_ids' nor 'inputs' (keys: {sorted(batch)})")
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    limit = getattr(model, VOCAB_LIMIT_ATTR, None)
    if limit is not None and out.shape[-1] > limit:
        out = out[..., :limit]
    return out


__all__ = ["VOCAB_LIMIT_ATTR", "model_outputs", "position_ids"]

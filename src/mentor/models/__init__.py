"""Adapters: run any supported model on a batch and get its logits (or embeddings).

Families: Hugging Face causal LMs (logits ``[B, T, V]``), encoders as sequence classifiers
(``[B, C]``) or sentence embedders (``[B, D]``, L2-normalised), TF-IDF + MLP students that
read raw texts, and any ``nn.Module`` returning logits.
"""

from __future__ import annotations

import inspect
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


# Batch key (int): only positions from here on need logits (the engine sets it on prompt
# batches, whose loss counts completion tokens only; see DistillModule and tasks.CausalLM).
LOGITS_FROM = "logits_from"


def takes_logits_to_keep(model: nn.Module) -> bool:
    """True when ``model.forward`` accepts ``logits_to_keep`` (recent HF causal LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def model_outputs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Call ``model`` on ``batch`` and return its logits (or embeddings) tensor.

    Models with ``takes_texts = True`` (TF-IDF students) get ``batch["texts"]``, a list of
    strings. Batches with ``input_ids`` are passed as keyword arguments (Hugging Face style,
    with the attention mask); others call ``model(batch["inputs"])``. Outputs with a
    ``.logits`` attribute, tuples (first element) and bare tensors are all accepted. Logits of
    a model marked by the vocabulary check are trimmed to the common vocabulary size. With
    ``batch["logits_from"] = s`` a model that takes ``logits_to_keep`` computes the logits of
    positions ``s..L-1`` only (the output layer is most of a small LM's cost).
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
        start = batch.get(LOGITS_FROM)
        if isinstance(start, int) and start > 0 and takes_logits_to_keep(model):
            kwargs["logits_to_keep"] = int(batch["input_ids"].shape[1]) - start
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


__all__ = [
    "LOGITS_FROM",
    "VOCAB_LIMIT_ATTR",
    "model_outputs",
    "position_ids",
    "takes_logits_to_keep",
]

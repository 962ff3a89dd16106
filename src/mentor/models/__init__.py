"""Adapters: run any supported model on a batch and get its logits (or embeddings)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def model_outputs(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Call ``model`` on ``batch`` and return its logits tensor.

    Batches with ``input_ids`` are passed as keyword arguments (Hugging Face style, with the
    attention mask); others call ``model(batch["inputs"])``. Outputs with a ``.logits``
    attribute, tuples (first element) and bare tensors are all accepted.
    """
    if "input_ids" in batch:
        kwargs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        out = model(**kwargs)
    elif "inputs" in batch:
        out = model(batch["inputs"])
    else:
        raise KeyError(f"batch has neither 'input_ids' nor 'inputs' (keys: {sorted(batch)})")
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out

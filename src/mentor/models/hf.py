"""Adapters for Hugging Face models: causal LMs, encoders as classifiers and as embedders.

Every adapter maps a batch to one tensor (``model_outputs``): causal LMs give ``[B, T, V]``
logits, classifiers ``[B, C]`` logits, embedders ``[B, D]`` L2-normalised sentence embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mentor.models.assets import load_pretrained, quiet_hf

# Where the stack of transformer blocks lives, by architecture (first match wins).
LAYER_PATHS = ("model.layers", "encoder.layer", "transformer.h", "gpt_neox.layers", "layers")


def load_causal_lm(model: str, **kw: Any) -> nn.Module:
    """A Hugging Face causal LM from an asset name, folder, ``.gguf`` file or Hub id (fp32)."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, model, **kw).eval()


def load_encoder(model: str, **kw: Any) -> nn.Module:
    """A Hugging Face encoder (``AutoModel``, no task head) from a model spec."""
    from transformers import AutoModel

    return load_pretrained(AutoModel, model, **kw)


def mean_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of token states over the attention mask: ``[B, T, D] -> [B, D]``."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _pool(hidden: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return mean_pool(hidden, mask)
    raise ValueError(f"pooling={pooling!r}: choose 'mean' or 'cls'")


class _EncoderAdapter(nn.Module):
    """Shared parts of encoder adapters: the wrapped encoder and how to save it."""

    kind = ""

    def __init__(self, encoder: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r}: choose 'mean' or 'cls'")
        self.encoder = encoder
        self.pooling = pooling

    @property
    def config(self) -> Any:
        """The encoder's Hugging Face config."""
        return self.encoder.config

    def pooled(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pooled encoder states ``[B, D]``."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return _pool(out.last_hidden_state, attention_mask, self.pooling)

    def adapter_meta(self) -> dict[str, Any]:
        """What ``load_adapter`` needs besides the weights."""
        return {"pooling": self.pooling}


class HFClassifier(_EncoderAdapter):
    """Sequence classifier: Hugging Face encoder + pooling (mean or [CLS]) + a linear head."""

    kind = "hf_classifier"

    def __init__(
        self, encoder: nn.Module, num_classes: int, pooling: str = "mean", dropout: float = 0.0
    ) -> None:
        """Wrap ``encoder`` with a fresh ``Linear(hidden, num_classes)`` head."""
        super().__init__(encoder, pooling)
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Class logits ``[B, C]``."""
        return self.head(self.dropout(self.pooled(input_ids, attention_mask)))

    def adapter_meta(self) -> dict[str, Any]:
        """Pooling, classes and dropout."""
        return {
            "pooling": self.pooling,
            "num_classes": self.num_classes,
            "dropout": self.dropout.p,
        }

    def encoder_frozen(self) -> bool:
        """True when no encoder parameter is trainable (the head can be fit on features)."""
        return not any(p.requires_grad for p in self.encoder.parameters())

    def fit_head(self, data: Any, fit: Any, seed: int, collate: Any = None) -> None:
        """Train only the head on pooled features computed once (frozen encoder: fast)."""
        from torch.utils.data import default_collate

        collate = collate or default_collate
        self.eval()
        feats, labels = [], []
        with torch.no_grad():
            for lo in range(0, len(data), 64):
                b = collate([data[i] for i in range(lo, min(len(data), lo + 64))])
                feats.append(self.pooled(b["input_ids"], b.get("attention_mask")))
                labels.append(b["labels"])
        x, y = torch.cat(feats), torch.cat(labels)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.head.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
        steps_per_epoch = max(1, len(x) // fit.batch_size)
        total = max(1, int(round(fit.epochs * steps_per_epoch)))
        step = 0
        self.train()
        while step < total:
            perm = torch.randperm(len(x), generator=g)
            for k in range(steps_per_epoch):
                if step >= total:
                    break
                idx = perm[k * fit.batch_size : (k + 1) * fit.batch_size]
                loss = F.cross_entropy(self.head(self.dropout(x[idx])), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        self.eval()


class HFEmbedder(_EncoderAdapter):
    """Sentence embedder: encoder + mean pooling + L2 normalisation (as sentence-transformers).

    Reimers & Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks", 2019.
    """

    kind = "hf_embedder"

    def __init__(self, encoder: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        """Wrap ``encoder``; ``normalize`` L2-normalises the pooled vector."""
        super().__init__(encoder, pooling)
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Sentence embeddings ``[B, D]``."""
        z = self.pooled(input_ids, attention_mask)
        return F.normalize(z, dim=-1) if self.normalize else z

    def adapter_meta(self) -> dict[str, Any]:
        """Pooling and normalisation."""
        return {"pooling": self.pooling, "normalize": self.normalize}


ADAPTERS: dict[str, type[_EncoderAdapter]] = {
    HFClassifier.kind: HFClassifier,
    HFEmbedder.kind: HFEmbedder,
}


def hf_core(model: nn.Module) -> nn.Module | None:
    """The Hugging Face ``PreTrainedModel`` inside ``model`` (itself or an adapter's encoder)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    enc = getattr(model, "encoder", None)
    return enc if isinstance(enc, PreTrainedModel) else None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and ``ModuleList`` of transformer blocks of an HF model or adapter."""
    core = hf_core(model)
    root = core if core is not None else model
    prefix = "encoder." if core is not None and core is not model else ""
    for path in LAYER_PATHS:
        obj: Any = root
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return prefix + path, obj
    raise ValueError(
        f"cannot find the transformer blocks of {type(root).__name__} "
        f"(looked for {', '.join(LAYER_PATHS)})"
    )


def set_layers(model: nn.Module, path: str, layers: nn.ModuleList) -> None:
    """Replace the block list at dotted ``path`` with ``layers``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, layers)


def save_hf(model: nn.Module, folder: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Save an HF model or encoder adapter; return the ``mentor_model.json`` entries."""
    from safetensors.torch import save_file

    core = hf_core(model)
    if core is None:
        raise TypeError(f"{type(model).__name__} is not a Hugging Face model or adapter")
    if hasattr(core.config, "quantization_config"):
        del core.config.quantization_config
    core.hf_quantizer = None
    if core is model:
        with quiet_hf():
            model.save_pretrained(str(folder), safe_serialization=True)
        meta: dict[str, Any] = {"format": "hf", "class": type(model).__name__}
    else:
        core.config.save_pretrained(str(folder))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        meta = {"format": "hf_adapter", "adapter": model.kind, "args": model.adapter_meta()}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return meta


def load_hf(
    folder: Path, meta: dict[str, Any], prepare: Callable[[nn.Module], Any] | None = None
) -> nn.Module:
    """Rebuild what ``save_hf`` wrote (no remote code; weights via safetensors).

    ``prepare(encoder)`` runs on an adapter's encoder built from its config, before the saved
    weights load (e.g. re-applying heads removed by structured pruning).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if meta["format"] == "hf":
        import transformers

        cls = getattr(transformers, meta["class"], None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            cls = AutoModelForCausalLM
        with quiet_hf():
            return cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    encoder = AutoModel.from_config(config)
    if prepare is not None:
        prepare(encoder)
    kind = meta["adapter"]
    if kind not in ADAPTERS:
        raise ValueError(f"{folder}: unknown adapter {kind!r} (known: {', '.join(ADAPTERS)})")
    model = ADAPTERS[kind](encoder, **meta.get("args", {}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


__all__ = [
    "ADAPTERS",
    "HFClassifier",
    "HFEmbedder",
    "find_layers",
    "hf_core",
    "load_causal_lm",
    "load_encoder",
    "load_hf",
    "mean_pool",
    "save_hf",
    "set_layers",
]

"""TF-IDF features + a small ReLU network: the "lexical-dense" student of Luxical.

DatologyAI, "Luxical: High-Speed Lexical-Dense Text Embeddings" (2025): sparse TF-IDF n-gram
features feed a small MLP trained to reproduce a transformer's sentence embeddings, running
10–100× faster than the teacher on CPU. The first layer is a sparse × dense product, so cost
scales with the number of distinct n-grams of a text, not the vocabulary size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _vectorizer(vocabulary: dict[str, int] | None, ngram_range: Sequence[int], **kw: Any) -> Any:
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(
        vocabulary=vocabulary,
        ngram_range=(int(ngram_range[0]), int(ngram_range[1])),
        lowercase=True,
        dtype=np.float32,
        **kw,
    )


class TfidfMLP(nn.Module):
    """Raw texts -> TF-IDF (sublinear tf, idf, L2 rows) -> ReLU MLP -> output (optionally L2).

    Takes a list of strings (``batch["texts"]``); ``takes_texts`` tells ``model_outputs``.
    The vocabulary and idf weights are fit on the training texts by :meth:`from_texts`.
    """

    kind = "tfidf_mlp"
    takes_texts = True

    def __init__(
        self,
        vocabulary: Sequence[str],
        idf: Sequence[float] | Tensor,
        out_dim: int,
        *,
        hidden: Sequence[int] = (256,),
        ngram_range: Sequence[int] = (1, 2),
        sublinear_tf: bool = True,
        normalize: bool = True,
        dropout: float = 0.0,
    ) -> None:
        """Build the network for a fixed vocabulary (``vocabulary[i]`` is feature ``i``)."""
        super().__init__()
        self.terms = list(vocabulary)
        self.ngram_range = [int(ngram_range[0]), int(ngram_range[1])]
        self.sublinear_tf, self.normalize = bool(sublinear_tf), bool(normalize)
        self.hidden = [int(h) for h in hidden]
        self.out_dim = int(out_dim)
        self.register_buffer("idf", torch.as_tensor(np.asarray(idf, dtype=np.float32)))
        self._vec = _vectorizer({t: i for i, t in enumerate(self.terms)}, self.ngram_range)
        self._rows: dict[str, Any] = {}  # text -> its TF-IDF row (see tfidf)
        dims = [len(self.terms), *self.hidden, self.out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        out_dim: int,
        *,
        max_features: int = 20000,
        min_df: int = 2,
        ngram_range: Sequence[int] = (1, 2),
        **kw: Any,
    ) -> TfidfMLP:
        """Fit the n-gram vocabulary (``max_features`` most frequent) and idf on ``texts``."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not texts:
            raise ValueError("tfidf_mlp needs training texts to fit its vocabulary")
        vec = TfidfVectorizer(
            ngram_range=(int(ngram_range[0]), int(ngram_range[1])),
            max_features=max_features,
            min_df=min(min_df, len(texts)),
            lowercase=True,
            dtype=np.float32,
        )
        vec.fit(texts)
        terms = [None] * len(vec.vocabulary_)
        for t, i in vec.vocabulary_.items():
            terms[i] = t
        return cls(terms, vec.idf_, out_dim, ngram_range=ngram_range, **kw)

    ROW_CACHE = 200_000  # TF-IDF rows of this many distinct texts are kept (training repeats them)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        getattr(self, "_rows", {}).clear()  # new idf: cached rows are stale
        super()._load_from_state_dict(*args, **kwargs)

    def tfidf(self, texts: Sequence[str]) -> Any:
        """Sparse TF-IDF rows as a SciPy CSR matrix ``[B, V]`` (sublinear tf, idf, L2 rows).

        Rows of texts seen before come from a cache (the vocabulary and idf are fixed, and
        training sees the same texts every epoch); the cache holds up to ``ROW_CACHE`` texts.
        """
        import scipy.sparse as sp

        texts = list(texts)
        rows = getattr(self, "_rows", None)
        if rows is None:
            rows = self._rows = {}
        missing = list(dict.fromkeys(t for t in texts if t not in rows))
        if len(rows) + len(missing) > self.ROW_CACHE:  # full: start again
            rows.clear()
            return self._tfidf(texts)
        if missing:
            fresh = self._tfidf(missing)
            for i, t in enumerate(missing):
                rows[t] = fresh[i]
            if len(missing) == len(texts):
                return fresh if missing == texts else sp.vstack([rows[t] for t in texts]).tocsr()
        return sp.vstack([rows[t] for t in texts]).tocsr()

    def _tfidf(self, texts: list[str]) -> Any:
        x = self._vec.transform(list(texts)).tocsr()
        if self.sublinear_tf:
            x.data = 1.0 + np.log(x.data)
        x = x.multiply(self.idf.detach().cpu().numpy()[None, :]).tocsr().astype(np.float32)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
        inv = 1.0 / np.maximum(norms, 1e-12)
        return x.multiply(inv[:, None]).tocsr()

    def featurize(self, texts: Sequence[str]) -> Tensor:
        """Sparse TF-IDF rows ``[B, V]`` as a torch COO tensor on the model's device."""
        coo = self.tfidf(texts).tocoo()
        idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        x = torch.sparse_coo_tensor(
            idx,
            torch.from_numpy(coo.data.astype(np.float32)),
            coo.shape,
            check_invariants=False,
            is_coalesced=True,
        )
        return x.to(self.idf.device)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Embeddings (or logits) ``[B, out_dim]`` for a list of raw texts."""
        x = self.featurize(texts)
        first = self.layers[0]
        h = torch.sparse.mm(x, first.weight.t()) + first.bias
        for layer in self.layers[1:]:
            h = layer(self.dropout(F.relu(h)))
        return F.normalize(h, dim=-1) if self.normalize else h

    def adapter_meta(self) -> dict[str, Any]:
        """Hyperparameters needed to rebuild the network (the vocabulary is saved apart)."""
        return {
            "out_dim": self.out_dim,
            "hidden": self.hidden,
            "ngram_range": self.ngram_range,
            "sublinear_tf": self.sublinear_tf,
            "normalize": self.normalize,
            "dropout": self.dropout.p,
        }

    def save(self, folder: Path) -> dict[str, Any]:
        """Write ``vocabulary.json`` and ``model.safetensors``; return the meta entries."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocabulary.json").write_text(json.dumps(self.terms))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        return {"format": "tfidf_mlp", "args": self.adapter_meta()}

    @classmethod
    def load(cls, folder: Path, meta: dict[str, Any]) -> TfidfMLP:
        """Rebuild from what :meth:`save` wrote."""
        from safetensors.torch import load_file

        terms = json.loads((folder / "vocabulary.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
        model = cls(terms, state["idf"], **meta["args"])
        model.load_state_dict(state)
        return model


__all__ = ["TfidfMLP"]

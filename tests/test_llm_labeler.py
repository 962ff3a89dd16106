"""The LLM zero-shot classifier (teacher builder ``llm_classifier``): answer log-likelihoods
from the prompt's cache equal a plain full-sequence computation; label parsing; bad input."""

from __future__ import annotations

import pytest
import torch

from mentor.models.llm_labeler import LLMClassifier, fill, parse_label
from prompt_data import save_tiny_llama, word_tokenizer


@pytest.fixture(autouse=True)
def _one(one_thread):
    pass


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import LlamaForCausalLM

    folder = save_tiny_llama(tmp_path_factory.mktemp("llama"), seed=3)
    return LlamaForCausalLM.from_pretrained(str(folder)).eval()


def _reference(lm, tok, prompt: str, answer: str) -> float:
    """log p(answer tokens | prompt), one unpadded forward of prompt + answer."""
    p = tok(prompt)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = lm(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))


def test_class_scores_equal_full_sequence_log_likelihoods(lm):
    tok = word_tokenizer()
    answers = ["w5 w6", "w7", "w8 w9 w10"]  # multi-token answers use the prompt's cache
    m = LLMClassifier(lm, tok, answers, prompt="{text} w1 w2", max_text_tokens=6, batch_size=2)
    texts = ["w3 w4", "w11 w12 w13 w14 w15", "w20", "w1 w2 w3 w4 w5 w6 w7 w8 w9"]
    out = m(texts)
    assert out.shape == (4, 3) and m.calls == 4
    for i, t in enumerate(texts):
        words = t.split()[:6]  # max_text_tokens cuts the text, not the template
        prompt = " ".join(words) + " w1 w2"
        ref = torch.tensor([_reference(lm, tok, prompt, " " + a) for a in answers])
        assert torch.allclose(out[i], ref.log_softmax(-1), atol=1e-4), (i, out[i], ref)


def test_generate_returns_the_completion_text_only(lm):
    tok = word_tokenizer()
    m = LLMClassifier(lm, tok, ["w5", "w6"], prompt="{text}")
    outs = m.generate(["w1 w2", "w3"], max_new_tokens=3)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert all(len(o.split()) <= 3 for o in outs)


def test_parse_label():
    classes = ["business", "sport", "technology", "tech"]
    assert parse_label("It is about sport and business.", classes) == 1
    assert parse_label("Mostly business... Answer: technology", classes) == 2
    assert parse_label("TOPIC: Tech", classes) == 3
    assert parse_label("nothing here", classes) is None
    assert parse_label("sportsmanship", classes) is None  # whole words only


def test_fill_replaces_named_fields_only():
    assert fill("{text} {x} {classes}", text="a {classes}", classes="b") == "a {classes} {x} b"


def test_bad_settings_are_named(lm):
    tok = word_tokenizer()
    with pytest.raises(ValueError, match=r"must contain \{text\}"):
        LLMClassifier(lm, tok, ["w1", "w2"], prompt="no placeholder")
    with pytest.raises(ValueError, match="at least 2 classes"):
        LLMClassifier(lm, tok, ["w1"])
    from mentor.models.llm_labeler import llm_classifier

    with pytest.raises(ValueError, match=r"answers names classes \['sprt'\]"):
        llm_classifier(["sport", "tech"], model="unused", answers={"sprt": "x"})
    with pytest.raises(ValueError, match="lists 1 answers for 2 classes"):
        llm_classifier(["sport", "tech"], model="unused", answers=["x"])

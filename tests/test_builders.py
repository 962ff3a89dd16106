"""Student builders on tiny in-process models: layer_drop copies the right weights, shrink,
hf_config, hf:<path>, tfidf_mlp training, and the vocabulary/tokenizer checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mentor.data import DataInfo
from mentor.data.text import TextDataset
from mentor.models import model_outputs
from mentor.models.hf import HFClassifier, HFEmbedder
from mentor.students import (
    BUILDERS,
    VocabMismatchError,
    build_model,
    check_vocab,
    reconcile,
    save_model,
)
from mentor.students.builders import count_parameters
from mentor.students.hf_builders import choose_layers


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread (see conftest.one_thread)."""


LM_INFO = DataInfo(task="causal_lm", vocab_size=128)
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _batch(b=2, t=6):
    ids = torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def llama4():
    torch.manual_seed(0)
    return build_model("hf_config", {"config": LLAMA}, LM_INFO).eval()


def test_registry_has_the_documented_builders():
    for name in ("layer_drop", "shrink", "mlp", "cnn", "tfidf_mlp", "hf", "hf_config"):
        assert name in BUILDERS


def test_layer_drop_copies_chosen_blocks_exactly(llama4):
    t_state = copy.deepcopy(llama4.state_dict())
    student = build_model("layer_drop", {"layers": [0, 3]}, LM_INFO, llama4)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert len(llama4.model.layers) == 4  # the teacher is untouched
    s_state = student.state_dict()
    for j, i in enumerate([0, 3]):
        for k, v in t_state.items():
            prefix = f"model.layers.{i}."
            if k.startswith(prefix):
                assert torch.equal(s_state[f"model.layers.{j}." + k[len(prefix) :]], v), k
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[k], t_state[k])
    assert [blk.self_attn.layer_idx for blk in student.model.layers] == [0, 1]
    assert all(p.requires_grad for p in student.parameters()) and student.training
    # the copy is independent of the teacher
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(
        llama4.model.layers[0].mlp.up_proj.weight, t_state["model.layers.0.mlp.up_proj.weight"]
    )
    assert model_outputs(student, _batch()).shape == (2, 6, 128)
    assert count_parameters(student) < count_parameters(llama4)


def test_layer_drop_on_an_encoder_classifier_keeps_the_head(tiny_bert):
    teacher = HFClassifier(tiny_bert, 3).eval()
    teacher.requires_grad_(False)  # as an OnlineTeacher leaves it
    info = DataInfo(num_classes=3)
    student = build_model("layer_drop", {"num_layers": 1}, info, teacher)
    assert isinstance(student, HFClassifier) and len(student.encoder.encoder.layer) == 1
    assert torch.equal(student.head.weight, teacher.head.weight)
    assert torch.equal(
        student.encoder.encoder.layer[0].attention.self.query.weight,
        teacher.encoder.encoder.layer[0].attention.self.query.weight,
    )
    assert all(p.requires_grad for p in student.parameters())
    assert model_outputs(student, _batch()).shape == (2, 3)


def test_choose_layers_variants_and_errors():
    assert choose_layers(30, layers=[0, 6, 12, 18, 24, 29]) == [0, 6, 12, 18, 24, 29]
    assert choose_layers(6, every=2) == [0, 2, 4]
    assert choose_layers(30, num_layers=6) == [0, 6, 12, 17, 23, 29]
    assert choose_layers(4, layers=[0, -1]) == [0, 3]
    with pytest.raises(ValueError, match="exactly one"):
        choose_layers(4)
    with pytest.raises(ValueError, match="layers 0..3"):
        choose_layers(4, layers=[0, 4])
    with pytest.raises(ValueError, match="distinct and increasing"):
        choose_layers(4, layers=[2, 1])


def test_shrink_builds_a_smaller_random_model(llama4, tiny_bert):
    s = build_model(
        "shrink", {"num_layers": 1, "hidden_size": 16, "intermediate_size": 32}, LM_INFO, llama4
    )
    assert s.config.num_hidden_layers == 1 and s.config.hidden_size == 16
    assert s.config.vocab_size == llama4.config.vocab_size
    assert model_outputs(s, _batch()).shape == (2, 6, 128)
    e = build_model("shrink", {"num_layers": 1}, DataInfo(task="embedding"), HFEmbedder(tiny_bert))
    assert isinstance(e, HFEmbedder) and e.config.num_hidden_layers == 1


def test_builders_needing_a_teacher_say_so():
    with pytest.raises(ValueError, match="needs a teacher"):
        build_model("layer_drop", {"every": 2}, LM_INFO, None)
    with pytest.raises(ValueError, match="has no parameter 'layer'.*Did you mean 'layers'"):
        build_model("layer_drop", {"layer": [0]}, LM_INFO, None)
    with pytest.raises(ValueError, match="model_type"):
        build_model("hf_config", {"config": {"hidden_size": 8}}, LM_INFO)


def test_hf_path_student_loads_a_saved_model(tmp_path, llama4):
    save_model(llama4, tmp_path / "mine", "hf_config", {"config": LLAMA}, LM_INFO)
    s = build_model(f"hf:{tmp_path / 'mine'}", {}, LM_INFO)
    assert s.training and all(p.requires_grad for p in s.parameters())
    b = _batch()
    torch.testing.assert_close(model_outputs(s.eval(), b), model_outputs(llama4, b))


def test_tfidf_mlp_learns_teacher_embeddings():
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(40)]
    texts = [
        " ".join(words[j] for j in torch.randint(0, 40, (12,), generator=g)) for _ in range(96)
    ]
    proj = torch.randn(40, 8, generator=g)

    def teacher_emb(ts):  # a bag-of-words "teacher": normalised random projection of counts
        counts = torch.zeros(len(ts), 40)
        for r, t in enumerate(ts):
            for w in t.split():
                counts[r, int(w[1:])] += 1
        return F.normalize(counts @ proj, dim=-1)

    data = TextDataset(texts, torch.zeros(96, dtype=torch.long), torch.arange(96))
    info = DataInfo(task="embedding")
    torch.manual_seed(0)
    s = build_model("tfidf_mlp", {"out_dim": 8, "hidden": [64], "min_df": 1}, info, data=data)
    target = teacher_emb(texts)
    opt = torch.optim.Adam(s.parameters(), lr=1e-2)
    cos0 = F.cosine_similarity(s(texts), target).mean().item()
    for _ in range(150):
        loss = (1 - F.cosine_similarity(s(texts), target)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cos = F.cosine_similarity(s(texts), target).mean().item()
    assert cos > 0.95 and cos > cos0 + 0.3
    with pytest.raises(ValueError, match="text data source"):
        build_model("tfidf_mlp", {"out_dim": 8}, info, data=None)


class _Tok:
    def __init__(self, vocab, eos="</s>"):
        self.vocab, self.eos_token = vocab, eos
        self.bos_token = self.unk_token = self.pad_token = None

    def get_vocab(self):
        return dict(self.vocab)


def test_vocabulary_checks():
    v = {f"t{i}": i for i in range(100)}
    assert check_vocab(_Tok(v), _Tok(v), 128, 128).trimmed is False
    with pytest.warns(UserWarning, match="trimmed to the common 120"):
        res = check_vocab(_Tok(v), _Tok(v), 128, 120)
    assert res.trimmed and res.size == 120
    other = {**v, "t5": 99, "t99": 5}
    with pytest.raises(VocabMismatchError, match="sequence-level"):
        check_vocab(_Tok(v), _Tok(other), 128, 128)
    with pytest.raises(VocabMismatchError, match="not both padded"):
        check_vocab(_Tok(v), _Tok(v), 128, 90)


def test_reconcile_trims_padded_logits(llama4):
    padded = build_model("hf_config", {"config": {**LLAMA, "vocab_size": 136}}, LM_INFO)
    with pytest.warns(UserWarning, match="padded vocabularies"):
        res = reconcile(padded, llama4)
    assert res.size == 128
    b = _batch()
    assert model_outputs(padded, b).shape[-1] == 128 == model_outputs(llama4, b).shape[-1]


def test_run_refuses_a_student_with_another_tokenizer(monkeypatch, llama4):
    from mentor import assembly as build
    from mentor.config import load_config
    from mentor.data import DataBundle
    from mentor.models import assets

    v = {f"t{i}": i for i in range(100)}
    toks = {"teacher-tok": _Tok(v), "/my/student": _Tok({**v, "t1": 7, "t7": 1})}
    monkeypatch.setattr(assets, "load_tokenizer", lambda spec: toks[spec])
    cfg = load_config(
        {
            "teacher": {"builder": "hf_causal_lm", "params": {"model": "teacher-tok"}},
            "student": {"builder": "hf:/my/student"},
            "objective": {"fkl": {"loss": "forward_kl"}},
        }
    )
    assert build.data_tokenizer(cfg) == "teacher-tok"
    assert build.student_tokenizer(cfg) == "/my/student"
    info = DataInfo(task="causal_lm", tokenizer="teacher-tok", vocab_size=100)
    bundle = DataBundle([], [], info)
    with pytest.raises(VocabMismatchError, match="sequence-level distillation"):
        build.check_student_vocab(cfg, bundle, llama4, copy.deepcopy(llama4))
    cfg.generation.mode = "on_policy"  # the student's samples are scored by the teacher
    with pytest.raises(VocabMismatchError, match="generation.mode=on_policy.*cross-tokenizer"):
        build.check_student_vocab(cfg, bundle, llama4, copy.deepcopy(llama4))
    # a student whose embedding table is smaller than the data's token ids is refused early
    small = build_model("hf_config", {"config": {**LLAMA, "vocab_size": 64}}, LM_INFO)
    cfg2 = load_config({"student": {"builder": "shrink"}, "objective": {"ce": {}}})
    with pytest.raises(ValueError, match="embeds 64 token ids"):
        build.check_student_vocab(cfg2, bundle, llama4, small)

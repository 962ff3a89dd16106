"""Structured pruning (Minitron width/depth, CNN channels) on tiny in-process models.

The central check: units whose weights are exactly dead are pruned and the outputs stay the
same (to 1e-5), which proves the slicing and the config updates; importance ranks the dead
units last; parameter counts drop by the hand-computed amount; pruned models reload.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mentor.data import DataInfo
from mentor.data.text import TokenBlocks
from mentor.models import model_outputs
from mentor.models.assets import quiet_hf
from mentor.models.hf import HFClassifier
from mentor.pruning.importance import (
    block_importance,
    block_importance_ppl,
    conv_channel_importance,
    filter_l1_importance,
    transformer_importance,
)
from mentor.pruning.structured import (
    count_params_at,
    load_pruned,
    prune_channels,
    prune_depth,
    prune_heads,
    prune_hidden,
    prune_mlp,
    prune_structured,
    restore_pruned_heads,
    width_prune_plan,
)
from mentor.students import build_model, load_model, save_model
from mentor.students.builders import count_parameters


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread (see conftest.one_thread)."""


LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
HD = 8  # head_dim = 32 / 4
LM_INFO = DataInfo(task="causal_lm", vocab_size=64)


def _llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tie)).eval()


def _bert_classifier():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return HFClassifier(BertModel(cfg), 3).eval()


def _batches(n: int = 2, b: int = 4, t: int = 12):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (b, t), generator=g)
        mask = torch.ones_like(ids)
        mask[0, t - 3 :] = 0  # one padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _same(a, b, batches):
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(model_outputs(a, x), model_outputs(b, x), atol=1e-5, rtol=0)


def _zero(t: torch.Tensor, idx, dim: int = 0) -> None:
    with torch.no_grad():
        t.index_fill_(dim, torch.as_tensor(idx), 0.0)


def _rows(heads, size=HD):
    return [h * size + k for h in heads for k in range(size)]


# ----------------------------------------------------------------------------- Llama width


def test_llama_dead_query_heads_prune_exactly_keeping_every_kv_head():
    m = _llama()
    for layer in m.model.layers:  # query heads 1 and 3 (one per KV group) write nothing
        _zero(layer.self_attn.o_proj.weight, _rows([1, 3]), dim=1)
    p = prune_heads(copy.deepcopy(m), 2)  # data-free choice: o_proj column norms
    _same(m, p, _batches())
    assert (p.config.num_attention_heads, p.config.num_key_value_heads, p.config.head_dim) == (
        2,
        2,
        HD,
    )
    attn = p.model.layers[0].self_attn
    assert attn.num_key_value_groups == 1 and attn.q_proj.weight.shape == (2 * HD, 32)
    torch.testing.assert_close(
        attn.q_proj.weight, m.model.layers[0].self_attn.q_proj.weight[_rows([0, 2])]
    )
    # q rows and o columns of 2 heads x 8 dims x 32 hidden, in 4 layers; k/v untouched
    assert count_parameters(m) - count_parameters(p) == 4 * 2 * (2 * HD * 32)


def test_llama_dead_kv_group_is_ranked_last_and_pruned_whole():
    m = _llama()
    for layer in m.model.layers:  # KV head 1 has zero values: query heads 2, 3 output 0
        _zero(layer.self_attn.v_proj.weight, _rows([1]))
    imp = transformer_importance(m, _batches())
    for h in imp.heads:
        assert torch.equal(h[2:], torch.zeros(2)) and (h[:2] > 0).all()
    p = prune_structured(copy.deepcopy(m), imp, heads=2, gqa="groups")
    _same(m, p, _batches())
    assert (p.config.num_attention_heads, p.config.num_key_value_heads) == (2, 1)
    assert p.model.layers[3].self_attn.num_key_value_groups == 2
    # per layer: q 2 heads + k 1 + v 1 + o 2 heads, each 8 x 32
    assert count_parameters(m) - count_parameters(p) == 4 * (2 + 1 + 1 + 2) * HD * 32
    # gqa="queries" would keep both KV heads: the best query head of each group
    q = prune_structured(copy.deepcopy(m), imp, heads=2, gqa="queries")
    assert q.config.num_key_value_heads == 2


def test_llama_dead_mlp_channels_are_ranked_last_and_pruned_exactly():
    m = _llama()
    dead = [list(range(i, 64, 4)) for i in range(4)]  # 16 dead channels, different per layer
    for layer, d in zip(m.model.layers, dead):
        _zero(layer.mlp.up_proj.weight, d)  # act(gate) * 0 = 0 enters down_proj
    imp = transformer_importance(m, _batches())
    for s, d in zip(imp.intermediate, dead):
        assert (
            torch.equal(s[d], torch.zeros(16))
            and (s[[j for j in range(64) if j not in d]] > 0).all()
        )
    p = prune_mlp(copy.deepcopy(m), 48, imp)
    _same(m, p, _batches())
    assert p.config.intermediate_size == 48
    keep1 = [j for j in range(64) if j not in dead[1]]
    torch.testing.assert_close(
        p.model.layers[1].mlp.down_proj.weight, m.model.layers[1].mlp.down_proj.weight[:, keep1]
    )
    assert count_parameters(m) - count_parameters(p) == 4 * 16 * 32 * 3  # gate, up, down


def test_llama_dead_hidden_channels_with_tied_embeddings_prune_exactly():
    m = _llama(tie=True)
    dead = [3, 7, 11, 19, 20, 25, 30, 31]
    _zero(m.model.embed_tokens.weight, dead, dim=1)  # the residual stream never holds them
    for layer in m.model.layers:
        _zero(layer.self_attn.o_proj.weight, dead)
        _zero(layer.mlp.down_proj.weight, dead)
    imp = transformer_importance(m, _batches())
    assert torch.equal(imp.hidden[dead], torch.zeros(8))
    assert (imp.hidden[[c for c in range(32) if c not in dead]] > 0).all()
    p = prune_hidden(copy.deepcopy(m), 24, imp)
    _same(m, p, _batches())
    assert p.config.hidden_size == 24 and p.lm_head.weight is p.model.embed_tokens.weight
    assert p.config.rms_norm_eps == pytest.approx(m.config.rms_norm_eps * 32 / 24)
    # per layer: q/k/v inputs (32+16+16) x 8, o rows 8 x 32, gate/up inputs 2 x 64 x 8,
    # down rows 64 x 8, two norms 2 x 8; plus embeddings (tied) 64 x 8 and the final norm 8
    per_layer = (32 + 16 + 16) * 8 + 8 * 32 + 2 * 64 * 8 + 64 * 8 + 2 * 8
    assert count_parameters(m) - count_parameters(p) == 4 * per_layer + 64 * 8 + 8
    # without the RMSNorm compensation the same cut changes the function
    raw = prune_hidden(copy.deepcopy(m), 24, imp, norm_compensation=False)
    x = _batches(1)[0]
    assert not torch.allclose(model_outputs(raw, x), model_outputs(m, x), atol=1e-3)


def test_head_importance_is_the_l2_over_tokens_mean_over_batch_of_head_output_norms():
    m = _llama()
    batches = _batches()
    seen = []
    h = m.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().clone())
    )
    imp = transformer_importance(m, batches)
    h.remove()
    per = []
    for a, b in zip(seen, batches):
        norms = a.reshape(4, 12, 4, HD).norm(dim=-1)  # [B, T, H]
        per.append((norms.pow(2) * b["attention_mask"][..., None]).sum(1).sqrt())
    torch.testing.assert_close(imp.heads[1], torch.cat(per).mean(0))
    assert imp.samples == 8
    l2 = transformer_importance(m, batches, batch_agg="l2", seq_agg="mean")
    assert not torch.allclose(l2.heads[1], imp.heads[1])


def test_importance_restores_modes_and_removes_hooks():
    m = _llama().train()
    m.model.layers[0].eval()
    before = {n: x.training for n, x in m.named_modules()}
    transformer_importance(m, _batches(1))
    block_importance(m, _batches(1))
    assert {n: x.training for n, x in m.named_modules()} == before
    assert all(
        not x._forward_hooks and not x._forward_pre_hooks for x in m.modules()
    )  # hooks removed


# ----------------------------------------------------------------------------- depth


def test_identity_block_is_ranked_last_and_depth_prune_is_exact():
    m = _llama()
    blk = m.model.layers[2]  # writes nothing to the residual stream: output == input
    _zero(blk.self_attn.o_proj.weight, list(range(32)))
    _zero(blk.mlp.down_proj.weight, list(range(32)))
    imp = transformer_importance(m, _batches())
    bi = block_importance(m, _batches())
    torch.testing.assert_close(bi, imp.blocks)
    assert bi[2] < 1e-6 and (bi[[0, 1, 3]] > 1e-3).all()
    ppl = block_importance_ppl(m, _batches())
    assert abs(float(ppl[2])) < 1e-3 and ppl.abs()[[0, 1, 3]].min() > abs(float(ppl[2]))
    p = prune_structured(copy.deepcopy(m), imp, layers=3)
    _same(m, p, _batches())
    assert p.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in p.model.layers] == [0, 1, 2]
    assert p.model.layers[2] is not None and torch.equal(
        p.model.layers[2].mlp.up_proj.weight, m.model.layers[3].mlp.up_proj.weight
    )


# ----------------------------------------------------------------------------- round trips


def test_llama_combined_prune_round_trips_through_save_pretrained_and_mentor(tmp_path):
    from transformers import LlamaForCausalLM

    m = _llama()
    imp = transformer_importance(m, _batches())
    p = prune_structured(copy.deepcopy(m), imp, heads=2, intermediate=0.5, hidden=24, layers=3)
    c = p.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 2, HD)
    assert (c.intermediate_size, c.hidden_size, c.num_hidden_layers) == (32, 24, 3)
    # 24*64 embeddings + 64*24 lm_head + 24 final norm; per layer q,o 24x16, k,v 24x16,
    # gate/up/down 3 x 24 x 32, two norms 2 x 24
    per_layer = 4 * 24 * 16 + 3 * 24 * 32 + 2 * 24
    assert count_parameters(p) == 2 * 64 * 24 + 24 + 3 * per_layer
    assert count_params_at(m, hidden=24, intermediate=32, heads=2) == (
        count_parameters(p) + per_layer
    )
    x = _batches(1)[0]
    ref = model_outputs(p, x)
    with quiet_hf():
        p.save_pretrained(tmp_path / "hf")
        q = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(model_outputs(q, x), ref, atol=0, rtol=0)
    save_model(p, tmp_path / "mentor", "hf_config", {"config": LLAMA}, LM_INFO)
    r, _ = load_model(tmp_path / "mentor")
    torch.testing.assert_close(model_outputs(r, x), ref, atol=0, rtol=0)


def test_width_prune_plan_reaches_about_the_target():
    m = _llama()
    plan = width_prune_plan(m, 0.6)
    # untied: 2 x 64 x D + D + 4 x (96 D + 3 D I + 2 D) = 521 D + 12 D I; full (32, 64) has
    # 41248; hidden steps of lcm(4 heads, 8) = 8: (16, 32) -> 14480, (24, 48) -> 26328, the
    # closest to 0.6 x 41248 = 24749
    assert plan == {"hidden": 24, "intermediate": 48}
    n = count_params_at(m, hidden=plan["hidden"], intermediate=plan["intermediate"])
    assert count_parameters(m) == 41248 and n == 26328
    p = prune_structured(copy.deepcopy(m), None, **plan)
    assert count_parameters(p) == n


def test_qwen3_and_gemma_follow_their_config_rules(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = dict(LLAMA, head_dim=HD, num_hidden_layers=2)
    torch.manual_seed(0)
    qwen = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **dims)).eval()
    assert len(qwen.config.layer_types) == 2  # per-layer list that depth pruning must cut
    imp = transformer_importance(qwen, _batches(1))
    p = prune_structured(qwen, imp, heads=2, intermediate=32, hidden=24, layers=[1])
    assert p.config.layer_types == ["full_attention"] and p.config.hidden_size == 24
    x = _batches(1)[0]
    with quiet_hf():
        p.save_pretrained(tmp_path / "q")
        q = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    torch.testing.assert_close(model_outputs(q, x), model_outputs(p, x), atol=0, rtol=0)
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma", **dims)).eval()
    with pytest.raises(ValueError, match="hidden: GemmaForCausalLM's norms are not plain"):
        prune_hidden(gemma, 24)
    assert prune_mlp(gemma, 32).config.intermediate_size == 32  # other axes still work


# ----------------------------------------------------------------------------- BERT


def _dead_bert():
    m = _bert_classifier()
    for i, head in ((0, 2), (1, 0)):  # one dead head per layer: zero values (and bias)
        sa = m.encoder.encoder.layer[i].attention.self
        _zero(sa.value.weight, _rows([head]))
        _zero(sa.value.bias, _rows([head]))
    dead = [list(range(0, 64, 4)), list(range(1, 64, 4))]
    for layer, d in zip(m.encoder.encoder.layer, dead):  # gelu(0) = 0 enters output.dense
        _zero(layer.intermediate.dense.weight, d)
        _zero(layer.intermediate.dense.bias, d)
    return m, dead


def test_bert_dead_heads_and_channels_are_ranked_last_and_pruned_exactly():
    m, dead = _dead_bert()
    imp = transformer_importance(m, _batches())
    assert imp.arch == "bert" and imp.heads[0][2] == 0 and imp.heads[1][0] == 0
    assert int(imp.heads[0].argmin()) == 2 and (imp.heads[0][[0, 1, 3]] > 0).all()
    for s, d in zip(imp.intermediate, dead):
        assert torch.equal(s[d], torch.zeros(16))
    p = prune_structured(copy.deepcopy(m), imp, heads=3, intermediate=48)
    _same(m, p, _batches())
    assert p.config.pruned_heads == {0: [2], 1: [0]} and p.config.intermediate_size == 48
    # per layer: q, k, v rows (8 x 32 + 8 bias each) and output.dense columns (32 x 8);
    # intermediate rows (16 x 32 + 16 bias) and output columns (32 x 16)
    per_layer = 3 * (8 * 32 + 8) + 32 * 8 + (16 * 32 + 16) + 32 * 16
    assert count_parameters(m) - count_parameters(p) == 2 * per_layer


def test_bert_head_pruned_encoder_reloads_with_restore_pruned_heads(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    m, _ = _dead_bert()
    p = prune_heads(copy.deepcopy(m), [[0, 1, 3], [1, 2, 3]])
    p = prune_depth(p, [1])  # layer 1 becomes layer 0: its pruned_heads key moves
    assert p.config.pruned_heads == {0: [0]} and p.config.num_hidden_layers == 1
    x = _batches(1)[0]
    ref = model_outputs(p, x)
    with quiet_hf():
        p.encoder.save_pretrained(tmp_path / "enc")
    enc = load_pruned(str(tmp_path / "enc"))
    assert enc.encoder.layer[0].attention.self.query.weight.shape == (24, 32)
    torch.testing.assert_close(enc(**x).last_hidden_state, p.encoder(**x).last_hidden_state)
    # mentor's adapter folder: config + adapter state; rebuild, restore, load
    save_model(p, tmp_path / "clf", "hf_classifier", {}, DataInfo(num_classes=3))
    cfg = AutoConfig.from_pretrained(tmp_path / "clf")
    assert {int(k): v for k, v in cfg.pruned_heads.items()} == {0: [0]}
    enc2 = restore_pruned_heads(AutoModel.from_config(cfg))
    clf = HFClassifier(enc2, 3)
    clf.load_state_dict(load_file(str(tmp_path / "clf" / "model.safetensors")))
    torch.testing.assert_close(model_outputs(clf.eval(), x), ref, atol=0, rtol=0)
    # mentor's own load_model re-applies the pruned heads before loading the weights
    back, _ = load_model(tmp_path / "clf")
    torch.testing.assert_close(model_outputs(back, x), ref, atol=0, rtol=0)


def test_bert_mlp_and_depth_prune_round_trip_through_mentor_save_load(tmp_path):
    m, _ = _dead_bert()
    p = prune_structured(copy.deepcopy(m), None, intermediate=0.75, layers=[0])
    assert p.config.intermediate_size == 48 and p.config.num_hidden_layers == 1
    x = _batches(1)[0]
    save_model(p, tmp_path / "clf", "hf_classifier", {}, DataInfo(num_classes=3))
    r, _ = load_model(tmp_path / "clf")
    torch.testing.assert_close(model_outputs(r, x), model_outputs(p, x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- CNN


def test_cnn_dead_channels_prune_exactly_and_rebuild_with_the_cnn_builder():
    info = DataInfo(input_shape=(1, 8, 8), num_classes=3)
    torch.manual_seed(0)
    seq = build_model("cnn", {"channels": [8, 16], "hidden": 16}, info).eval()
    convs = [m for m in seq if isinstance(m, nn.Conv2d)]
    dead = [[1, 5], [0, 3, 4, 9, 10, 12, 13, 15]]
    for c, d in zip(convs, dead):
        _zero(c.weight, d)
        _zero(c.bias, d)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    imp = conv_channel_importance(seq, [{"inputs": x[:3]}, x[3:]])
    l1 = filter_l1_importance(seq)
    for s, w, d in zip(imp, l1, dead):
        assert torch.equal(s[d], torch.zeros(len(d))) and torch.equal(w[d], torch.zeros(len(d)))
    new, channels = prune_channels(seq, [6, 8], imp)
    assert channels == [6, 8]
    with torch.no_grad():
        torch.testing.assert_close(new(x), seq(x), atol=1e-5, rtol=0)
    assert convs[0].out_channels == 8  # the original is untouched
    rebuilt = build_model("cnn", {"channels": channels, "hidden": 16}, info)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in new.state_dict().items()
    }
    rebuilt.load_state_dict(new.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), seq(x), atol=1e-5, rtol=0)
    # conv1 in 8->6 (x16x9), out 16->8 (x6x9 +8 bias); Linear: 8 channels x 2x2 inputs x 16
    drop = (2 * 1 * 9 + 2) + (16 * 8 * 9 - 8 * 6 * 9 + 8) + 8 * 4 * 16
    assert count_parameters(seq) - count_parameters(new) == drop
    half, ch = prune_channels(seq, 0.5)  # data-free (filter L1) with a fraction
    assert ch == [4, 8] and half(x).shape == (6, 3)


# ----------------------------------------------------------------------------- errors


def test_bad_settings_raise_errors_naming_the_setting():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = _llama()
    with pytest.raises(ValueError, match="heads=5: the model has 4 attention heads"):
        prune_heads(m, 5)
    with pytest.raises(ValueError, match="heads=0: must keep at least one"):
        prune_heads(m, 0)
    with pytest.raises(ValueError, match=r"heads=1.5: a fraction kept must be in \(0, 1\]"):
        prune_structured(m, heads=1.5)
    with pytest.raises(ValueError, match=r"intermediate=0.0: a fraction kept"):
        prune_mlp(m, 0.0)
    with pytest.raises(ValueError, match="intermediate=128 is larger than the current"):
        prune_mlp(m, 128)
    with pytest.raises(ValueError, match="hidden=40 is larger than the current hidden_size=32"):
        prune_hidden(m, 40)
    with pytest.raises(ValueError, match=r"layers: block indices \[4\] are out of range 0..3"):
        prune_depth(m, [0, 4])
    with pytest.raises(ValueError, match=r"layers: block indices \[1, 1\] are duplicated"):
        prune_structured(m, layers=[1, 1])
    with pytest.raises(ValueError, match="layers=2: a count needs importance"):
        prune_structured(m, layers=2)
    with pytest.raises(ValueError, match="heads=3: with gqa='queries'.*multiple of 2"):
        prune_heads(m, 3)
    with pytest.raises(ValueError, match="gqa='bogus'"):
        prune_heads(m, 2, gqa="bogus")
    with pytest.raises(ValueError, match="heads: layer 0 keeps query heads .* same number"):
        prune_heads(m, [[0, 1, 2]] * 4)
    with pytest.raises(ValueError, match="hidden: the pruned model's config .* LlamaConfig"):
        prune_hidden(m, 30)  # 30 is not a multiple of the 4 heads
    assert m.config.hidden_size == 32 and count_parameters(m) == count_params_at(m)  # untouched
    with pytest.raises(ValueError, match="does not support GPT2LMHeadModel; supported"):
        prune_structured(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), heads=1)
    with pytest.raises(ValueError, match="does not support Linear"):
        prune_heads(nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="hidden: hidden-size pruning supports Llama"):
        prune_structured(_bert_classifier(), hidden=16)
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(ValueError, match=r"channels=1.2: a fraction kept must be in \(0, 1\]"):
        prune_channels(seq, 1.2)
    with pytest.raises(ValueError, match=r"channels\[0\]=5: the model has 4 channels"):
        prune_channels(seq, [5])
    with pytest.raises(ValueError, match="channels=2: give a fraction kept"):
        prune_channels(seq, 2)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- layer_drop


def test_layer_drop_auto_keeps_the_blocks_of_highest_importance():
    teacher = _llama()
    blk = teacher.model.layers[1]  # an identity block: the one to drop
    _zero(blk.self_attn.o_proj.weight, list(range(32)))
    _zero(blk.mlp.down_proj.weight, list(range(32)))
    g = torch.Generator().manual_seed(3)
    data = TokenBlocks(torch.randint(0, 64, (10, 12), generator=g), torch.arange(10))
    params = {"layers": "auto", "num_layers": 3, "calibration_batches": 2}
    student = build_model("layer_drop", params, LM_INFO, teacher, data=data)
    assert student.config.num_hidden_layers == 3 and student.training
    for j, i in enumerate([0, 2, 3]):
        assert torch.equal(
            student.model.layers[j].mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight
        )
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1, 2]
    with pytest.raises(ValueError, match="layers: auto needs num_layers"):
        build_model("layer_drop", {"layers": "auto"}, LM_INFO, teacher, data=data)
    with pytest.raises(ValueError, match="layers: auto scores .* no data"):
        build_model("layer_drop", {"layers": "auto", "num_layers": 2}, LM_INFO, teacher)
    with pytest.raises(ValueError, match="calibration_batches=0"):
        build_model("layer_drop", {**params, "calibration_batches": 0}, LM_INFO, teacher, data=data)
    with pytest.raises(ValueError, match="layers='best'"):
        build_model("layer_drop", {"layers": "best"}, LM_INFO, teacher, data=data)

"""Sparse masks: selection, calibration norms, magnitude/Wanda/N:M masks, MaskSet, AST."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mentor.pruning import ASTSchedule, MaskSet, calibration_norms, compute_masks, prunable
from mentor.pruning.masks import n_pruned, parse_pattern


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


def _fwd(m, b):
    return m(b)


def _hf_fwd(m, b):
    return m(**b).logits


def _lm_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 64, (2, 10), generator=g),
            "attention_mask": torch.ones(2, 10),
        }
        for _ in range(n)
    ]


# ------------------------------------------------------------------------------ selection


def test_prunable_selects_linear_by_name():
    lm = _llama()
    names = list(prunable(lm))
    assert "lm_head" not in names
    assert "model.layers.0.self_attn.q_proj" in names
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    mlp_only = prunable(lm, include=["mlp"])
    assert set(mlp_only) == {n for n in names if ".mlp." in n}
    assert "lm_head" in prunable(lm, exclude=None)
    assert list(prunable(lm, exclude="proj")) == ["lm_head"]  # replaces the defaults
    seq = _mlp()
    assert list(prunable(seq)) == ["0", "2", "4"]  # by name only: the last Linear is kept
    with pytest.raises(ValueError, match="exclude"):
        prunable(seq, exclude=[1, 2])


# --------------------------------------------------------------------------- calibration


def test_calibration_norms_match_direct_computation_and_restore_modes():
    net = _mlp()
    net.train()
    net[1].eval()  # a mixed state must come back exactly
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 12, generator=g) for _ in range(3)]
    norms = calibration_norms(net, batches, _fwd, prunable(net))
    x = torch.cat(batches)
    h1 = F.relu(net[0](x))
    h2 = F.relu(net[2](h1))
    torch.testing.assert_close(norms["0"], x.norm(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms["2"], h1.detach().norm(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms["4"], h2.detach().norm(dim=0), rtol=1e-5, atol=1e-6)
    assert norms["0"].dtype == torch.float32 and norms["0"].shape == (12,)
    assert net.training and net[0].training and not net[1].training
    assert all(p.grad is None for p in net.parameters())


def test_calibration_norms_conv2d_are_per_unfolded_column():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1, stride=2)
    model = nn.Sequential(conv)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 3, 7, 7, generator=g) for _ in range(2)]
    norms = calibration_norms(model, batches, _fwd, {"0": conv})
    cols = torch.cat([F.unfold(b, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
                      for b in batches])  # fmt: skip
    torch.testing.assert_close(norms["0"], cols.norm(dim=0), rtol=1e-5, atol=1e-6)
    masks = compute_masks({"0": conv}, "wanda", 0.5, norms=norms)
    assert masks["0"].shape == conv.weight.shape
    assert (masks["0"].reshape(4, -1).sum(1) == 27 - n_pruned(27, 0.5)).all()
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped Conv2d"):
        calibration_norms(grouped, [torch.randn(1, 4, 5, 5)], _fwd, prunable(grouped))


def test_calibration_norms_on_a_tiny_llama_with_dict_batches():
    lm = _llama()
    mods = prunable(lm)
    norms = calibration_norms(lm, _lm_batches(), _hf_fwd, mods)
    assert set(norms) == set(mods)
    assert norms["model.layers.0.mlp.down_proj"].shape == (64,)
    assert norms["model.layers.1.self_attn.o_proj"].shape == (32,)
    assert all(bool((v > 0).all()) for v in norms.values())


def test_calibration_errors():
    net = _mlp()
    with pytest.raises(ValueError, match="batches is empty"):
        calibration_norms(net, [], _fwd, prunable(net))
    with pytest.raises(ValueError, match=r"\['2'\] never ran"):
        calibration_norms(net, [torch.randn(2, 12)], lambda m, b: m[0](b), {"2": net[2]})


# --------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_magnitude_prunes_exactly_the_requested_fraction_per_layer(sparsity):
    net = _mlp()
    masks = compute_masks(prunable(net), "magnitude", sparsity)
    for name, mod in prunable(net).items():
        m, w = masks[name], mod.weight.detach()
        assert m.dtype == torch.bool and m.shape == w.shape
        k = math.floor(sparsity * w.numel() + 0.5)
        assert int((~m).sum()) == k == n_pruned(w.numel(), sparsity)
        if 0 < k < w.numel():  # a layer-wise threshold: every kept |w| >= every pruned |w|
            assert float(w.abs()[m].min()) >= float(w.abs()[~m].max())


def test_rounding_is_half_up_and_ties_are_broken_by_position():
    assert n_pruned(10, 0.25) == 3  # 2.5 -> 3
    assert n_pruned(10, 0.7) == 7  # 7.000000000000001 stays 7
    assert n_pruned(3, 0.5) == 2
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    m = compute_masks({"l": lin}, "magnitude", 0.5)["l"]
    assert m.tolist() == [[False, False, True, True]]


def test_wanda_matches_hand_computed_scores_on_a_2x4_example():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]]))
    norms = {"l": torch.tensor([4.0, 1.0, 1.0, 0.1])}
    # scores |W|·‖X‖: row 0 [4, 2, 3, 0.4] -> keep cols 0, 2; row 1 [16, 3, 2, 0.1] -> cols 0, 1
    wanda = compute_masks({"l": lin}, "wanda", 0.5, norms=norms)["l"]
    assert wanda.tolist() == [[True, False, True, False], [True, True, False, False]]
    # magnitude (layer-wise): |W| = [1 2 3 4 | 4 3 2 1] keeps the four largest: 3, 4, 4, 3
    mag = compute_masks({"l": lin}, "magnitude", 0.5)["l"]
    assert mag.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert not torch.equal(wanda, mag)
    # uniform norms: Wanda = per-row magnitude
    flat = compute_masks({"l": lin}, "wanda", 0.5, norms={"l": torch.ones(4)})["l"]
    assert flat.tolist() == [[False, False, True, True], [True, True, False, False]]
    # 2:4 on the same scores: one group of 4 per row, keep the top 2
    nm = compute_masks({"l": lin}, "wanda", None, "2:4", norms=norms)["l"]
    assert torch.equal(nm, wanda)


def test_wanda_differs_from_magnitude_when_input_norms_are_not_uniform():
    net = _mlp()
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-2, 1, 12)
    batches = [torch.randn(16, 12, generator=g) * scale for _ in range(2)]
    mods = prunable(net)
    norms = calibration_norms(net, batches, _fwd, mods)
    wanda = compute_masks(mods, "wanda", 0.5, norms=norms)
    mag = compute_masks(mods, "magnitude", 0.5)
    assert not torch.equal(wanda["0"], mag["0"])
    # first layer: large-norm inputs keep more weights under Wanda
    assert int(wanda["0"][:, -3:].sum()) > int(mag["0"][:, -3:].sum())
    for name, mod in mods.items():  # Wanda: every row prunes the same count
        cols = mod.weight.shape[1]
        assert (wanda[name].sum(1) == cols - n_pruned(cols, 0.5)).all()


def test_two_four_pattern_holds_in_every_group():
    lm = _llama()
    mods = prunable(lm)
    norms = calibration_norms(lm, _lm_batches(), _hf_fwd, mods)
    for method in ("magnitude", "wanda"):
        masks = compute_masks(mods, method, None, "2:4", norms=norms)
        for name, m in masks.items():
            groups = m.reshape(m.shape[0], -1, 4).sum(-1)
            assert (groups == 2).all(), name
    ms = MaskSet.compute(mods, "wanda", 0.5, "2:4", norms=norms)
    assert ms.pattern == "2:4"
    assert not ms.check_nm(lm, 2, 4)  # still dense
    ms.apply(lm)
    assert ms.check_nm(lm, 2, 4, strict=True)
    assert ms.sparsity(lm)["sparsity"] == pytest.approx(0.5)
    out = lm(**_lm_batches(1)[0]).logits
    assert torch.isfinite(out).all()
    with torch.no_grad():
        lm.model.layers[0].mlp.up_proj.weight[3, :4] = 1.0
    assert not ms.check_nm(lm, 2, 4)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.*row 3, group 0.*4 nonzeros"):
        ms.check_nm(lm, 2, 4, strict=True)


def test_other_n_m_patterns():
    net = _mlp()
    masks = compute_masks({"2": net[2]}, "magnitude", None, "1:4")
    assert (masks["2"].reshape(8, -1, 4).sum(-1) == 1).all()
    assert parse_pattern("4:8") == (4, 8) and parse_pattern((2, 4)) == (2, 4)
    assert parse_pattern("unstructured") is None and parse_pattern(None) is None


# ------------------------------------------------------------------------- bad settings


def test_bad_settings_raise_errors_that_name_the_setting():
    net = _mlp()
    mods = prunable(net)
    for bad in (1.0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="sparsity must be a number in"):
            compute_masks(mods, "magnitude", bad)
    with pytest.raises(ValueError, match="sparsity is required"):
        compute_masks(mods, "magnitude")
    for bad in ("2-4", "4:2", "0:4", "2:2", "abc", (2, 4, 8)):
        with pytest.raises(ValueError, match="pattern must be"):
            compute_masks(mods, "magnitude", None, bad)
    with pytest.raises(ValueError, match=r"sparsity=0.3 contradicts pattern '2:4'"):
        compute_masks(mods, "magnitude", 0.3, "2:4")
    odd = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"pattern '2:4': module '0' has weight shape \(3, 6\)"):
        compute_masks(prunable(odd), "magnitude", None, "2:4")
    with pytest.raises(ValueError, match=r"method='wanda' needs norms for module '0'"):
        compute_masks(mods, "wanda", 0.5)
    with pytest.raises(ValueError, match=r"method='wanda' needs norms for module '2'"):
        compute_masks(mods, "wanda", 0.5, norms={"0": torch.ones(12)})
    with pytest.raises(ValueError, match=r"norms for module '0' have 5 features"):
        compute_masks(mods, "wanda", 0.5, norms={"0": torch.ones(5)})
    with pytest.raises(ValueError, match="method must be one of"):
        compute_masks(mods, "random", 0.5)
    with pytest.raises(ValueError, match="modules must be a mapping"):
        compute_masks([net[0]], "magnitude", 0.5)


# ------------------------------------------------------------------------------- MaskSet


def _train(net, masks, steps, seed, hooks=False, lr=0.05):
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.1)
    handles = masks.attach_grad_hooks(net) if hooks else []
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=g)
        loss = net(x).pow(2).mean() + (net(x) - 1).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.enforce(net)
    for h in handles:
        h.remove()
    return opt


def _assert_zero_where_pruned(net, masks):
    for name in masks:
        w = net.get_submodule(name).weight.detach()
        pruned = ~masks[name]
        assert pruned.any()
        assert (w[pruned] == 0).all() and not torch.signbit(w[pruned]).any()  # exactly +0.0


def test_masked_weights_stay_exactly_zero_through_adamw_and_a_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    net = _mlp()
    masks = MaskSet.compute(prunable(net), "magnitude", 0.7)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    masks.apply(net)
    _train(net, masks, steps=6, seed=1)
    _assert_zero_where_pruned(net, masks)
    kept_moved = any(
        not torch.equal(net.get_submodule(n).weight[masks[n]], before[f"{n}.weight"][masks[n]])
        for n in masks
    )
    assert kept_moved  # training did happen

    # checkpoint: masks to safetensors, restored exactly into a fresh MaskSet
    state = masks.state_dict()
    assert set(state) == {"mask.0", "mask.2", "mask.4"}
    assert all(t.dtype == torch.bool for t in state.values())
    save_file(state, str(tmp_path / "masks.safetensors"))
    fresh = MaskSet()
    fresh.load_state_dict(load_file(str(tmp_path / "masks.safetensors")), model=net)
    for n in masks:
        assert torch.equal(fresh[n], masks[n])
    resumed = copy.deepcopy(net)
    _train(resumed, fresh, steps=5, seed=2)
    _assert_zero_where_pruned(resumed, fresh)
    assert fresh.sparsity(resumed)["nonzero"] == sum(int(m.sum()) for m in fresh.masks.values())


def test_without_enforce_adamw_would_revive_pruned_weights():
    net = _mlp()
    masks = MaskSet.compute(prunable(net), "magnitude", 0.7)
    masks.apply(net)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    loss = net(torch.randn(8, 12)).pow(2).mean()
    loss.backward()
    opt.step()
    assert any(bool((net.get_submodule(n).weight[~masks[n]] != 0).any()) for n in masks)


def test_grad_hooks_keep_adam_moments_of_pruned_weights_at_zero():
    net = _mlp()
    masks = MaskSet.compute(prunable(net), "magnitude", 0.6)
    masks.apply(net)
    opt = _train(net, masks, steps=4, seed=3, hooks=True)
    for n in masks:
        w = net.get_submodule(n).weight
        st = opt.state[w]
        assert (st["exp_avg"][~masks[n]] == 0).all()
        assert (st["exp_avg_sq"][~masks[n]] == 0).all()
    _assert_zero_where_pruned(net, masks)
    # hooks were removed: gradients flow to every entry again
    net(torch.randn(4, 12)).sum().backward()
    assert bool((net[0].weight.grad[~masks["0"]] != 0).any())


def test_sparsity_report_and_from_zeros():
    net = _mlp()
    masks = MaskSet.compute(prunable(net), "magnitude", 0.5)
    masks.apply(net)
    rep = masks.sparsity(net)
    assert rep["total"] == 12 * 16 + 16 * 8 + 8 * 4
    assert rep["nonzero"] == sum(int(m.sum()) for m in masks.masks.values())
    assert rep["modules"]["0"] == {"nonzero": 96, "total": 192, "sparsity": 0.5}
    assert rep["sparsity"] == pytest.approx(1 - rep["nonzero"] / rep["total"])
    again = MaskSet.from_zeros(net, prunable(net))
    assert again.names() == ["0", "2", "4"]
    for n in masks:
        assert torch.equal(again[n], masks[n])
    assert MaskSet.from_zeros(net, ["2"]).names() == ["2"]
    assert MaskSet.from_zeros(net).names() == ["0", "2", "4"]


def test_loading_a_mask_of_another_shape_names_the_module_and_both_shapes():
    net = _mlp()
    masks = MaskSet.compute(prunable(net), "magnitude", 0.5)
    state = masks.state_dict()
    state["mask.2"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"module '2'.*shape \(3, 3\).*shape \(8, 16\)"):
        masks.load_state_dict(state)
    fresh = MaskSet()
    with pytest.raises(
        ValueError, match=r"module '2' has shape \(3, 3\).*weight has shape \(8, 16\)"
    ):
        fresh.load_state_dict(state, model=net)
    fresh.load_state_dict(state)  # without a model the shapes are checked when applied
    with pytest.raises(
        ValueError, match=r"module '2' has shape \(3, 3\).*weight has shape \(8, 16\)"
    ):
        fresh.apply(net)
    with pytest.raises(ValueError, match="unexpected key 'weight.2'"):
        MaskSet().load_state_dict({"weight.2": torch.ones(8, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be bool"):
        MaskSet().load_state_dict({"mask.2": torch.full((8, 16), 0.5)})
    with pytest.raises(ValueError, match=r"missing \['4'\]"):
        masks.load_state_dict({k: v for k, v in masks.state_dict().items() if k != "mask.4"})
    with pytest.raises(ValueError, match="no such submodule"):
        MaskSet({"nope": torch.ones(2, 2, dtype=torch.bool)}).apply(net)
    assert MaskSet({"2": torch.ones(8, 16)}).masks["2"].dtype == torch.bool  # 0/1 floats accepted


# ------------------------------------------------------------------------------------ AST


def test_update_from_weights_counts_flips_and_keeps_counts():
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1.0, 17.0).reshape(2, 8))
    model = nn.Sequential(lin)
    ms = MaskSet.compute({"0": lin}, "magnitude", None, "2:4")
    assert ms.update_from_weights(model) == 0
    with torch.no_grad():
        lin.weight[0, 0] = 100.0  # a pruned weight grows: it swaps with the smaller kept one
    assert ms.update_from_weights(model) == 2
    assert ms["0"][0, :4].tolist() == [True, False, False, True]
    # unstructured, sparsity=None: the module keeps its own count
    un = MaskSet.compute({"0": lin}, "magnitude", 0.75)
    kept = int(un["0"].sum())
    with torch.no_grad():
        lin.weight[1, 0] = 200.0
    assert un.update_from_weights(model) == 2
    assert int(un["0"].sum()) == kept and bool(un["0"][1, 0])


def test_decay_masked_shrinks_only_pruned_weights():
    net = _mlp()
    ms = MaskSet.compute(prunable(net), "magnitude", 0.5)
    w0 = net[0].weight.detach().clone()
    ms.decay_masked(net, 0.25)
    m = ms["0"]
    torch.testing.assert_close(net[0].weight[~m], w0[~m] * 0.75)
    assert torch.equal(net[0].weight[m], w0[m])
    ms.decay_masked(net, 1.0)
    _assert_zero_where_pruned(net, ms)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="strength must be"):
            ms.decay_masked(net, bad)


def test_ast_schedule_trains_to_a_hard_two_four_mask():
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    torch.manual_seed(0)
    ast = ASTSchedule(total_steps=30, pattern="2:4", update_every=3, max_decay=0.2)
    assert ast.ramp_steps == 15 and ast.harden_at == 27
    assert ast.decay(0) == 0 and ast.decay(15) == pytest.approx(0.2) and ast.decay(30) == 0.2
    mods = prunable(net, exclude=["4"])  # 8 inputs: 2:4 fits; keep the output layer dense
    masks = ast.init_masks(net, mods)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    flips, infos = 0, []
    for step in range(1, 31):
        x = torch.randn(16, 12, generator=g)
        loss = (net(x) - x[:, :4]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        info = ast.after_step(masks, net, step)
        infos.append(info)
        flips += info["flipped"]
        if step < 27:
            assert not info["hard"]
            assert masks.sparsity(net)["sparsity"] < 0.5  # soft: pruned weights only decay
    assert infos[26]["hard"] and infos[-1]["hard"]
    assert flips > 0  # the mask adapted during training
    assert masks.check_nm(net, 2, 4, strict=True)
    _assert_zero_where_pruned(net, masks)
    assert masks.sparsity(net)["sparsity"] == pytest.approx(0.5)


def test_ast_schedule_settings_are_checked():
    with pytest.raises(ValueError, match="total_steps"):
        ASTSchedule(total_steps=0)
    with pytest.raises(ValueError, match="update_every"):
        ASTSchedule(total_steps=10, update_every=0)
    with pytest.raises(ValueError, match="pattern must be"):
        ASTSchedule(total_steps=10, pattern="3:3")
    with pytest.raises(ValueError, match="max_decay"):
        ASTSchedule(total_steps=10, max_decay=2.0)
    with pytest.raises(ValueError, match="method='wanda' needs norms"):
        ASTSchedule(total_steps=10, method="wanda")
    with pytest.raises(ValueError, match="sparsity is required"):
        ASTSchedule(total_steps=10, pattern="unstructured")
    with pytest.raises(ValueError, match="harden_at"):
        ASTSchedule(total_steps=10, harden_at=0)

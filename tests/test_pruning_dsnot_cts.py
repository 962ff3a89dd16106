"""DSnoT mask refinement, Concrete Ticket Search and its registered loss ``cts_kl``."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import mentor.losses as L
from mentor.pruning import (
    MaskSet,
    calibration_norms,
    calibration_stats,
    compute_masks,
    dsnot,
    prunable,
)
from mentor.pruning.cts import concrete_ticket_search
from mentor.pruning.masks import n_pruned
from mentor.signals import TopK


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _fwd(m, b):
    return m(b)


# ------------------------------------------------------------------------------------ DSnoT


def _layer_with_correlated_inputs(seed: int, d_in: int = 64, d_out: int = 32, n: int = 1024):
    """A Linear layer and inputs with non-zero means and correlated features (LLM-like)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    mean = torch.randn(d_in, generator=g) * 2
    x = torch.randn(n, d_in, generator=g) @ mix + mean
    lin = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
    return lin, list(x.split(256)), x


def _recon_error(lin, mask, x):
    """‖(W − W⊙M)·X‖_F over the calibration inputs."""
    dw = lin.weight.detach() * (~mask)
    return float((x @ dw.T).norm())


def test_calibration_stats_match_torch_mean_and_variance():
    lin, batches, x = _layer_with_correlated_inputs(0)
    stats = calibration_stats(lin, batches, _fwd, {"l": lin})["l"]
    assert stats.count == x.shape[0]
    torch.testing.assert_close(stats.mean, x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.var, x.var(0, correction=0), rtol=1e-4, atol=1e-5)
    norms = calibration_norms(lin, batches, _fwd, {"l": lin})["l"]
    torch.testing.assert_close(stats.norm, norms, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)]
)
def test_dsnot_lowers_the_reconstruction_error_of_a_wanda_mask(seed, pattern, sparsity):
    lin, batches, x = _layer_with_correlated_inputs(seed)
    mods = {"l": lin}
    norms = calibration_norms(lin, batches, _fwd, mods)
    stats = calibration_stats(lin, batches, _fwd, mods)
    masks = compute_masks(mods, "wanda", sparsity, pattern, norms=norms)
    start = masks["l"].clone()
    w0 = lin.weight.detach().clone()
    info = dsnot(mods, masks, stats, max_cycles=50, update_threshold=0.1, pattern=pattern)["l"]
    new = masks["l"]
    assert info["swaps"] > 0 and 0 < info["cycles"] <= 50
    assert not torch.equal(new, start)
    assert _recon_error(lin, new, x) < 0.95 * _recon_error(lin, start, x)
    assert info["error_after"] < info["error_before"]
    assert info["mean_error_after"] < info["mean_error_before"]
    # the reported error is E‖Δy‖² per token under a diagonal covariance: close to the truth
    # for the starting mask's pruned part only up to the input correlations, so just its scale
    assert info["error_before"] == pytest.approx(_recon_error(lin, start, x) ** 2 / x.shape[0],
                                                 rel=0.5)  # fmt: skip
    assert torch.equal(new.sum(1), start.sum(1))  # sparsity per row unchanged
    assert torch.equal(lin.weight.detach(), w0)  # training-free: weights untouched
    if pattern == "2:4":
        assert (new.reshape(32, -1, 4).sum(-1) == 2).all()


def test_dsnot_with_zero_cycles_or_a_huge_threshold_changes_nothing():
    lin, batches, _ = _layer_with_correlated_inputs(3)
    mods = {"l": lin}
    stats = calibration_stats(lin, batches, _fwd, mods)
    norms = {"l": stats["l"].norm}
    for kw in ({"max_cycles": 0}, {"update_threshold": 1e12}):
        masks = compute_masks(mods, "wanda", 0.5, norms=norms)
        start = masks["l"].clone()
        info = dsnot(mods, masks, stats, **kw)["l"]
        assert info["swaps"] == 0 and torch.equal(masks["l"], start)
        assert info["error_after"] == info["error_before"]


def test_dsnot_errors_name_the_problem():
    lin, batches, _ = _layer_with_correlated_inputs(4)
    mods = {"l": lin}
    stats = calibration_stats(lin, batches, _fwd, mods)
    norms = {"l": stats["l"].norm}
    masks = compute_masks(mods, "wanda", 0.5, norms=norms)
    with pytest.raises(ValueError, match="does not keep exactly 2 of every 4"):
        dsnot(mods, dict(masks), stats, pattern="2:4")
    with pytest.raises(ValueError, match="no calibration stats for module 'l'"):
        dsnot(mods, dict(masks), {})
    with pytest.raises(ValueError, match="no mask for module 'l'"):
        dsnot(mods, {}, stats)
    with pytest.raises(ValueError, match=r"mask for module 'l' has shape \(2, 2\)"):
        dsnot(mods, {"l": torch.ones(2, 2, dtype=torch.bool)}, stats)
    with pytest.raises(ValueError, match="max_cycles"):
        dsnot(mods, dict(masks), stats, max_cycles=-1)
    with pytest.raises(ValueError, match="update_threshold"):
        dsnot(mods, dict(masks), stats, update_threshold=-1.0)
    with pytest.raises(ValueError, match="pattern must be"):
        dsnot(mods, dict(masks), stats, pattern="2/4")
    lin2 = copy.deepcopy(lin)
    MaskSet(masks).apply(nn.ModuleDict({"l": lin2}))
    with pytest.raises(ValueError, match="already zero: run dsnot on the dense weights"):
        dsnot({"l": lin2}, dict(masks), stats)


# -------------------------------------------------------------------------------------- CTS


def _teacher(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    with torch.no_grad():
        net[4].weight.mul_(5.0)  # peaked output distributions, as a trained classifier's
    return net.eval()


def _calibration(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 16, generator=g) for _ in range(4)]


def _reverse_kl_to_dense(net, masks, batches) -> float:
    sparse = copy.deepcopy(net)
    MaskSet(masks).apply(sparse)
    with torch.no_grad():
        return sum(float(L.cts_kl(sparse(b), net(b))) for b in batches) / len(batches)


@pytest.mark.parametrize("seed", [0, 1])
def test_cts_mask_has_the_exact_density_and_beats_magnitude_in_reverse_kl(seed):
    net = _teacher(seed)
    batches = _calibration()
    mods = prunable(net, exclude=None)
    dense_before = {k: v.clone() for k, v in net.state_dict().items()}
    log: list[dict] = []
    masks = concrete_ticket_search(net, mods, batches, _fwd, 0.9, steps=300, seed=0, log=log)
    total = sum(m.weight.numel() for m in mods.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == total - n_pruned(total, 0.9) == 576
    assert all(
        masks[n].dtype == torch.bool and masks[n].shape == mods[n].weight.shape for n in mods
    )
    # GradBalance holds the expected density at the target
    assert log[-1]["density"] == pytest.approx(0.1, abs=2e-3)
    assert len(log) == 300 and log[-1]["loss"] < log[0]["loss"]
    magnitude = compute_masks(mods, "magnitude", 0.9)
    cts, mag = (
        _reverse_kl_to_dense(net, masks, batches),
        _reverse_kl_to_dense(net, magnitude, batches),
    )
    assert cts < 0.7 * mag
    # the model itself is untouched and got no gradients
    for k, v in net.state_dict().items():
        assert torch.equal(v, dense_before[k])
    assert all(p.grad is None for p in net.parameters())


def test_cts_is_seeded_and_layer_scope_keeps_every_layer_exact():
    net = _teacher(2)
    net.train()
    batches = _calibration()
    mods = prunable(net, exclude=None)
    a = concrete_ticket_search(net, mods, batches, _fwd, 0.75, steps=20, seed=3, scope="layer")
    b = concrete_ticket_search(net, mods, batches, _fwd, 0.75, steps=20, seed=3, scope="layer")
    assert all(torch.equal(a[n], b[n]) for n in mods)
    for n, mod in mods.items():
        numel = mod.weight.numel()
        assert int(a[n].sum()) == numel - n_pruned(numel, 0.75)
    assert net.training and all(m.training for m in net.modules())  # modes restored
    c = concrete_ticket_search(net, mods, batches, _fwd, 0.75, steps=20, seed=4, scope="layer")
    assert any(not torch.equal(a[n], c[n]) for n in mods)


def test_cts_works_on_a_tiny_llama_with_dict_batches():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=32)).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)} for _ in range(2)]
    mods = prunable(lm, include=["mlp"])
    masks = concrete_ticket_search(lm, mods, batches, lambda m, b: m(**b), 0.5, steps=5)
    total = sum(m.weight.numel() for m in mods.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - n_pruned(total, 0.5)


def test_cts_bad_settings_raise_errors_that_name_the_setting():
    net = _teacher()
    mods = prunable(net, exclude=None)
    batches = _calibration()
    for bad in (1.0, -0.5, True):
        with pytest.raises(ValueError, match="sparsity must be"):
            concrete_ticket_search(net, mods, batches, _fwd, bad)
    with pytest.raises(ValueError, match="steps must be"):
        concrete_ticket_search(net, mods, batches, _fwd, 0.5, steps=0)
    with pytest.raises(ValueError, match="lr must be"):
        concrete_ticket_search(net, mods, batches, _fwd, 0.5, lr=0)
    with pytest.raises(ValueError, match="temperature must be"):
        concrete_ticket_search(net, mods, batches, _fwd, 0.5, temperature=-1)
    with pytest.raises(ValueError, match="scope must be"):
        concrete_ticket_search(net, mods, batches, _fwd, 0.5, scope="row")
    with pytest.raises(ValueError, match="batches is empty"):
        concrete_ticket_search(net, mods, [], _fwd, 0.5)
    with pytest.raises(ValueError, match="modules is empty"):
        concrete_ticket_search(net, {}, batches, _fwd, 0.5)
    with pytest.raises(ValueError, match="must return the logits"):
        concrete_ticket_search(net, mods, batches, lambda m, b: {"x": m(b)}, 0.5, steps=1)


# ------------------------------------------------------------------------------- cts_kl loss


def _ref_reverse_kl(s, t, temperature, mask=None):
    """KL(p_S^τ ‖ p_T^τ) per row with torch.distributions, mean over the counted rows."""
    from torch.distributions import Categorical, kl_divergence

    rows = kl_divergence(Categorical(logits=s / temperature), Categorical(logits=t / temperature))
    if mask is not None:
        rows = rows[mask]
    return rows.mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_cts_kl_matches_the_formula(temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    got = L.cts_kl(s, t, mask=mask, temperature=temperature)
    ref = _ref_reverse_kl(s, t, temperature, mask)
    assert float(got) == pytest.approx(float(ref), rel=1e-10)
    # explicit Σ p_S (log p_S − log p_T)
    lps, lpt = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    explicit = (lps.exp() * (lps - lpt)).sum(-1)[mask].mean()
    assert float(got) == pytest.approx(float(explicit), rel=1e-10)
    # as a module, and equal to reverse_kl
    mod = L.get_loss("cts_kl", temperature=temperature)
    assert float(mod(s, t, mask=mask)) == pytest.approx(float(got), rel=1e-12)
    assert float(L.reverse_kl(s, t, mask=mask, temperature=temperature)) == pytest.approx(
        float(got), rel=1e-12
    )
    # gradient flows to the student (the sparse network) only through its logits
    s32 = s.float().requires_grad_(True)
    L.cts_kl(s32, t.float(), temperature=temperature).backward()
    assert torch.isfinite(s32.grad).all() and s32.grad.abs().sum() > 0


def test_cts_kl_is_registered_with_defaults_and_checks():
    assert "cts_kl" in L.list_losses()
    cls = L.LOSSES.get("cts_kl")
    assert cls.inputs == "logits"
    assert cls.defaults == {"temperature": 1.0, "chunk_size": None}
    assert "2025" in (cls.__doc__ or "") and "Concrete Ticket Search" in cls.__doc__
    params = inspect.signature(L.cts_kl).parameters
    assert list(params)[:2] == ["student_logits", "teacher_logits"]
    with pytest.raises(ValueError, match="temperature"):
        L.get_loss("cts_kl", temperature=0)
    with pytest.raises(ValueError, match="no hyperparameter 'tail'"):
        L.get_loss("cts_kl", tail="tail_bucket")
    with pytest.raises((ValueError, TypeError), match="dense"):  # the dense net is at hand
        L.cts_kl(torch.randn(2, 5), TopK.from_logits(torch.randn(2, 5), 2))
    s = torch.randn(4, 7)
    assert float(L.cts_kl(s, s.clone())) == pytest.approx(0.0, abs=1e-7)
    obj = L.Objective({"cts_kl": {"weight": 1.0}})
    out = obj(torch.randn(2, 3, 7), torch.randn(2, 3, 7))
    assert torch.isfinite(out["loss"]) and float(out["loss"]) > 0

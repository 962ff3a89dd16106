"""The closed-form student gradients (RowSpec.closed_form) against autograd and finite differences."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mentor.losses import get_loss
from mentor.losses._rows import run_rows
from mentor.losses.logit import ROWWISE

CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0}),
    ("kd", {}),
    ("kd", {"alpha": 0.3, "temperature": 2.0}),
    ("reverse_kl", {"temperature": 0.5}),
    ("jsd", {}),
    ("jsd", {"beta": 0.1, "temperature": 2.0}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("ce", {}),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


def _inputs(dtype=torch.float64, shape=(3, 6, 11), pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    if pad:  # classes that are -inf in both (padded vocabulary)
        s[..., -pad:] = float("-inf")
        t[..., -pad:] = float("-inf")
    labels = torch.randint(0, shape[-1] - pad, shape[:-1], generator=g)
    labels[0, 1] = -100
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    mask[1, 2] = mask[-1, 0] = False
    return s.to(dtype), t.to(dtype), labels, mask


def _autograd_path(name, hp, s, t, labels, mask, chunk_size=None):
    """The same loss through the generic autograd graph (closed form switched off)."""
    builder, check = ROWWISE[name]
    spec = dataclasses.replace(builder(**hp), closed_form=None)
    return run_rows(
        spec, s, t, labels, mask, chunk_size=chunk_size, temperature=hp.get("temperature", 1.0)
    )


@pytest.mark.parametrize("name,hp", CASES, ids=IDS)
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("shifted", [False, True])
def test_closed_form_equals_autograd(name, hp, chunk_size, shifted):
    s, t, labels, mask = _inputs(pad=2)
    if shifted:  # the causal-LM view logits[:, :-1], read without a copy
        s, t, labels, mask = s[:, :-1], t[:, :-1], labels[:, 1:], mask[:, :-1]
    a = s.detach().clone().requires_grad_(True)
    b = s.detach().clone().requires_grad_(True)
    got = get_loss(name, chunk_size=chunk_size, **hp)(a, t, labels=labels, mask=mask)
    ref = _autograd_path(name, hp, b, t, labels, mask)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got.backward()
    ref.backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,hp", CASES, ids=IDS)
def test_closed_form_gradient_matches_finite_differences(name, hp):
    s, t, labels, mask = _inputs(shape=(2, 3, 5))
    fn = get_loss(name, **hp)
    torch.autograd.gradcheck(
        lambda x: fn(x, t, labels=labels, mask=mask), (s.requires_grad_(True),), eps=1e-6
    )


@pytest.mark.parametrize("name,hp", CASES[:6], ids=IDS[:6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_closed_form_low_precision_inputs(name, hp, dtype):
    s, t, labels, mask = _inputs(dtype=dtype)
    a = s.detach().clone().requires_grad_(True)
    b = s.detach().double().requires_grad_(True)
    got = get_loss(name, **hp)(a, t, labels=labels, mask=mask)
    ref = _autograd_path(name, hp, b, t.double(), labels, mask)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    got.backward()
    ref.backward()
    assert a.grad.dtype == dtype
    torch.testing.assert_close(
        a.grad.double(), b.grad, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-5
    )


def test_retained_graph_backward_twice_gives_the_same_gradient_without_aliasing():
    s, t, labels, mask = _inputs()
    x = s.clone().requires_grad_(True)
    out = get_loss("jsd")(x, t, mask=mask) * 3.0
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    first = g1.clone()
    (g2,) = torch.autograd.grad(out, x, retain_graph=True)
    (g0,) = torch.autograd.grad(out * 0.0, x)
    torch.testing.assert_close(g2, first)
    torch.testing.assert_close(g1, first)  # the first result was not modified
    assert float(g0.abs().sum()) == 0.0


def test_teacher_with_gradient_takes_the_autograd_path():
    s, t, labels, mask = _inputs()
    s.requires_grad_(True)
    t = t.clone().requires_grad_(True)
    get_loss("jsd")(s, t, mask=mask).backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and float(t.grad.abs().sum()) > 0


TOPK_CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0, "tail": "renormalize"}),
    ("kd", {"temperature": 2.0}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3, "temperature": 2.0}),
    ("tvd", {}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("taid", {"t": 0.4}),
    ("bd_kd", {}),
]


@pytest.mark.parametrize(
    "name,hp", TOPK_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TOPK_CASES)]
)
@pytest.mark.parametrize("shifted", [False, True])
def test_topk_cell_gradient_equals_autograd(name, hp, shifted):
    from mentor.signals import TopK

    s, t, labels, mask = _inputs()
    top = TopK.from_logits(t, k=4)
    if shifted:
        s, top, mask = s[:, :-1], top[:, :-1], mask[:, :-1]
    a = s.detach().clone().requires_grad_(True)
    b = s.detach().clone().requires_grad_(True)
    got = get_loss(name, **hp)(a, top, mask=mask)
    builder, _ = ROWWISE[name]
    spec = dataclasses.replace(builder(**hp), closed_form=None, topk_cells=False)
    ref = run_rows(spec, b, top, None, mask, temperature=hp.get("temperature", 1.0))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got.backward()
    ref.backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)

"""Objective (weights, taps, projectors, TAID schedule) and the TAID scheduler."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import mentor.losses as L
from mentor.losses import Objective, TAIDScheduler
from mentor.signals import TopK


def _ref_schedule(losses, total, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, fixed=False):
    """The schedule of METHODS-losses.md §taid, step by step."""
    t, prev, m, out = t_start, math.inf, 0.0, []
    for g, ell in enumerate(losses):
        if prev == math.inf:
            prev = ell
            out.append(t)
            continue
        delta = (prev - ell) / (prev + 1e-15)
        m = beta * m + (1 - beta) * delta
        t_lin = t_start + (t_end - t_start) * g / total
        if fixed:
            t = t_lin
        else:
            t = min(t_end, max(t_lin, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)))
        prev = ell
        out.append(t)
    return out


@pytest.mark.parametrize("kw", [{}, {"alpha": 0.2, "beta": 0.5}, {"disable_adaptive": True}])
def test_taid_scheduler_follows_spec(kw):
    losses = [2.0, 1.5, 1.6, 1.0, 0.7, 0.9, 0.2, 0.1]
    sched = TAIDScheduler(**kw)
    got = [sched.update(v, g, 10) for g, v in enumerate(losses)]
    ref = _ref_schedule(losses, 10, fixed=kw.get("disable_adaptive", False),
                        **{k: v for k, v in kw.items() if k != "disable_adaptive"})  # fmt: skip
    assert got == pytest.approx(ref, rel=1e-12)
    assert got[0] == 0.4  # first call only records prev
    assert all(0.4 <= x <= 1.0 for x in got)
    state = sched.state_dict()
    other = TAIDScheduler(**kw)
    other.load_state_dict(state)
    assert other.t == sched.t


@pytest.mark.parametrize(
    "kw", [{"t_start": 1.0}, {"t_end": 0.0}, {"alpha": 2.0}, {"beta": -0.1}, {"t_start": -0.1}]
)
def test_taid_scheduler_rejects_invalid(kw):
    with pytest.raises(ValueError):
        TAIDScheduler(**kw)


def test_taid_requires_t_outside_objective():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="needs the interpolation parameter t"):
        L.get_loss("taid")(s, t)
    with pytest.raises(ValueError, match="t must be"):
        L.taid(s, t, t=1.5)


def test_objective_taid_schedules_itself():
    obj = Objective({"taid": {"weight": 1.0, "t_start": 0.2, "alpha": 0.1}, "ce": {"weight": 0.5}})
    s = torch.randn(3, 4, 9, requires_grad=True)
    t = torch.randn(3, 4, 9)
    labels = torch.randint(0, 9, (3, 4))
    out = obj(s, t, labels=labels)
    assert set(out) == {"taid", "ce", "loss"}
    assert float(out["taid"]) == pytest.approx(float(L.taid(s, t, t=0.2)))
    assert float(out["loss"]) == pytest.approx(float(out["taid"] + 0.5 * out["ce"]))
    out["loss"].backward()
    vals = []
    for step in range(4):
        out = obj(s, t, labels=labels)
        vals.append(float(out["taid"]) * (1 - 0.1 * step))
        obj.after_step(step, 4, {"taid": vals[-1]})
    assert obj.taid_t()["taid"] == pytest.approx(_ref_schedule(vals, 4, 0.2, alpha=0.1)[-1])
    assert obj.taid_t()["taid"] > 0.2
    # without values the last computed value is used
    obj.after_step(4, 4, {})
    fixed = Objective({"taid": {"t": 0.7}})
    assert not fixed.schedulers
    assert float(fixed(s, t)["taid"]) == pytest.approx(float(L.taid(s, t, t=0.7)))


def test_objective_weights_are_mutable_and_sparse_teacher_passes_through():
    obj = Objective({"kd": {"weight": 0.9, "temperature": 2.0}, "fkl": {"loss": "forward_kl"}})
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    obj.weights["kd"] = 0.0
    out = obj(s, TopK.from_logits(t, 7))
    assert float(out["loss"]) == pytest.approx(float(out["fkl"]))
    assert float(out["fkl"]) == pytest.approx(float(L.forward_kl(s, t)), rel=1e-6)


def test_objective_projector_trains_with_the_student():
    obj = Objective(
        {
            "hint": {
                "loss": "hint_mse",
                "student": "layers.1",
                "teacher": "layers.3",
                "projector": {"in_features": 4, "out_features": 6},
            },
            "kd": {},
        }
    )
    assert obj.taps == {"hint": ("layers.1", "layers.3")}
    params = list(obj.parameters())
    assert len(params) == 2  # Linear weight + bias
    fs, ft = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    out = obj(torch.randn(2, 3, 5), torch.randn(2, 3, 5), student_features={"layers.1": fs},
              teacher_features={"layers.3": ft})  # fmt: skip
    out["loss"].backward()
    assert obj.projectors["hint"].weight.grad is not None
    with pytest.raises(ValueError, match="projector needs 'out_features'"):
        Objective({"h": {"loss": "hint_mse", "student": "a", "teacher": "b",
                         "projector": {"in_features": 4}}})  # fmt: skip
    with pytest.raises(ValueError, match="feature terms only"):
        Objective({"kd": {"projector": nn.Linear(2, 2)}})


def test_objective_errors():
    with pytest.raises(ValueError, match="objective.kd: loss 'kd' has no hyperparameter 'temp'"):
        Objective({"kd": {"temp": 2}})
    with pytest.raises(ValueError, match="name the taps"):
        Objective({"hint_mse": {}})
    with pytest.raises(ValueError, match="temperature must be"):
        Objective({"kd": {"temperature": 0}})


def test_describe_losses_lists_every_loss():
    names = [n for n, _ in L.describe_losses()]
    assert names == L.list_losses()


def _documented_losses() -> tuple[list[str], set[str]]:
    """Loss names in docs/losses.md: first cells of the loss tables, and ``### `name`` headings."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \|", text, flags=re.M)
    # "### `kd` — ...", "### `forward_kl`, `reverse_kl`" (not "### `standardize` option ...")
    headings = re.findall(r"^### ((?:`\w+`(?:, )?)+)(?: —.*)?$", text, flags=re.M)
    return rows, {n for h in headings for n in re.findall(r"`(\w+)`", h)}


def test_docs_list_exactly_the_registered_losses():
    rows, headings = _documented_losses()
    registered = set(L.list_losses())
    assert len(rows) == len(set(rows)), "a loss has two rows in the docs/losses.md tables"
    assert registered - set(rows) == set(), "add a docs/losses.md table row for these losses"
    assert set(rows) - registered == set(), "docs/losses.md tables list unregistered losses"
    assert headings and headings <= registered, "docs/losses.md headings name unknown losses"

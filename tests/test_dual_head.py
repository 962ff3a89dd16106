"""Dual-head students (DHO: Kang et al., "Simple Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization", 2025): routing of the objective's terms to
the two heads, the inference rule, saving and loading, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mentor.losses import Objective
from mentor.models import model_outputs
from mentor.students.dual_head import (
    DUAL_HEAD_FILE,
    DualHead,
    DualLogits,
    combine_heads,
    find_linear_head,
    load_dual_head,
    save_dual_head,
    search_combination,
    wrap_dual_head,
)

D = torch.float64


def _mlp(seed: int = 0, c: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, c)).to(D)


def _batch(seed: int = 0, n: int = 5, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=D)
    t = torch.randn(n, c, generator=g, dtype=D) * 2
    y = torch.randint(0, c, (n,), generator=g)
    return x, t, y


def _grads(model: DualHead) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def test_train_mode_gives_both_heads_and_the_label_head_is_the_students_own():
    student = _mlp()
    x, _, _ = _batch()
    expected = student(x)
    model = wrap_dual_head(student)
    assert model.head_path == "3" and isinstance(model.distill_head, nn.Linear)
    out = model(x)
    assert isinstance(out, DualLogits) and out.shape == (5, 4)
    torch.testing.assert_close(out.label, expected)
    feats = student[2](student[1](student[0](x)))
    torch.testing.assert_close(out.distill, model.distill_head(feats))
    # "fresh": independently initialised (the paper's ResNet students); "copy": same weights
    assert not torch.equal(model.distill_head.weight, student[3].weight)
    copied = wrap_dual_head(_mlp(), init="copy")
    assert torch.equal(copied.distill_head.weight, copied.student[3].weight)
    assert copied.distill_head.weight is not copied.student[3].weight
    # slicing applies to both heads (e.g. a causal shift)
    assert torch.equal(out[1:3].distill, out.distill[1:3])
    # model_outputs (the engine's student call) passes the DualLogits through
    assert isinstance(model_outputs(model, {"inputs": x}), DualLogits)


def test_ce_reaches_only_the_label_head_kd_only_the_distill_head_body_gets_both():
    x, t, y = _batch()
    per_term = {}
    for spec in ({"ce": {}}, {"kd": {"temperature": 2.0}}):
        model = wrap_dual_head(_mlp())
        obj = Objective(spec)
        obj(model(x), t, labels=y)["loss"].backward()
        per_term[next(iter(spec))] = _grads(model)
    ce, kd = per_term["ce"], per_term["kd"]
    label_head = ("student.3.weight", "student.3.bias")
    distill_head = ("distill_head.weight", "distill_head.bias")
    body = ("student.1.weight", "student.1.bias")
    for n in label_head:
        assert ce[n] is not None and ce[n].abs().sum() > 0
        assert kd[n] is None or not kd[n].any()
    for n in distill_head:
        assert kd[n] is not None and kd[n].abs().sum() > 0
        assert ce[n] is None or not ce[n].any()
    for n in body:
        assert ce[n].abs().sum() > 0 and kd[n].abs().sum() > 0
    # both terms at once: the shared body's gradient is the sum of the two
    model = wrap_dual_head(_mlp())
    out = Objective({"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 2.0}})(
        model(x), t, labels=y
    )
    out["loss"].backward()
    both = _grads(model)
    for n in body:
        torch.testing.assert_close(both[n], 0.5 * ce[n] + 0.5 * kd[n])
    # the term values are those of each head on its own
    with torch.no_grad():
        dual = model(x)
    assert float(out["ce"].detach()) == pytest.approx(float(F.cross_entropy(dual.label, y)))


def test_eval_mode_is_the_papers_inference_rule():
    x, _, _ = _batch()
    model = wrap_dual_head(_mlp(), alpha=0.3, temperature=2.0)
    dual = model.heads(x)
    model.eval()
    got = model(x)
    assert isinstance(got, torch.Tensor) and got.shape == (5, 4)
    p = 0.3 * dual.label.softmax(-1) + 0.7 * (dual.distill / 2.0).softmax(-1)
    torch.testing.assert_close(got, p.log())
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(5, dtype=D))  # valid logits
    model.set_combination(alpha=1.0)
    torch.testing.assert_close(model(x), dual.label.log_softmax(-1))
    model.set_combination(alpha=0.0, temperature=0.5)
    torch.testing.assert_close(model(x), (dual.distill / 0.5).log_softmax(-1))
    assert model.combination() == (0.0, 0.5)
    # half precision is combined in float32
    half = combine_heads(DualLogits(dual.label.bfloat16(), dual.distill.bfloat16()), 0.5, 1.0)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_state_dict_round_trip_and_save_load(tmp_path):
    x, _, _ = _batch()
    model = wrap_dual_head(_mlp(0), alpha=0.25, temperature=1.5)
    with torch.no_grad():
        model.distill_head.weight.add_(1.0)
    other = wrap_dual_head(_mlp(1))
    other.load_state_dict(model.state_dict())
    assert other.combination() == (0.25, 1.5)
    model.eval(), other.eval()
    torch.testing.assert_close(other(x), model(x))
    # as the engine exports it: the inner student as usual plus dual_head.safetensors
    save_file({k: v.contiguous() for k, v in model.student.state_dict().items()},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    meta = save_dual_head(model, tmp_path)
    assert (tmp_path / DUAL_HEAD_FILE).exists()
    assert meta["dual_head"]["head"] == "3" and meta["dual_head"]["alpha"] == 0.25
    inner = _mlp(2)
    inner.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    loaded = load_dual_head(inner, tmp_path, meta)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x))


def test_errors():
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        wrap_dual_head(nn.Sequential(nn.Flatten(), nn.ReLU()))
    with pytest.raises(ValueError, match="out_features == 7"):
        wrap_dual_head(_mlp(), num_classes=7)
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            wrap_dual_head(_mlp(), alpha=bad)
    for bad in (0, -1.0, math.inf, False):
        with pytest.raises(ValueError, match="temperature"):
            wrap_dual_head(_mlp(), temperature=bad)
    with pytest.raises(ValueError, match="init"):
        wrap_dual_head(_mlp(), init="zeros")
    model = wrap_dual_head(_mlp())
    with pytest.raises(ValueError, match="already has a dual head"):
        DualHead(model, "student.3")
    with pytest.raises(ValueError, match="alpha"):
        model.set_combination(alpha=2.0)
    with pytest.raises(ValueError, match="same shape"):
        DualLogits(torch.zeros(2, 3), torch.zeros(2, 4))

    class Normalised(nn.Module):  # an embedder: its output is not head(features)
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            return F.normalize(self.head(x), dim=-1)

    with pytest.raises(ValueError, match="transforms the output of its head"):
        wrap_dual_head(Normalised())(torch.randn(2, 6))


def test_objective_refuses_what_cannot_train_two_heads():
    x, t, y = _batch()
    model = wrap_dual_head(_mlp())
    taps = Objective({"h": {"loss": "hint_mse", "student": "a", "teacher": "b"}, "ce": {}})
    with pytest.raises(ValueError, match="compares features"):
        taps(model(x), t, labels=y, student_features={"a": t}, teacher_features={"b": t})
    with pytest.raises(ValueError, match="tgeo_kd: mixes the label and teacher losses"):
        Objective({"tgeo_kd": {}})(model(x), t, labels=y)
    with pytest.raises(ValueError, match="mixes the label and teacher losses"):
        Objective({"tgeo_kd": {}}).check_dual_head()
    Objective({"ce": {}, "kd": {}}).check_dual_head()  # fine


def test_find_linear_head_prefers_output_embeddings_and_num_classes():
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(4, 10)
            self.extra = nn.Linear(4, 4)  # registered later, not the output

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, x):
            return self.lm_head(x)

    assert find_linear_head(LM()) == "lm_head"
    assert find_linear_head(LM(), num_classes=4) == "extra"
    assert find_linear_head(_mlp()) == "3"


def test_search_combination_picks_the_best_rule():
    # the label head is right on rows 0-2, the distillation head on rows 3-5
    y = torch.tensor([0, 1, 2, 0, 1, 2, -100])
    label = F.one_hot(torch.tensor([0, 1, 2, 1, 2, 0, 0]), 3).double() * 3
    distill = F.one_hot(torch.tensor([1, 2, 0, 0, 1, 2, 0]), 3).double() * 3
    distill[:3] *= 0.1  # the distillation head is unsure where it is wrong
    alpha, beta, acc = search_combination(DualLogits(label, distill), y)
    assert acc == 1.0 and 0 <= alpha <= 1 and beta in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)
    p = alpha * label.softmax(-1) + (1 - alpha) * (distill / beta).softmax(-1)
    assert (p[:6].argmax(-1) == y[:6]).all()
    with pytest.raises(ValueError, match="labelled row"):
        search_combination(DualLogits(label, distill), torch.full((7,), -100))


def test_tiny_distillation_run_through_the_engine(tmp_path):
    """DHO on Gaussian clusters with the engine: both heads learn; eval uses the combination."""
    from mentor.config import load_config
    from mentor.data import build_data
    from mentor.engine import Distiller
    from mentor.eval.metrics import evaluate_classifier
    from mentor.teachers import OnlineTeacher

    bundle = build_data("random", {"n": 300, "in_features": 16, "num_classes": 4}, 0.25, 0)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    xs = torch.stack([bundle.train[i]["inputs"] for i in range(len(bundle.train))])
    ys = torch.tensor([int(bundle.train[i]["labels"]) for i in range(len(bundle.train))])
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(teacher(xs), ys).backward()
        opt.step()
    teacher.eval()
    student = wrap_dual_head(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
    cfg = load_config({
        "name": "dho",
        "objective": {"ce": {"weight": 0.5}, "kd": {"weight": 0.5, "temperature": 2.0}},
        "train": {"max_steps": 60, "batch_size": 32, "lr": 1e-2, "progress": False},
        "output": {"dir": str(tmp_path / "run")},
    })  # fmt: skip
    run = Distiller(student, OnlineTeacher(teacher), cfg.objective, bundle.train, cfg).fit()
    student.eval()
    m = evaluate_classifier(student, bundle.val, teacher)
    assert m["accuracy"] >= 0.85 and m["agreement"] >= 0.85
    # the paper's test-time tuning of (α, β) on held-out data: the grid holds (0.5, 1)
    val = {
        "inputs": torch.stack([bundle.val[i]["inputs"] for i in range(len(bundle.val))]),
        "labels": torch.tensor([int(bundle.val[i]["labels"]) for i in range(len(bundle.val))]),
    }
    alpha, beta, acc = student.tune_combination([val])
    assert student.combination() == (alpha, beta) and not student.training
    assert acc >= m["accuracy"] - 1e-9
    assert acc == pytest.approx(evaluate_classifier(student, bundle.val, teacher)["accuracy"])
    saved = load_file(str(run / "student" / "model.safetensors"))
    assert {"distill_head.weight", "alpha", "temperature"} <= set(saved)

"""TGeo-KD (Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
Distillation", ICLR 2024): the fused loss, the geometric features, the bilevel update of the
fusion net, its checkpoint state, and that the student's optimizer never sees it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import mentor.losses as L
from mentor.losses import Objective
from mentor.losses.tgeo import TGeoKDLoss, fuse_rows, tgeo_features
from mentor.signals import TopK
from mentor.students.dual_head import wrap_dual_head

D = torch.float64


# ------------------------------------------------------------------ independent reference
def _init_weights(c: int, hidden: int, seed: int) -> list[torch.Tensor]:
    """The documented initialisation of the fusion net, written out again."""
    g = torch.Generator().manual_seed(seed)
    d = 9 * c

    def u(shape, fan_in):
        return (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(fan_in)

    return [u((hidden, d), d), u((hidden,), d), u((1, hidden), hidden), u((1,), hidden)]


def ref_tgeo_kd(s, t, labels, mask=None, temperature=4.0, hidden=128, seed=0):
    """Row by row in float64: T̄ = mean teacher probs of the batch's counted labelled rows per
    class; α = sigmoid(W2 relu(W1 x + b1) + b2) (−100 rows: 1); α·τ²·KL + (1−α)·CE."""
    c = s.shape[-1]
    S, T = s.reshape(-1, c).to(D), t.reshape(-1, c).to(D)
    y = labels.reshape(-1).tolist()
    if mask is not None:
        rows = [r for r, m in enumerate(mask.reshape(-1).tolist()) if m]
    else:
        rows = [r for r in range(len(y)) if y[r] != -100]
    if not rows:
        return 0.0
    w1, b1, w2, b2 = (w.to(D) for w in _init_weights(c, hidden, seed))
    sums, counts = {}, {}
    for r in rows:
        if y[r] != -100:
            sums[y[r]] = sums.get(y[r], 0) + T[r].softmax(-1)
            counts[y[r]] = counts.get(y[r], 0) + 1
    total = 0.0
    for r in rows:
        ps, pt = S[r].softmax(-1), T[r].softmax(-1)
        pst, ptt = (S[r] / temperature).softmax(-1), (T[r] / temperature).softmax(-1)
        kl = sum(float(a * (math.log(a) - math.log(b))) for a, b in zip(ptt, pst) if a > 0)
        if y[r] == -100:
            total += temperature**2 * kl
            continue
        g = torch.zeros(c, dtype=D)
        g[y[r]] = 1
        tb = sums[y[r]] / counts[y[r]]
        x = torch.cat([ps, pt, tb, g, (ps - g).abs(), (ps - pt).abs(), (ps - tb).abs(),
                       (g - tb) * (g - ps), (g - pt) * (g - ps)])  # fmt: skip
        alpha = float(torch.sigmoid(w2 @ torch.relu(w1 @ x + b1) + b2))
        ce = -math.log(float(ps[y[r]]))
        total += alpha * temperature**2 * kl + (1 - alpha) * ce
    return total / len(rows)


def _inputs(dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, 4, 7, generator=g, dtype=D) * 3).to(dtype)
    t = (torch.randn(2, 4, 7, generator=g, dtype=D) * 3).to(dtype)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    labels[0, 1] = -100
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    return s, t, labels, mask


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize("hp", [{}, {"temperature": 2.0, "hidden": 16, "seed": 3}])
@pytest.mark.parametrize("with_mask", [True, False])
def test_matches_the_reference_in_float64_and_float32(hp, with_mask):
    s, t, labels, mask = _inputs()
    kw = {"labels": labels, "mask": mask if with_mask else None}
    ref = ref_tgeo_kd(s, t, **kw, **hp)
    got = L.get_loss("tgeo_kd", **hp)(s, t, **kw)
    assert got.dim() == 0 and got.dtype == D
    assert float(got) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    got32 = L.get_loss("tgeo_kd", **hp)(s.float(), t.float(), **kw)
    assert got32.dtype == torch.float32
    assert float(got32) == pytest.approx(ref_tgeo_kd(s.float(), t.float(), **kw, **hp), rel=1e-5)
    # the functional form is the loss at the seeded initial net
    assert float(L.tgeo_kd(s, t, **kw, **hp)) == pytest.approx(float(got), rel=1e-12)


def test_fused_loss_is_alpha_kd_plus_one_minus_alpha_ce_for_a_fixed_alpha():
    s, t, labels, _ = _inputs()
    s, t, y = s.reshape(-1, 7), t.reshape(-1, 7), labels.reshape(-1)
    alpha = torch.linspace(0.1, 0.9, 8, dtype=D)
    alpha[1] = 1.0  # the −100 row: KD only
    tau = 3.0
    kd = tau**2 * F.kl_div(F.log_softmax(s / tau, -1), F.softmax(t / tau, -1), reduction="none")
    ce = F.cross_entropy(s, y.clamp_min(0), reduction="none")
    expect = alpha * kd.sum(-1) + (1 - alpha) * torch.where(y >= 0, ce, 0.0)
    torch.testing.assert_close(fuse_rows(s, t, y, alpha, temperature=tau), expect)
    # the module: the same rows with the α of its net, mean over counted rows
    loss = TGeoKDLoss(temperature=tau)
    a = loss.fusion_ratio(s, t, y)
    value = loss(s, t, labels=y, mask=torch.ones(8, dtype=torch.bool))
    assert float(value) == pytest.approx(float(fuse_rows(s, t, y, a, temperature=tau).mean()))


def test_features_by_hand_on_three_classes():
    S = torch.tensor([[0.7, 0.2, 0.1]], dtype=D)
    T = torch.tensor([[0.6, 0.3, 0.1]], dtype=D)
    G = torch.tensor([[1.0, 0.0, 0.0]], dtype=D)
    Tb = torch.tensor([[0.5, 0.25, 0.25]], dtype=D)
    x = tgeo_features(S, T, G, Tb)
    expect = [
        0.7, 0.2, 0.1,  0.6, 0.3, 0.1,  0.5, 0.25, 0.25,  1.0, 0.0, 0.0,
        0.3, 0.2, 0.1,  0.1, 0.1, 0.0,  0.2, 0.05, 0.15,
        0.5 * 0.3, 0.25 * 0.2, 0.25 * 0.1,  0.4 * 0.3, 0.3 * 0.2, 0.1 * 0.1,
    ]  # fmt: skip
    torch.testing.assert_close(x, torch.tensor([expect], dtype=D))
    # T̄ is the teacher's mean over labelled rows of the row's class (and α comes from it)
    s = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=D))
    t = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.2, 0.2, 0.6]], dtype=D))
    y = torch.tensor([0, 0, 2])
    loss = TGeoKDLoss(hidden=4)
    a = loss.fusion_ratio(s, t, y)
    tb0 = torch.tensor([0.5, 0.35, 0.15], dtype=D)  # mean of the two class-0 rows
    w1, b1, w2, b2 = (w.to(D) for w in _init_weights(3, 4, 0))
    g0 = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    x0 = tgeo_features(s[:1].exp(), t[:1].exp(), g0[None], tb0[None])[0]
    a0 = torch.sigmoid(w2 @ torch.relu(w1 @ x0 + b1) + b2)
    assert float(a[0]) == pytest.approx(float(a0), rel=1e-12)


def test_alpha_is_in_the_open_unit_interval_and_one_for_unlabelled_rows():
    s, t, labels, _ = _inputs()
    loss = TGeoKDLoss()
    a = loss.fusion_ratio(s.reshape(-1, 7), t.reshape(-1, 7), labels.reshape(-1))
    lab = labels.reshape(-1) != -100
    assert ((a[lab] > 0) & (a[lab] < 1)).all()
    assert (a[~lab] == 1).all()
    loss(s, t, labels=labels)
    assert 0 < float(loss.last_alpha) < 1


def test_generic_loss_properties():
    s, t, labels, mask = _inputs()
    # masked rows change neither the value nor the gradient, even with ±1e3 / −inf in them
    s1 = s.clone().requires_grad_(True)
    clean = L.get_loss("tgeo_kd")(s1, t, labels=labels, mask=mask)
    clean.backward()
    dirty_s, dirty_t = s.clone(), t.clone()
    dirty_s[~mask] = torch.tensor([1e3, -1e3, -math.inf, 0, 1, 2, 3], dtype=D)
    dirty_t[~mask] = -math.inf
    s2 = dirty_s.requires_grad_(True)
    dirty = L.get_loss("tgeo_kd")(s2, dirty_t, labels=labels, mask=mask)
    dirty.backward()
    assert float(dirty.detach()) == pytest.approx(float(clean.detach()), rel=1e-12)
    assert torch.isfinite(s2.grad).all()
    torch.testing.assert_close(s2.grad, s1.grad)
    # half precision is computed in float32, gradients come back in the input dtype
    sh = s.bfloat16().requires_grad_(True)
    out = L.get_loss("tgeo_kd")(sh, t.bfloat16(), labels=labels, mask=mask)
    out.backward()
    assert out.dtype == torch.float32 and sh.grad.dtype == torch.bfloat16
    # nothing counted: exactly 0, backward works
    s3 = s.clone().requires_grad_(True)
    zero = L.get_loss("tgeo_kd")(s3, t, labels=labels, mask=torch.zeros_like(mask))
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert s3.grad is None or not s3.grad.any()
    # non-negative; not 0 at S = T (the CE term)
    assert float(L.get_loss("tgeo_kd")(s, s.clone(), labels=labels)) > 0


def test_errors():
    s, t, labels, _ = _inputs()
    with pytest.raises(ValueError, match="needs labels"):
        L.get_loss("tgeo_kd")(s, t)
    with pytest.raises(ValueError, match="dense teacher"):
        L.get_loss("tgeo_kd")(s, TopK.from_logits(t, k=3), labels=labels)
    with pytest.raises(ValueError, match="same shape"):
        L.get_loss("tgeo_kd")(s, t[..., :5], labels=labels)
    for key, bad in [("temperature", -1.0), ("hidden", 0), ("meta_lr", 0.0),
                     ("meta_weight_decay", -1.0), ("seed", -1)]:  # fmt: skip
        with pytest.raises(ValueError, match=key):
            L.get_loss("tgeo_kd", **{key: bad})
    with pytest.raises(ValueError, match="no hyperparameter 'bogus'"):
        L.get_loss("tgeo_kd", bogus=1)
    with pytest.raises(ValueError, match="classification"):
        L.get_loss("tgeo_kd")(torch.zeros(1, 8193), torch.zeros(1, 8193), labels=torch.zeros(1))
    with pytest.raises(ValueError, match="built for 7 classes"):
        loss = L.get_loss("tgeo_kd")
        loss(s, t, labels=labels)
        loss(s[..., :5], t[..., :5], labels=labels.clamp(max=4))


# ------------------------------------------------------------------ the bilevel update
def _noisy_problem(noise=0.6, n=96, c=3, d=8):
    """Gaussian blobs; the teacher is right, most train labels are wrong, meta labels clean."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(c, d, generator=g) * 2

    def make(noisy):
        y = torch.randint(0, c, (n,), generator=g)
        x = (centers[y] + torch.randn(n, d, generator=g)).to(D)
        yn = y.clone()
        flip = torch.rand(n, generator=g) < noisy
        yn[flip] = (y[flip] + torch.randint(1, c, (int(flip.sum()),), generator=g)) % c
        return x, y, yn

    x, y_true, y_noisy = make(noise)
    xm, ym, _ = make(0.0)
    teacher = F.one_hot(y_true, c).to(D) * 6 - 3
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, c))
    return student.to(D), teacher, {"inputs": x, "labels": y_noisy}, {"inputs": xm, "labels": ym}


def _forward(model, batch):
    return model(batch["inputs"])


def test_meta_step_learns_to_trust_the_teacher_when_labels_are_noisy():
    student, teacher, train, meta = _noisy_problem()
    loss = TGeoKDLoss(temperature=2.0, hidden=32, meta_lr=3e-2)
    with torch.no_grad():
        z = student(train["inputs"])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    a0 = loss.fusion_ratio(z, teacher, train["labels"]).mean()
    phi0 = [p.clone() for p in loss.fusion_parameters()]
    metas = [loss.meta_step(student, _forward, train, teacher, meta, inner_lr=1.0)
             for _ in range(20)]  # fmt: skip
    a1 = loss.fusion_ratio(z, teacher, train["labels"]).mean()
    assert any(not torch.equal(a, b) for a, b in zip(phi0, loss.fusion_parameters()))
    assert float(a1) > float(a0) + 0.1  # towards KD
    assert metas[-1] < metas[0] - 0.1  # the held-out CE after the virtual step falls
    # the student itself (weights, batch-norm statistics, gradients) is untouched
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in student.parameters())


def test_meta_step_reduce_maps_the_fusion_gradients():
    student, teacher, train, meta = _noisy_problem(n=24)
    loss = TGeoKDLoss(hidden=8, meta_lr=1e-2)
    loss(student(train["inputs"]).detach(), teacher, labels=train["labels"])
    phi0 = [p.clone() for p in loss.fusion_parameters()]
    seen = []

    def reduce(g):
        seen.append(g.shape)
        return torch.zeros_like(g)  # e.g. an all-reduce; here: no update at all

    loss.meta_step(student, _forward, train, teacher, meta, inner_lr=0.5, reduce=reduce)
    assert len(seen) == 4
    for p, q in zip(phi0, loss.fusion_parameters()):
        assert torch.equal(p, q)


def test_meta_step_errors():
    student, teacher, train, meta = _noisy_problem(n=12)
    loss = TGeoKDLoss()
    with pytest.raises(ValueError, match="inner_lr"):
        loss.meta_step(student, _forward, train, teacher, meta, inner_lr=0.0)
    unlabelled = {**meta, "labels": torch.full_like(meta["labels"], -100)}
    with pytest.raises(ValueError, match="meta_batch has no labelled row"):
        loss.meta_step(student, _forward, train, teacher, unlabelled, inner_lr=0.1)
    dual = wrap_dual_head(student)
    with pytest.raises(ValueError, match="dual-head"):
        loss.meta_step(dual, _forward, train, teacher, meta, inner_lr=0.1)


def test_fusion_state_round_trip_through_safetensors(tmp_path):
    student, teacher, train, meta = _noisy_problem(n=24)
    loss = TGeoKDLoss(hidden=8, meta_lr=1e-2)
    assert loss.fusion_state() == {}  # nothing built before the first call
    with torch.no_grad():
        loss(student(train["inputs"]), teacher, labels=train["labels"])  # eval: no update
    loss.train()
    loss(student(train["inputs"]).detach(), teacher, labels=train["labels"])  # class means
    for _ in range(3):
        loss.meta_step(student, _forward, train, teacher, meta, inner_lr=0.5)
    state = loss.fusion_state()
    assert {"net.0.weight", "class_sum", "class_count", "meta_steps", "adam.0.exp_avg"} <= set(
        state
    )
    assert int(state["meta_steps"]) == 3 and float(state["class_count"].sum()) == 24
    save_file(state, str(tmp_path / "tgeo.safetensors"))
    other = TGeoKDLoss(hidden=8, meta_lr=1e-2)
    other.load_fusion_state(load_file(str(tmp_path / "tgeo.safetensors")))
    z = student(train["inputs"]).detach()
    torch.testing.assert_close(
        other.fusion_ratio(z, teacher, train["labels"]),
        loss.fusion_ratio(z, teacher, train["labels"]),
    )
    # Adam's moments were restored too: the next meta steps are the same
    a = loss.meta_step(student, _forward, train, teacher, meta, inner_lr=0.5)
    b = other.meta_step(student, _forward, train, teacher, meta, inner_lr=0.5)
    assert a == pytest.approx(b, rel=1e-12)
    for p, q in zip(loss.fusion_parameters(), other.fusion_parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="hidden=16"):
        TGeoKDLoss(hidden=16).load_fusion_state(state)


def test_the_students_optimizer_never_sees_the_fusion_net():
    student, teacher, train, meta = _noisy_problem(n=24)
    obj = Objective({"tgeo": {"loss": "tgeo_kd", "hidden": 8}, "ce": {"weight": 0.1}})
    out = obj(student(train["inputs"]), teacher, labels=train["labels"])
    out["loss"].backward()
    term = obj.terms["tgeo"]
    assert term.fusion_net is not None
    assert list(obj.parameters()) == [] and obj.state_dict() == {}
    assert all(p.grad is None for p in term.fusion_parameters())  # α is detached in the loss
    assert list(obj.meta_terms()) == ["tgeo"]
    term.meta_step(student, _forward, train, teacher, meta, inner_lr=0.5)
    state = obj.tensor_state()
    assert "tgeo.net.0.weight" in state and "tgeo.adam.0.exp_avg" in state
    fresh = Objective({"tgeo": {"loss": "tgeo_kd", "hidden": 8}, "ce": {"weight": 0.1}})
    fresh.load_tensor_state(state)
    torch.testing.assert_close(fresh.terms["tgeo"].fusion_net[0].weight, term.fusion_net[0].weight)
    with pytest.raises(ValueError, match="no fusion net"):
        Objective({"ce": {}}).load_tensor_state(state)


def test_trains_in_the_engine(tmp_path):
    """tgeo_kd as an objective term of the engine: finite terms, the student learns."""
    from mentor.config import load_config
    from mentor.data import build_data
    from mentor.engine import Distiller
    from mentor.teachers import OnlineTeacher

    bundle = build_data("random", {"n": 200, "in_features": 16, "num_classes": 4}, 0.25, 0)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 4)).eval()
    student = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = load_config({
        "name": "tgeo",
        "objective": {"tgeo_kd": {"temperature": 2.0, "hidden": 16}},
        "train": {"max_steps": 8, "batch_size": 32, "lr": 1e-2, "progress": False,
                  "log_every": 1},
        "output": {"dir": str(tmp_path / "run")},
    })  # fmt: skip
    d = Distiller(student, OnlineTeacher(teacher), cfg.objective, bundle.train, cfg)
    d.fit()
    losses = [r["loss"] for r in d.history if r["kind"] == "train"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]

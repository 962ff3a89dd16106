"""Few-step diffusion distillation objectives: reference values on small tensors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor, nn

from mentor.diffusion import objectives as O
from mentor.diffusion.schedules import VPSchedule

try:  # the shared 2-D denoiser; a local MLP stands in if it is missing
    from mentor.diffusion.denoisers import MLPDenoiser
except ImportError:  # pragma: no cover

    class MLPDenoiser(nn.Module):
        def __init__(self, dim=2, hidden=128, depth=3, time_dim=64):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(dim + 1, hidden),
                nn.SiLU(),
                nn.Linear(hidden, hidden),
                nn.SiLU(),
                nn.Linear(hidden, dim),
            )

        def forward(self, x, t):
            t = torch.as_tensor(t).float().reshape(-1, 1).expand(x.shape[0], 1) / 1000
            return self.net(torch.cat([x, t], 1))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


_SCHEDULES: dict[str, VPSchedule] = {}


def sched(pt: str = "epsilon") -> VPSchedule:
    if pt not in _SCHEDULES:
        _SCHEDULES[pt] = VPSchedule.default(prediction_type=pt)
    return _SCHEDULES[pt]


def _b(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class ConstX0(nn.Module):
    """Predicts the exact x0 of a single-point data set ``c`` (in the schedule's parameterisation)."""

    def __init__(self, schedule: VPSchedule, c: Tensor):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("c", c)
        self.dummy = nn.Parameter(torch.zeros((), dtype=c.dtype))

    def forward(self, x_t, t):
        x0 = self.c.expand_as(x_t) + 0 * self.dummy
        return O.x0_to_prediction(self.schedule, x0, x_t, t)


class ExactConsistency(nn.Module):
    """The exact consistency function of a single-point data set, through the objective's f."""

    def __init__(self, obj, c: Tensor):
        super().__init__()
        self.obj = obj
        self.register_buffer("c", c)
        self.dummy = nn.Parameter(torch.zeros((), dtype=c.dtype))

    def forward(self, x_t, t):
        sch = self.obj.schedule
        alpha, _ = sch.alpha_sigma(t)
        x_e = x_t / _b(alpha, x_t)
        eps = (x_e - self.c) / _b(O.edm_sigma(sch, t), x_t)
        f_star = self.c + self.obj.sigma_min * eps  # the ODE trajectory's point at sigma_min
        a, b = self.obj.output_coefficients(t)
        safe = torch.where(b > 0, b, torch.ones_like(b))
        x0 = torch.where(_b(b > 0, x_t).bool(), (f_star - _b(a, x_t) * x_e) / _b(safe, x_t), self.c)
        return O.x0_to_prediction(sch, x0 + 0 * self.dummy, x_t, t)


class GaussX0(nn.Module):
    """Analytic x0-predictor (posterior mean) of N(mean, std² I) data."""

    def __init__(self, schedule: VPSchedule, mean: Tensor):
        super().__init__()
        self.schedule = schedule
        self.mean = nn.Parameter(mean.clone())
        self.log_std = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        a, s = self.schedule.alpha_sigma(t)
        a, s = _b(a, x_t), _b(s, x_t)
        var = torch.exp(2 * self.log_std)
        x0 = self.mean + a * var / (a * a * var + s * s) * (x_t - a * self.mean)
        return O.x0_to_prediction(self.schedule, x0, x_t, t)


def mlp(seed: int, hidden: int = 32, depth: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return MLPDenoiser(dim=2, hidden=hidden, depth=depth, time_dim=16)


# ----------------------------------------------------------------------------- iCT pieces


def test_boundary_condition_and_coefficients():
    obj = O.ConsistencyDistillation(sched())
    t_min = torch.full((5,), obj.t_min)
    c_skip, c_out = obj.boundary_coefficients(t_min)
    assert torch.equal(c_skip, torch.ones(5, dtype=torch.float64))
    assert torch.equal(c_out, torch.zeros(5, dtype=torch.float64))
    a, b = obj.output_coefficients(t_min)
    assert torch.equal(a, torch.ones(5, dtype=torch.float64)) and torch.equal(
        b, torch.zeros(5, dtype=torch.float64)
    )
    model = mlp(0)
    x = torch.randn(5, 2)
    alpha = obj.schedule.alpha_sigma(t_min)[0]
    f = obj.consistency_fn(model, x, t_min)
    torch.testing.assert_close(
        f, x / alpha[:, None], rtol=0, atol=1e-6
    )  # f(x, σ_min) = x (EDM coords)
    # far from the boundary f is the network's x0 (c_skip → 0, B → 1)
    t_hi = torch.full((5,), obj.t_max)
    c_skip, c_out = obj.boundary_coefficients(t_hi)
    sig = O.edm_sigma(obj.schedule, t_hi)
    torch.testing.assert_close(c_skip, 0.25 / ((sig - obj.sigma_min) ** 2 + 0.25))
    torch.testing.assert_close(c_out, 0.5 * (sig - obj.sigma_min) / torch.sqrt(0.25 + sig**2))
    a, b = obj.output_coefficients(t_hi)
    assert float(a.abs().max()) < 1e-6 and abs(float(b[0]) - 1) < 1e-3
    assert 0.0064 < obj.sigma_min < 0.0065 and obj.t_min == 0 and obj.t_max == 990


def test_pseudo_huber_matches_hand_formula():
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    c = 0.00054 * math.sqrt(4)
    want = torch.sqrt(((x - y) ** 2).sum(1) + c * c) - c
    torch.testing.assert_close(O.pseudo_huber(x, y), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(
        O.pseudo_huber(x, y, c=0.3), torch.sqrt(((x - y) ** 2).sum(1) + 0.09) - 0.3
    )
    assert torch.equal(O.pseudo_huber(x, x), torch.zeros(3, dtype=torch.float64))


def test_ict_curriculum_values():
    K = 400_000  # K' = 400000 // 8 = 50000
    got = {
        k: O.ict_num_steps(k, K)
        for k in (0, 49_999, 50_000, 100_000, 150_000, 349_999, 350_000, 399_999)
    }
    assert got == {
        0: 11,
        49_999: 11,
        50_000: 21,
        100_000: 41,
        150_000: 81,
        349_999: 641,
        350_000: 1281,
        399_999: 1281,
    }
    assert O.ict_num_steps(10**9, K) == 1281
    obj = O.ConsistencyTraining(sched(), total_steps=800)
    obj.iteration = 100
    assert obj.current_steps() == 21
    assert O.ConsistencyTraining(sched(), discretization_steps=18).current_steps() == 18


def test_lognormal_interval_probabilities():
    sig = O.karras_sigmas(1281, 0.002, 80.0)
    assert float(sig[0]) == pytest.approx(0.002) and float(sig[-1]) == pytest.approx(80.0)
    p = O.lognormal_interval_probs(sig)
    assert p.shape == (1280,) and float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    density = p / (sig[1:].log() - sig[:-1].log())  # per unit log σ
    i = int(density.argmax())
    peak = 0.5 * (math.log(sig[i]) + math.log(sig[i + 1]))
    assert abs(peak - (-1.1)) < 0.02  # the mode of ln σ ~ N(P_mean = −1.1, 2²)
    # the VP-snapped grid keeps both properties
    obj = O.ConsistencyTraining(sched())
    for n in (11, 1281):
        g = obj.grid(n)
        assert bool((g[1:] > g[:-1]).all()) and int(g[0]) == 0 and int(g[-1]) == 990
        q = obj.interval_probs(n)
        assert float(q.sum()) == pytest.approx(1.0, abs=1e-12)
    s = O.edm_sigma(obj.schedule, obj.grid(1281))
    dens = obj.interval_probs(1281) / (s[1:].log() - s[:-1].log())
    j = int(dens.argmax())
    assert abs(0.5 * float(s[j].log() + s[j + 1].log()) + 1.1) < 0.1


# ----------------------------------------------------------------------------- progressive


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_progressive_target_is_exact_x0_and_loss_zero(pt):
    sch = sched(pt)
    c = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    teacher = ConstX0(sch, c)
    obj = O.ProgressiveDistillation(sch, student_steps=4)
    x0 = c.expand(8, 2).clone()
    s_grid = [*sch.timesteps(4).tolist(), -1]
    t_grid = [*sch.timesteps(8).tolist(), -1]
    assert t_grid[::2] == s_grid
    for i in range(4):  # every student step, including the last one onto clean data
        t, tm, tn = (torch.full((8,), v) for v in (s_grid[i], t_grid[2 * i + 1], s_grid[i + 1]))
        z = torch.randn(8, 2, dtype=torch.float64)  # any z_t: x̃ only depends on the teacher's x0
        target = obj.distillation_target(teacher, z, t, tm, tn)
        # 1e-6: the schedule's float32 α, σ satisfy α² + σ² = 1 only to ~1e-7 (v-prediction)
        torch.testing.assert_close(target, x0, rtol=0, atol=1e-6)
    loss, logs = obj.loss(ConstX0(sch, c), teacher, x0, torch.Generator().manual_seed(0))
    assert float(loss.detach()) < 1e-10 and logs["student_steps"] == 4
    # a wrong student is penalised with the truncated-SNR weight
    loss_bad, _ = obj.loss(ConstX0(sch, c + 0.1), teacher, x0, torch.Generator().manual_seed(0))
    assert float(loss_bad.detach()) >= 0.01 - 1e-6


def test_progressive_rounds_halve_and_promote():
    ps = O.ProgressiveSchedule(8, 1, iters_per_round=3)
    assert ps.rounds == [8, 4, 2, 1]
    assert [ps.student_steps(k) for k in (0, 2, 3, 8, 9, 100)] == [8, 8, 4, 2, 1, 1]
    assert [ps.round_ended(k) for k in (0, 3, 6, 9, 12)] == [False, True, True, True, False]
    student = mlp(1)
    teacher = O.ProgressiveSchedule.promote(student)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for p, q in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    with pytest.raises(ValueError, match="power of two"):
        O.ProgressiveSchedule(6, 1, 10)

    sch = sched("v_prediction")
    obj = O.ProgressiveDistillation(sch, student_steps=4, iters_per_round=2)
    student, teacher = mlp(2), mlp(3).requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 2)
    steps = [obj.train_step(student, teacher, x0, opt, g) for _ in range(5)]
    assert [s["student_steps"] for s in steps] == [4, 2, 2, 1, 1]
    assert [s.get("promoted", False) for s in steps] == [False, True, False, True, False]
    promoted = obj.current_teacher(teacher)
    assert promoted is not teacher and obj.aux_modules() == [promoted]
    assert obj.train_step(student, None, x0, opt, g)["student_steps"] == 1  # owns its teacher now
    assert obj.sample(student, torch.randn(3, 2)).shape == (3, 2)


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["consistency_distillation", "consistency_training"])
def test_consistency_loss_zero_for_exact_consistency_function(kind, pt):
    sch = sched(pt)
    c = torch.tensor([[0.4, -0.9]], dtype=torch.float64)
    obj = O.build_objective(kind, schedule=sch, discretization_steps=40)
    teacher = ConstX0(sch, c)  # its one-step DDIM ODE is exact on a single-point data set
    student = ExactConsistency(obj, c)
    x0 = c.expand(64, 2).clone()
    loss, logs = obj.loss(student, teacher, x0, torch.Generator().manual_seed(0))
    assert float(loss.detach()) < 1e-9 and logs["grid_points"] == 40
    # the teacher's own denoiser is not a consistency function: positive loss
    loss_bad, _ = obj.loss(ConstX0(sch, c + 0.05), teacher, x0, torch.Generator().manual_seed(0))
    assert float(loss_bad.detach()) > 1e-4


def test_consistency_ema_target_and_sampling():
    sch = sched("v_prediction")
    obj = O.ConsistencyDistillation(sch, target_ema=0.5)
    student, teacher = mlp(4), mlp(5).requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x0 = torch.randn(16, 2)
    before = [p.clone() for p in student.parameters()]
    obj.train_step(student, teacher, x0, opt, torch.Generator().manual_seed(0))
    (target,) = obj.aux_modules()
    for pt_, p0, p1 in zip(target.parameters(), before, student.parameters()):
        torch.testing.assert_close(pt_, 0.5 * p0 + 0.5 * p1)
    wrapped = obj.as_x0_model(student)
    t = torch.full((4,), 500)
    xt = torch.randn(4, 2)
    torch.testing.assert_close(wrapped(xt, t), obj.consistency_fn(student, xt, t))
    out = obj.sample(
        student, torch.randn(4, 2), torch.Generator().manual_seed(1), timesteps=[990, 400]
    )
    assert out.shape == (4, 2) and bool(torch.isfinite(out).all())


# ----------------------------------------------------------------------------- Hyper-SD TSCD


def test_tscd_segments_and_exact_zero_loss():
    sch = sched("v_prediction")
    obj = O.TrajectorySegmentedCD(sch, segments=(8, 4, 2, 1), iters_per_stage=2)
    assert obj.boundaries(4).tolist() == [-1, 249, 499, 749, 999]
    t = torch.tensor([999, 750, 749, 500, 499, 0])
    assert obj.segment_start(t, 4).tolist() == [749, 749, 499, 499, 249, -1]
    assert obj.segment_start(t, 1).tolist() == [-1] * 6
    c = torch.tensor([[1.1, 0.2]], dtype=torch.float64)
    x0 = c.expand(32, 2).clone()
    for k_iter in (0, 6):  # 8 segments, then one (plain CD onto clean data)
        obj.iteration = k_iter
        loss, logs = obj.loss(
            ConstX0(sch, c), ConstX0(sch, c), x0, torch.Generator().manual_seed(0)
        )
        assert float(loss.detach()) < 1e-12 and logs["segments"] == (8 if k_iter == 0 else 1)
    obj.iteration = 0
    loss_bad, _ = obj.loss(
        ConstX0(sch, c + 0.1), ConstX0(sch, c), x0, torch.Generator().manual_seed(0)
    )
    assert float(loss_bad.detach()) > 1e-6


# ----------------------------------------------------------------------------- DMD2


def test_dmd2_zero_generator_gradient_when_fake_equals_real():
    sch = sched("sample")
    student, teacher = mlp(6), mlp(7).requires_grad_(False)
    obj = O.DMD2(sch)  # fake score = a copy of the teacher, not updated
    loss, logs = obj.loss(student, teacher, torch.randn(16, 2), torch.Generator().manual_seed(0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and logs["dm_grad_norm"] == 0.0
    for p in student.parameters():
        assert p.grad is not None and int(torch.count_nonzero(p.grad)) == 0


def test_dmd2_moves_generator_toward_gaussian_mean():
    sch = sched("sample")
    mu = torch.tensor([2.0, -1.0])
    teacher = GaussX0(sch, mu).requires_grad_(False)
    student = mlp(8)
    obj = O.DMD2(sch, fake_updates=5, fake_lr=0.1, max_grad_norm=None)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2) + mu

    def gen_mean():
        return obj.sample(
            student, torch.randn(512, 2, generator=torch.Generator().manual_seed(9))
        ).mean(0)

    start = float((gen_mean() - mu).norm())
    history = [obj.train_step(student, teacher, x0, opt, g) for _ in range(40)]
    end = float((gen_mean() - mu).norm())
    assert end < 0.5 * start, (start, end)
    assert obj.fake_score is not teacher and obj.aux_modules() == [obj.fake_score]
    assert len(obj.history) == 40 * 5
    for key in ("fake_loss", "fake_grad_norm", "grad_norm", "loss_dm", "diverged"):
        assert key in history[-1]
    assert not obj.diverged(history, warn=False)


def test_fake_loss_divergence_warning():
    flat = [1.0] * 100
    assert not O.fake_loss_diverged(flat, window=20, factor=3.0)
    with pytest.warns(RuntimeWarning, match="grew"):
        assert O.fake_loss_diverged(flat + [4.0] * 20, window=20, factor=3.0)
    logs = [{"fake_loss": 1.0}] * 10 + [{"fake_loss": 1.0 + 0.05 * i} for i in range(30)]
    assert not O.fake_loss_diverged(logs, window=10, factor=3.0)  # slow rise: not flagged
    with pytest.warns(RuntimeWarning, match="within 10 updates"):
        assert O.fake_loss_diverged(logs + [{"fake_loss": 20.0}] * 10, window=10, factor=3.0)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert O.fake_loss_diverged([1.0, float("nan")], window=5)
    assert not O.fake_loss_diverged([1.0] * 10, window=20)  # too short to judge


# ----------------------------------------------------------------------------- embedding MMD


def test_mmd_values_and_embedding_objective():
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    assert abs(float(O.mmd_rbf(x, x.clone()))) < 1e-6
    near = float(O.mmd_rbf(x, torch.randn(32, 3)))
    far = float(O.mmd_rbf(x, torch.randn(32, 3) + 3))
    assert 0 < near < far
    assert float(O.mmd_rbf(x, torch.randn(32, 3), unbiased=True)) < near
    sch = sched("sample")
    obj = O.EmbeddingMMD(sch, features="random", num_feature_nets=2, feature_width=32)
    student = mlp(9)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2) * 0.5 + torch.tensor([1.5, -1.0])
    first = obj.train_step(student, None, x0, opt, g)["loss"]
    for _ in range(30):
        last = obj.train_step(student, None, x0, opt, g)["loss"]
    assert last < 0.5 * first
    assert len(obj.aux_modules()) == 2 and obj.aux_parameters() == []


# ----------------------------------------------------------------------------- resume


def _resume_case(name: str):
    sch = sched("v_prediction")
    params = {
        "progressive": dict(student_steps=4, iters_per_round=2),
        "consistency_distillation": dict(target_ema=0.9, total_steps=4),
        "consistency_training": dict(total_steps=4),
        "dmd2": dict(gan_weight=0.1, fake_updates=2, fake_lr=1e-3),
        "embedding_mmd": dict(features="random", num_feature_nets=1, feature_width=16, num_steps=2),
        "hyper_sd_tscd": dict(segments=(4, 2, 1), iters_per_stage=2, target_ema=0.5),
    }[name]
    return sch, params


@pytest.mark.parametrize("name", sorted(O.DIFFUSION_OBJECTIVES))
def test_state_dict_round_trip_resumes_exactly(name):
    sch, params = _resume_case(name)
    teacher = mlp(10).requires_grad_(False)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))

    def fresh():
        student = mlp(11)
        return (
            student,
            torch.optim.Adam(student.parameters(), lr=1e-3),
            O.build_objective(name, schedule=sch, **params),
        )

    student, opt, obj = fresh()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        obj.train_step(student, teacher, x0, opt, g)
    buf = io.BytesIO()
    torch.save(
        {
            "obj": obj.state_dict(),
            "student": student.state_dict(),
            "opt": opt.state_dict(),
            "rng": g.get_state(),
        },
        buf,
    )
    want = [obj.train_step(student, teacher, x0, opt, g) for _ in range(3)]
    want_aux = [p.clone() for m in obj.aux_modules() for p in m.parameters()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    student2, opt2, obj2 = fresh()
    student2.load_state_dict(ckpt["student"])
    opt2.load_state_dict(ckpt["opt"])
    obj2.load_state_dict(ckpt["obj"])  # before set-up: applied on the first call
    assert obj2.state_dict()["iteration"] == 3
    g2 = torch.Generator()
    g2.set_state(ckpt["rng"])
    got = [obj2.train_step(student2, teacher, x0, opt2, g2) for _ in range(3)]
    assert got == want
    got_aux = [p for m in obj2.aux_modules() for p in m.parameters()]
    assert len(got_aux) == len(want_aux)
    for a, b in zip(got_aux, want_aux):
        assert torch.equal(a, b)
    for a, b in zip(student2.parameters(), student.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- errors / registry


def test_registry_and_errors_name_the_setting():
    assert set(O.DIFFUSION_OBJECTIVES) == {
        "progressive",
        "consistency_distillation",
        "consistency_training",
        "dmd2",
        "embedding_mmd",
        "hyper_sd_tscd",
    }
    with pytest.raises(
        ValueError, match=r"unknown diffusion objective 'dmd3'; did you mean 'dmd2'"
    ):
        O.build_objective("dmd3")
    with pytest.raises(ValueError, match=r"'fake_update' \(did you mean 'fake_updates'\?\)"):
        O.build_objective("dmd2", fake_update=3)
    with pytest.raises(ValueError, match=r"dmd2\.fake_updates must be at least 1"):
        O.build_objective("dmd2", fake_updates=0)
    with pytest.raises(
        ValueError, match=r"consistency_training\.loss_type .*did you mean 'pseudo_huber'"
    ):
        O.build_objective("consistency_training", loss_type="pseudo-huber")
    # NFE <= 0
    for name, kw in [
        ("progressive", {"student_steps": 0}),
        ("dmd2", {"num_steps": 0}),
        ("embedding_mmd", {"num_steps": -1}),
        ("hyper_sd_tscd", {"ode_steps": 0}),
        ("embedding_mmd", {"teacher_steps": 0}),
    ]:
        key = next(iter(kw))
        with pytest.raises(ValueError, match=rf"{name}\.{key} must be at least 1.*NFE"):
            O.build_objective(name, schedule=sched(), **kw)
    with pytest.raises(ValueError, match="generator_timesteps must hold at least 1"):
        O.build_objective("dmd2", schedule=sched(), generator_timesteps=[])
    with pytest.raises(ValueError, match=r"student_steps=600 needs 2·600"):
        O.build_objective("progressive", schedule=sched(), student_steps=600)
    with pytest.raises(ValueError, match="NFE"):
        O.TrajectorySegmentedCD(sched()).sample(mlp(0), torch.randn(2, 2), steps=0)
    # student / teacher shape mismatch
    obj = O.build_objective("consistency_distillation", schedule=sched())
    torch.manual_seed(0)
    wide = MLPDenoiser(dim=3, hidden=8, depth=1, time_dim=8)
    with pytest.raises(
        ValueError, match=r"the student was built for data of shape 3 but the batch x0 is 2"
    ):
        obj.loss(wide, mlp(0), torch.randn(4, 2))
    with pytest.raises(ValueError, match="the teacher returned shape 4x3 for inputs of shape 4x2"):
        O.build_objective("progressive", schedule=sched()).loss(
            mlp(0), lambda x, t: torch.zeros(x.shape[0], 3), torch.randn(4, 2)
        )
    with pytest.raises(ValueError, match=r"x0 must be a floating \[B, \.\.\.\] batch, got 4"):
        O.build_objective("consistency_training", schedule=sched()).loss(
            mlp(0), None, torch.randn(4)
        )
    with pytest.raises(ValueError, match="dmd2 needs a teacher"):
        O.build_objective("dmd2", schedule=sched()).loss(mlp(0), None, torch.randn(4, 2))
    with pytest.raises(ValueError, match="state_dict is for objective 'dmd2', not 'progressive'"):
        O.build_objective("progressive", schedule=sched()).load_state_dict(
            O.build_objective("dmd2", schedule=sched()).state_dict()
        )
    assert "fake_updates" in O.objective_params("dmd2")

"""mentor.diffusion core: schedules, samplers, denoisers, data, fitting and metrics."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from mentor.diffusion.data import (
    digits_images,
    fashion_images,
    gaussian_mixture_2d,
    mixture_means,
)
from mentor.diffusion.denoisers import MLPDenoiser, check_compatible, unet
from mentor.diffusion.fit import fit_denoiser
from mentor.diffusion.metrics import (
    frechet_distance,
    latency_per_sample,
    mmd_rbf,
    mode_coverage,
    precision_recall,
)
from mentor.diffusion.samplers import few_step_sample, sample
from mentor.diffusion.schedules import PREDICTION_TYPES, VPSchedule


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _batch(shape=(64, 1, 8, 8), seed=0, T=1000):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, T, (shape[0],), generator=g)
    return x0, noise, t


# ---------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear"])
def test_add_noise_matches_diffusers_exactly(beta_schedule):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    for sch in (VPSchedule.default(beta_schedule=beta_schedule), VPSchedule.from_scheduler(ref)):
        assert sch.alphas_cumprod.dtype == torch.float64
        assert torch.equal(sch.alphas_cumprod.float(), ref.alphas_cumprod)
        for shape in ((64, 1, 8, 8), (64, 2)):
            x0, noise, t = _batch(shape)
            assert torch.equal(sch.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))


def test_alpha_sigma_and_clean_timestep():
    sch = VPSchedule.default()
    a, s = sch.alpha_sigma(torch.tensor([-1, 0, 999]))
    assert a.dtype == s.dtype == torch.float32
    assert a[0] == 1 and s[0] == 0
    torch.testing.assert_close(a**2 + s**2, torch.ones(3))
    assert a[2] < 1e-4  # the cosine schedule ends (almost) at pure noise
    x0, noise, _ = _batch((3, 2))
    assert torch.equal(sch.add_noise(x0, noise, torch.full((3,), -1)), x0)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        sch.alpha_sigma(torch.tensor([1000]))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_parameterisations_round_trip(prediction_type):
    sch = VPSchedule.default(prediction_type=prediction_type)
    assert sch.prediction_type == prediction_type
    x0, noise, t = _batch()
    t[:4] = torch.tensor([0, 1, 998, 999])
    x_t = sch.add_noise(x0, noise, t)
    target = sch.target(x0, noise, t)
    # eps -> x0 divides by alpha_t (5e-5 at t=999): compare relative to that amplification
    a, _ = sch.alpha_sigma(t)
    err = (sch.to_x0(target, x_t, t) - x0).abs().amax(dim=(1, 2, 3)) * a
    assert float(err.max()) < 1e-6
    keep = t < 990  # eps from a sample prediction divides by sigma, tiny at t=0
    keep &= t > 5
    torch.testing.assert_close(sch.to_eps(target, x_t, t)[keep], noise[keep], atol=1e-4, rtol=1e-4)
    expected = {"epsilon": noise, "sample": x0}.get(prediction_type)
    if expected is None:  # v = alpha * eps - sigma * x0
        a, s = sch.alpha_sigma(t)
        expected = a[:, None, None, None] * noise - s[:, None, None, None] * x0
    torch.testing.assert_close(target, expected)


def test_ddim_step_with_true_x0_lands_on_the_forward_process():
    sch = VPSchedule.default()
    x0, noise, t = _batch()
    t = t.clamp_min(1)
    s = t - torch.randint(1, 400, t.shape, generator=torch.Generator().manual_seed(1))
    s = s.clamp_min(-1)
    s[:3] = -1
    x_t = sch.add_noise(x0, noise, t)
    x_s = sch.ddim_step(x_t, x0, t, s)
    torch.testing.assert_close(x_s, sch.add_noise(x0, noise, s), atol=2e-5, rtol=1e-5)
    assert torch.equal(x_s[:3], x0[:3])  # s = -1 returns x0_pred
    with pytest.raises(ValueError, match="s < t"):
        sch.ddim_step(x_t, x0, t, t)


def test_timesteps_trailing():
    sch = VPSchedule.default()
    assert sch.timesteps(4).tolist() == [999, 749, 499, 249]
    assert sch.timesteps(1).tolist() == [999]
    assert sch.timesteps(3).tolist() == [999, 666, 332]
    ts = sch.timesteps(50)
    assert ts.dtype == torch.long and len(ts) == 50 and ts[-1] == 19
    with pytest.raises(ValueError, match="NFE must be at least 1"):
        sch.timesteps(0)


# ---------------------------------------------------------------------------- samplers


def _random_mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return MLPDenoiser(**kw).eval()


def test_ddim_sampler_equals_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    sch = VPSchedule.default(prediction_type="v_prediction")
    model = _random_mlp()
    x = sample(model, sch, (16, 2), 10, generator=torch.Generator().manual_seed(3))
    ref = sch.make_scheduler(
        DDIMScheduler, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
    )
    ref.set_timesteps(10)
    assert ref.timesteps.tolist() == sch.timesteps(10).tolist()
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in ref.timesteps:
            y = ref.step(model(y, t.expand(16)), t, y, eta=0.0).prev_sample
    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_euler_matches_ddim_and_dpm_runs():
    # Euler on the sigma-space probability-flow ODE is DDIM (Song et al., 2021, sec. 4.3)
    sch = VPSchedule.default(prediction_type="v_prediction")
    model = _random_mlp(1)
    g = torch.Generator
    x_ddim = sample(model, sch, (32, 2), 8, generator=g().manual_seed(0))
    x_euler = sample(model, sch, (32, 2), 8, method="euler", generator=g().manual_seed(0))
    torch.testing.assert_close(x_euler, x_ddim, atol=1e-3, rtol=1e-3)
    x_dpm = sample(model, sch, (32, 2), 8, method="dpm_multistep", generator=g().manual_seed(0))
    assert x_dpm.shape == (32, 2) and torch.isfinite(x_dpm).all()
    # chunking does not change the samples
    x_chunks = sample(model, sch, (32, 2), 8, generator=g().manual_seed(0), batch_size=5)
    torch.testing.assert_close(x_chunks, x_ddim)


def test_ddim_clips_x0_as_the_scheduler_config_says():
    from diffusers import DDPMScheduler

    class Far(torch.nn.Module):  # predicts the clean sample 5.0 everywhere
        def forward(self, x, t):
            return torch.full_like(x, 5.0)

    clipped = VPSchedule.from_scheduler(DDPMScheduler(prediction_type="sample"))  # clip_sample=True
    assert torch.equal(sample(Far(), clipped, (3, 2), 4), torch.ones(3, 2))
    assert torch.equal(sample(Far(), clipped, (3, 2), 4, clip_x0=False), torch.full((3, 2), 5.0))
    assert torch.equal(sample(Far(), clipped, (3, 2), 4, clip_x0=2.0), torch.full((3, 2), 2.0))
    free = VPSchedule.default(prediction_type="sample")  # clip_sample=False
    assert torch.equal(sample(Far(), free, (3, 2), 4), torch.full((3, 2), 5.0))


def test_sampler_errors_name_the_problem():
    sch = VPSchedule.default()
    model = _random_mlp()
    with pytest.raises(ValueError, match="NFE must be at least 1"):
        sample(model, sch, (4, 2), 0)
    with pytest.raises(ValueError, match="NFE must be at least 1"):
        few_step_sample(model, sch, (4, 2), [])
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*ddim, euler, dpm_multistep"):
        sample(model, sch, (4, 2), 4, method="heun")
    with pytest.raises(ValueError, match="1000 training timesteps"):
        sample(model, sch, (4, 2), 1001)
    with pytest.raises(ValueError, match="descending"):
        few_step_sample(model, sch, (4, 2), [500, 999])
    # a teacher scheduler config that a sampler cannot produce
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    learned = VPSchedule.from_scheduler(DDPMScheduler(variance_type="learned_range"))
    for method in ("ddim", "euler", "dpm_multistep"):
        with pytest.raises(ValueError, match=f"sampler '{method}'.*variance_type='learned_range'"):
            sample(model, learned, (4, 2), 4, method=method)
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler has no alphas_cumprod"):
        VPSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        VPSchedule.default(prediction_type="flow_prediction")


def test_few_step_sample_consistency_and_ddim_modes():
    sch = VPSchedule.default(prediction_type="v_prediction")
    target = torch.tensor([0.5, -0.25])

    class Oracle(torch.nn.Module):  # a perfect one-point consistency function
        def forward(self, x, t):
            return target.expand_as(x)

    x, nfe = few_step_sample(
        Oracle(), sch, (6, 2), [999, 500, 100], generator=torch.Generator().manual_seed(0)
    )
    assert nfe == 3
    torch.testing.assert_close(x, target.expand(6, 2))
    # a teacher used as a "student" with deterministic DDIM re-noising is the DDIM sampler
    model = _random_mlp(2)
    ts = sch.timesteps(5)
    y, nfe = few_step_sample(
        model,
        sch,
        (8, 2),
        ts,
        predicts="schedule",
        renoise="ddim",
        generator=torch.Generator().manual_seed(4),
    )
    ref = sample(model, sch, (8, 2), 5, generator=torch.Generator().manual_seed(4))
    assert nfe == 5
    torch.testing.assert_close(y, ref)


# ---------------------------------------------------------------------------- teacher on ring8


def test_teacher_mlp_on_ring8_samples_the_mixture():
    std = 0.1
    data = gaussian_mixture_2d("ring8", 4000, std, seed=0)
    fresh = gaussian_mixture_2d("ring8", 800, std, seed=1)
    sch = VPSchedule.default(prediction_type="v_prediction")
    model = _random_mlp(0, hidden=64, depth=3)
    losses = fit_denoiser(model, sch, data, steps=400, batch_size=512, lr=3e-3, seed=0)
    assert len(losses) == 400 and np.mean(losses[-50:]) < np.mean(losses[:50])
    gen = torch.Generator
    x50 = sample(model, sch, (800, 2), 50, generator=gen().manual_seed(0))
    x1 = sample(model, sch, (800, 2), 1, generator=gen().manual_seed(0))
    mmd50, mmd1 = mmd_rbf(x50, fresh.points), mmd_rbf(x1, fresh.points)
    mmd_noise = mmd_rbf(torch.randn(800, 2, generator=gen().manual_seed(9)), fresh.points)
    assert mmd50 < 0.5 * mmd_noise and mmd50 < 0.05 * mmd1
    cov = mode_coverage(x50, fresh.means, std, k=3)
    assert cov.modes_covered >= 6 and cov.high_quality > 0.4
    x_dpm = sample(model, sch, (800, 2), 20, method="dpm_multistep", generator=gen().manual_seed(0))
    assert mmd_rbf(x_dpm, fresh.points) < 0.5 * mmd_noise


def test_fit_is_deterministic_and_ema_is_loaded():
    data = gaussian_mixture_2d("ring8", 256, 0.05, seed=0)
    sch = VPSchedule.default(num_train_timesteps=100)
    runs = []
    for _ in range(2):
        m = _random_mlp(5, hidden=16, depth=2)
        runs.append((fit_denoiser(m, sch, data, steps=20, batch_size=32, lr=1e-3, seed=7), m))
    assert runs[0][0] == runs[1][0]
    m_ema = _random_mlp(5, hidden=16, depth=2)
    losses = fit_denoiser(m_ema, sch, data, steps=20, batch_size=32, lr=1e-3, seed=7, ema=0.9)
    assert losses == runs[0][0]  # EMA does not change the trajectory...
    w, w_ema = runs[0][1].out.weight, m_ema.out.weight
    assert not torch.equal(w, w_ema)  # ...but the averaged weights are what is kept
    assert not m_ema.training


# ---------------------------------------------------------------------------- data + denoisers


def test_mixtures_and_digits():
    a = gaussian_mixture_2d("ring8", 500, 0.05, seed=3)
    b = gaussian_mixture_2d("ring8", 500, 0.05, seed=3)
    assert torch.equal(a.points, b.points) and a.points.shape == (500, 2)
    assert a.means.shape == (8, 2) and set(a.labels.tolist()) == set(range(8))
    torch.testing.assert_close(a.means.norm(dim=1), torch.ones(8))
    resid = a.points - a.means[a.labels]
    assert abs(float(resid.std()) - 0.05) < 0.005
    assert mixture_means("grid25").shape == (25, 2)
    with pytest.raises(ValueError, match="ring8, grid25"):
        gaussian_mixture_2d("spiral")
    tr, te = digits_images("train", seed=0), digits_images("test", seed=0)
    assert tr.shape[1:] == (1, 8, 8) and len(tr) + len(te) == 1797
    assert float(tr.min()) == -1.0 and float(tr.max()) == 1.0


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


def test_fashion_images_from_idx_and_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST", raising=False)
    monkeypatch.setattr("mentor.data.images.FASHION_MNIST_DIRS", ())
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_images(path=str(tmp_path / "nowhere"))
    imgs = np.zeros((5, 28, 28), np.uint8)
    imgs[:, 10:18, 10:18] = 255
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5))
    x, y = fashion_images(3, path=str(tmp_path), size=32, with_labels=True)
    assert x.shape == (3, 1, 32, 32) and len(y) == 3
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert float(x[:, :, 12:20, 12:20].min()) == 1.0  # the square moved by the 2-pixel pad


def test_unet_denoiser_and_shape_errors():
    den = unet(8, channels=1, block_out_channels=(16, 32), role="student")
    assert den.data_shape == (1, 8, 8)
    x = digits_images("test")[:4]
    out = den(x, torch.tensor([0, 10, 500, 999]))
    assert out.shape == x.shape
    with pytest.raises(
        ValueError,
        match=r"images are 1x28x28 but the UNet was built for 1x8x8 \(student\.params\.sample_size\)",
    ):
        den(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"3 channels .*student\.params\.channels"):
        den(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"teacher\.params\.sample_size=6 is not divisible by 4"):
        unet(6, block_out_channels=(16, 16, 16), role="teacher")
    mlp = MLPDenoiser(dim=2, role="student")
    with pytest.raises(ValueError, match=r"3-D points .*student\.params\.dim"):
        mlp(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    teacher = unet(28, block_out_channels=(16, 32), role="teacher")
    with pytest.raises(
        ValueError, match="student generates 1x8x8 data but the teacher 1x28x28.*sample_size=28"
    ):
        check_compatible(teacher, den)
    check_compatible(unet(8, block_out_channels=(16,)), den)


# ---------------------------------------------------------------------------- metrics


def test_mmd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g)
    same, shifted = mmd_rbf(x, y), mmd_rbf(x, y + 1.0)
    assert abs(same) < 0.05 * shifted and shifted > 0.3
    # the unbiased estimator by hand: x = {0, 1}, y = {0, 3}, one bandwidth of 1
    e = math.exp
    by_hand = e(-0.5) + e(-4.5) - 2 * (1 + e(-4.5) + e(-0.5) + e(-2)) / 4
    got = mmd_rbf(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [3.0]]), bandwidths=(1.0,))
    assert math.isclose(got, by_hand, rel_tol=1e-12)
    assert mmd_rbf(x, y + 1.0, bandwidths="median") > 0.05
    with pytest.raises(ValueError, match="features"):
        mmd_rbf(x, torch.zeros(4, 3))


def _exact_gaussian(n, mu, std, seed):
    """Samples whose empirical mean and (unbiased) covariance are exactly mu, diag(std^2)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = z @ np.linalg.inv(chol).T
    return z * np.asarray(std) + np.asarray(mu)


def test_frechet_distance():
    a = _exact_gaussian(500, [0.0, 1.0, 2.0], [1.0, 2.0, 0.5], 0)
    assert frechet_distance(a, a) < 1e-9
    b = _exact_gaussian(300, [1.0, 1.0, 0.0], [2.0, 0.5, 0.5], 1)
    closed = (1 + 0 + 4) + (1 - 2) ** 2 + (2 - 0.5) ** 2 + 0.0
    assert math.isclose(frechet_distance(a, b), closed, rel_tol=1e-9)
    # a non-diagonal case against scipy's sqrtm
    from scipy import linalg

    rng = np.random.default_rng(2)
    c, d = (
        rng.standard_normal((200, 4)) @ rng.standard_normal((4, 4)),
        rng.standard_normal((150, 4)),
    )
    s1, s2 = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    ref = ((c.mean(0) - d.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert math.isclose(frechet_distance(c, d), ref, rel_tol=1e-7)


def test_precision_recall_and_mode_coverage():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    pr = precision_recall(real, real + 20.0, k=3)
    assert pr.precision == 0.0 and pr.recall == 0.0
    half = torch.cat([real[:150], real[:150] + 20.0])  # fake: half on the data, half off
    assert precision_recall(real, half, k=3).precision == 0.5
    # mode dropping: real has two far-apart clusters, fake only one -> recall ~ 1/2
    two = torch.cat([real[:150] - 10.0, real[150:] + 10.0])
    pr = precision_recall(two, torch.randn(150, 8, generator=g) + 10.0, k=3)
    assert pr.precision > 0.8 and 0.4 <= pr.recall <= 0.5
    means = mixture_means("ring8")
    pts = torch.cat([means[:5] + 0.01, torch.full((5, 2), 5.0)])
    cov = mode_coverage(pts, means, std=0.05, k=3)
    assert cov.modes_covered == 5 and cov.coverage == 5 / 8 and cov.high_quality == 0.5
    assert cov.counts == [1, 1, 1, 1, 1, 0, 0, 0]


def test_latency_per_sample():
    calls = []
    sec = latency_per_sample(lambda: calls.append(1), n=10, repeats=3)
    assert len(calls) == 4 and 0 <= sec < 1e-3

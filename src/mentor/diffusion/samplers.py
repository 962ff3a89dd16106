"""Sampling from denoisers: many-step ODE samplers for teachers, few-step for students.

Every sampler calls ``denoiser(x_t, t)`` with ``t`` long ``[B]`` and interprets the output
through the :class:`~mentor.diffusion.schedules.VPSchedule`'s ``prediction_type``. One
denoiser call is one function evaluation (NFE).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mentor.diffusion.schedules import VPSchedule

METHODS = ("ddim", "euler", "dpm_multistep")


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


class _EvalMode:
    """Put a module in eval mode (and no-grad) for the duration, then restore its mode."""

    def __init__(self, model) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))
        self.no_grad = torch.no_grad()

    def __enter__(self):
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.no_grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        if self.was_training:
            self.model.train()
        return False


def _check_nfe(n: int) -> int:
    n = int(n)
    if n < 1:
        raise ValueError(f"NFE must be at least 1 (got {n} sampling steps)")
    return n


def _chunks(total: int, batch_size: int | None) -> list[int]:
    if batch_size is None:
        return [total]
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [min(batch_size, total - i) for i in range(0, total, batch_size)]


def _noise(shape, generator: torch.Generator | None) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def _clip(x0: Tensor, clip: float | None) -> Tensor:
    return x0 if clip is None else x0.clamp(-clip, clip)


def _ddim_chunk(denoiser, schedule: VPSchedule, x: Tensor, steps: int, clip) -> Tensor:
    ts = schedule.timesteps(steps).tolist()
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        x0 = _clip(schedule.to_x0(denoiser(x, tt).float(), x, tt), clip)
        x = schedule.ddim_step(x, x0, tt, torch.full_like(tt, s))
    return x


def _check_config(schedule: VPSchedule, method: str, clip_x0=None) -> None:
    """Refuse teacher scheduler configs these samplers cannot honour (dynamic thresholding:
    only ``ddim`` with an explicit ``clip_x0`` stands in for it)."""
    var = schedule.config.get("variance_type")
    if var in ("learned", "learned_range"):
        raise ValueError(
            f"sampler {method!r} cannot run this teacher: its scheduler config has "
            f"variance_type={var!r} (the model also outputs variances, 2x the channels); "
            f"mentor's samplers take a denoiser that outputs one {schedule.prediction_type!r} "
            f"prediction — wrap the teacher to return only its first half of channels"
        )
    if schedule.config.get("thresholding") and not (method == "ddim" and clip_x0 is not None):
        raise ValueError(
            f"sampler {method!r} does not apply dynamic thresholding, which this teacher's "
            f"scheduler config asks for (thresholding=True); use method='ddim' with clip_x0"
        )


def _make_scheduler(schedule: VPSchedule, method: str):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    over = {"timestep_spacing": "trailing", "prediction_type": schedule.prediction_type}
    if method == "euler":
        cls = EulerDiscreteScheduler
        over.update(timestep_type="discrete", final_sigmas_type="zero")
    else:
        cls = DPMSolverMultistepScheduler
        over.update(
            algorithm_type="dpmsolver++",
            solver_order=2,
            final_sigmas_type="zero",
            thresholding=False,
        )
    try:
        return schedule.make_scheduler(cls, **over)
    except (ValueError, NotImplementedError, TypeError) as e:
        raise ValueError(
            f"sampler {method!r} cannot be built from this teacher's scheduler config "
            f"(prediction_type={schedule.prediction_type!r}, "
            f"beta_schedule={schedule.config.get('beta_schedule')!r}): {e}"
        ) from None


def _diffusers_chunk(denoiser, scheduler, x: Tensor, steps: int, method: str) -> Tensor:
    with warnings.catch_warnings():  # diffusers' np.array(tensor) under NumPy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(steps, device="cpu")
    if len(scheduler.timesteps) != steps:
        raise ValueError(
            f"sampler {method!r} made {len(scheduler.timesteps)} timesteps for {steps} steps"
        )
    x = x * float(scheduler.init_noise_sigma)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if method == "euler" else x
        tt = torch.full((len(x),), int(round(float(t))), dtype=torch.long, device=x.device)
        out = denoiser(inp.to(x.device), tt).float()
        x = scheduler.step(out.cpu(), t, x.cpu()).prev_sample.to(tt.device)
    return x


def sample(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    schedule: VPSchedule,
    shape: Sequence[int],
    steps: int,
    *,
    method: str = "ddim",
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    clip_x0: float | bool | None = None,
) -> Tensor:
    """Draw ``shape[0]`` samples of shape ``shape[1:]`` from a (teacher) denoiser in ``steps`` NFE.

    * ``"ddim"``: deterministic DDIM (eta = 0) over ``schedule.timesteps(steps)`` (trailing
      spacing) by :meth:`VPSchedule.ddim_step` — Song, Meng & Ermon, "Denoising Diffusion
      Implicit Models" (2021). Equal to diffusers' ``DDIMScheduler`` (trailing, eta 0,
      ``set_alpha_to_one``) when ``steps`` divides ``T``; it also stays exact when it does not.
    * ``"euler"``: diffusers' ``EulerDiscreteScheduler`` on the same betas (the probability-
      flow ODE in sigma space, Karras et al., "Elucidating the Design Space of Diffusion-Based
      Generative Models", 2022).
    * ``"dpm_multistep"``: diffusers' ``DPMSolverMultistepScheduler``, 2nd-order DPM-Solver++
      (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
      Models", 2022).

    The initial noise is drawn on the CPU from ``generator`` (chunk by chunk, so results do not
    depend on the device), the denoiser runs on its parameters' device in eval mode without
    gradients. ``clip_x0`` clamps the x0 estimate to ``[-clip_x0, clip_x0]`` (ddim only);
    ``None`` follows the scheduler config (``clip_sample`` / ``clip_sample_range``, off for
    :meth:`VPSchedule.default`; euler and dpm_multistep never clip), ``False`` turns it off.
    """
    steps = _check_nfe(steps)
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(METHODS)}")
    if steps > schedule.num_train_timesteps:
        raise ValueError(
            f"{steps} sampling steps exceed the teacher's {schedule.num_train_timesteps} "
            f"training timesteps"
        )
    _check_config(schedule, method, clip_x0)
    if clip_x0 is None:
        cfg = schedule.config
        clip_x0 = (
            float(cfg.get("clip_sample_range", 1.0))
            if cfg.get("clip_sample") and method == "ddim"
            else None
        )
    elif clip_x0 is False:
        clip_x0 = None
    elif clip_x0 is True or float(clip_x0) <= 0:
        raise ValueError(f"clip_x0 must be a positive range, None or False, got {clip_x0!r}")
    elif method != "ddim":
        raise ValueError(f"clip_x0 is only supported by the 'ddim' sampler, not {method!r}")
    shape = tuple(int(s) for s in shape)
    if not shape or shape[0] < 1:
        raise ValueError(f"shape must be [N, ...] with N >= 1, got {shape}")
    device = _device_of(denoiser)
    noise = _noise(shape, generator)  # all at once: chunking does not change the samples
    out, start = [], 0
    with _EvalMode(denoiser):
        for m in _chunks(shape[0], batch_size):
            x = noise[start : start + m].to(device)
            start += m
            if method == "ddim":
                out.append(_ddim_chunk(denoiser, schedule, x, steps, clip_x0).cpu())
            else:
                # a fresh scheduler per chunk: multistep solvers keep state
                sch = _make_scheduler(schedule, method)
                out.append(_diffusers_chunk(denoiser, sch, x, steps, method).cpu())
    return torch.cat(out)


def _check_timesteps(schedule: VPSchedule, timesteps) -> list[int]:
    ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if not ts:
        raise ValueError("NFE must be at least 1 (no timesteps given)")
    T = schedule.num_train_timesteps
    if any(not 0 <= t < T for t in ts):
        raise ValueError(f"few-step timesteps must lie in [0, {T}), got {ts}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"few-step timesteps must be strictly descending, got {ts}")
    return ts


def few_step_sample(
    student: Callable[[Tensor, Tensor], Tensor],
    schedule: VPSchedule,
    shape: Sequence[int],
    timesteps: Sequence[int] | Tensor,
    *,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    predicts: str = "x0",
    renoise: str = "fresh",
    clip_x0: float | None = None,
) -> tuple[Tensor, int]:
    """Sample a distilled student at the listed (descending) ``timesteps``; returns ``(x, nfe)``.

    Multistep consistency sampling (Song, Dhariwal, Chen & Sutskever, "Consistency Models",
    2023, Algorithm 1): start from pure noise at ``timesteps[0]``; at each ``t_i``,
    ``x0 = student(x_t, t_i)``; then re-noise ``x0`` to ``t_{i+1}`` with fresh noise
    (``renoise="fresh"``) — the last ``x0`` is the sample. ``renoise="ddim"`` moves
    deterministically with :meth:`VPSchedule.ddim_step` instead, which is how
    progressive-distillation students are sampled (Salimans & Ho, "Progressive Distillation
    for Fast Sampling of Diffusion Models", 2022).

    ``predicts="x0"``: the student outputs the clean sample directly (consistency-style);
    ``predicts="schedule"``: it predicts like the teacher and ``schedule.to_x0`` converts.
    NFE = ``len(timesteps)``. The initial and re-noising noise come from ``generator`` on CPU.
    """
    ts = _check_timesteps(schedule, timesteps)
    if predicts not in ("x0", "schedule"):
        raise ValueError(f"predicts must be 'x0' or 'schedule', got {predicts!r}")
    if renoise not in ("fresh", "ddim"):
        raise ValueError(f"renoise must be 'fresh' or 'ddim', got {renoise!r}")
    shape = tuple(int(s) for s in shape)
    if not shape or shape[0] < 1:
        raise ValueError(f"shape must be [N, ...] with N >= 1, got {shape}")
    device = _device_of(student)
    chunks = _chunks(shape[0], batch_size)
    # x at t_0 is pure noise (exact when abar at t_0 is ~0, as at T - 1); noise is drawn for
    # the whole batch step by step, so chunking does not change the samples
    x_all = _noise(shape, generator)
    with _EvalMode(student):
        for i, t in enumerate(ts):
            last = i + 1 == len(ts)
            z_all = None if last or renoise != "fresh" else _noise(shape, generator)
            parts, start = [], 0
            for m in chunks:
                sl = slice(start, start + m)
                start += m
                x = x_all[sl].to(device)
                tt = torch.full((m,), t, dtype=torch.long, device=device)
                pred = student(x, tt).float()
                x0 = _clip(pred if predicts == "x0" else schedule.to_x0(pred, x, tt), clip_x0)
                if last:
                    parts.append(x0.cpu())
                    continue
                nt = torch.full_like(tt, ts[i + 1])
                if z_all is not None:
                    x = schedule.add_noise(x0, z_all[sl].to(device), nt)
                else:
                    x = schedule.ddim_step(x, x0, tt, nt)
                parts.append(x.cpu())
            x_all = torch.cat(parts)
    return x_all, len(ts)


def sampler_nfe(method: str, steps: int) -> int:
    """Function evaluations a teacher sampler spends for ``steps`` steps (one per step here)."""
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(METHODS)}")
    return _check_nfe(steps)


__all__ = ["METHODS", "few_step_sample", "sample", "sampler_nfe"]

"""Discrete variance-preserving noise schedules, shared by teachers, students and objectives.

Conventions used across :mod:`mentor.diffusion`:

* timesteps ``t`` are ``long`` tensors of shape ``[B]`` with values in ``[0, T)``; ``t = -1``
  means clean data (``alpha = 1``, ``sigma = 0``);
* per-example scalars of shape ``[B]`` broadcast over data of any shape ``[B, ...]``;
* a *denoiser* is any callable ``denoiser(x_t, t) -> prediction`` whose prediction is what
  ``schedule.target`` returns (noise, velocity or clean sample, per ``prediction_type``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-example ``[B]`` tensor reshaped to ``[B, 1, ...]`` to broadcast over ``like``."""
    v = v.to(device=like.device, dtype=like.dtype)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


@dataclass(eq=False)
class VPSchedule:
    """Discrete variance-preserving schedule (DDPM), built from a diffusers scheduler.

    ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` as in Ho et al., "Denoising
    Diffusion Probabilistic Models" (2020); velocity ``v = alpha * eps - sigma * x0`` as in
    Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (2022).
    ``alphas_cumprod`` is kept in float64; the float32 ``alpha``/``sigma`` are computed the way
    diffusers' ``DDPMScheduler.add_noise`` computes them, so :meth:`add_noise` matches it
    bit for bit.
    """

    num_train_timesteps: int
    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    betas: Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                f"got {self.prediction_type!r}"
            )
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() != self.num_train_timesteps:
            raise ValueError(
                f"alphas_cumprod has {ac.numel()} entries but num_train_timesteps is "
                f"{self.num_train_timesteps}"
            )
        if not ((ac > 0) & (ac <= 1)).all():
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        self.alphas_cumprod = ac
        if self.betas is None:
            prev = torch.cat([ac.new_ones(1), ac[:-1]])
            self.betas = 1 - ac / prev
        self.config = dict(self.config)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scheduler(cls, scheduler) -> VPSchedule:
        """From any diffusers scheduler with ``alphas_cumprod`` and a ``config``."""
        if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "config"):
            raise TypeError(
                f"{type(scheduler).__name__} has no alphas_cumprod/config; a discrete "
                f"diffusers scheduler (DDPMScheduler, DDIMScheduler, ...) is needed"
            )
        cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        betas = getattr(scheduler, "betas", None)
        return cls(
            num_train_timesteps=int(cfg.get("num_train_timesteps", len(scheduler.alphas_cumprod))),
            alphas_cumprod=torch.as_tensor(scheduler.alphas_cumprod).double(),
            prediction_type=str(cfg.get("prediction_type", "epsilon")),
            betas=None if betas is None else torch.as_tensor(betas).double(),
            config=cfg,
        )

    @classmethod
    def default(
        cls,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "epsilon",
    ) -> VPSchedule:
        """Build a diffusers ``DDPMScheduler`` (Ho et al., 2020) and wrap it."""
        from diffusers import DDPMScheduler

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                f"got {prediction_type!r}"
            )
        if int(num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        try:
            sched = DDPMScheduler(
                num_train_timesteps=int(num_train_timesteps),
                beta_schedule=beta_schedule,
                prediction_type=prediction_type,
                clip_sample=False,
                timestep_spacing="trailing",
            )
        except NotImplementedError as e:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r} ({e})") from None
        return cls.from_scheduler(sched)

    def make_scheduler(self, cls, **overrides):
        """A diffusers scheduler of class ``cls`` with this schedule's betas and config.

        Keys of the stored config that ``cls`` does not take are dropped; the betas are passed
        as ``trained_betas`` so the noise levels are the same whatever ``beta_schedule`` said.
        """
        import inspect

        accepted = set(inspect.signature(cls.__init__).parameters)
        kw = {k: v for k, v in self.config.items() if k in accepted}
        kw.update(
            num_train_timesteps=self.num_train_timesteps,
            trained_betas=self.betas.float().numpy().tolist(),
            prediction_type=self.prediction_type,
        )
        kw.pop("beta_schedule", None)
        kw.update(overrides)
        return cls(**{k: v for k, v in kw.items() if k in accepted})

    # ------------------------------------------------------------------ noise levels
    def _check_t(self, t: Tensor | int) -> Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError("timesteps must be integers in [0, T) or -1")
        t = t.long().reshape(-1) if t.dim() == 0 else t.long()
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps}) (or -1 for clean "
                f"data), got {int(t.min())}..{int(t.max())}"
            )
        return t

    def abar(self, t: Tensor | int) -> Tensor:
        """``alphas_cumprod[t]`` as float64 ``[B]`` (1 for ``t = -1``)."""
        t = self._check_t(t)
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return padded.to(t.device)[t + 1]

    def alpha_sigma(self, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` as float32 ``[B]``; ``t = -1`` gives ``(1, 0)``."""
        a = self.abar(t).float()
        return a.sqrt(), (1 - a).sqrt()

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ``abar / (1 - abar)`` (float64 ``[B]``; inf at ``t = -1``)."""
        a = self.abar(t)
        return a / (1 - a)

    # ------------------------------------------------------------------ parameterisations
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha_t * x0 + sigma_t * noise`` (the forward process)."""
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * x0 + _bcast(s, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a denoiser with this ``prediction_type`` is trained to predict."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * noise - _bcast(s, x0) * x0

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The clean-sample estimate implied by a prediction at ``(x_t, t)``."""
        if self.prediction_type == "sample":
            return pred
        a, s = self.alpha_sigma(t)
        a, s = _bcast(a, x_t), _bcast(s, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * pred) / a
        return a * x_t - s * pred

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise estimate implied by a prediction at ``(x_t, t)`` (undefined at ``t = -1``)."""
        if self.prediction_type == "epsilon":
            return pred
        a, s = self.alpha_sigma(t)
        a, s = _bcast(a, x_t), _bcast(s, x_t)
        if self.prediction_type == "v_prediction":
            return s * x_t + a * pred
        return (x_t - a * pred) / s.clamp_min(torch.finfo(s.dtype).tiny)

    def ddim_step(self, x_t: Tensor, x0_pred: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """Deterministic DDIM (eta = 0) from ``t`` to ``s < t``; ``s = -1`` returns ``x0_pred``.

        Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (2021): the noise implied by
        ``(x_t, x0_pred)`` is kept and ``x0_pred`` is re-noised to level ``s``.
        """
        t, s = self._check_t(t), self._check_t(s)
        if t.shape != s.shape and s.numel() == 1:
            s = s.expand_as(t)
        if (s >= t).any():
            raise ValueError("ddim_step needs s < t for every example")
        a_t, sig_t = self.alpha_sigma(t)
        a_s, sig_s = self.alpha_sigma(s)
        a_t, sig_t = _bcast(a_t, x_t), _bcast(sig_t, x_t)
        a_s, sig_s = _bcast(a_s, x_t), _bcast(sig_s, x_t)
        eps = (x_t - a_t * x0_pred) / sig_t
        return a_s * x0_pred + sig_s * eps

    def timesteps(self, n: int) -> Tensor:
        """``n`` evenly spaced long timesteps, descending, the first ``T - 1`` ("trailing").

        Trailing spacing as in Lin et al., "Common Diffusion Noise Schedules and Sample Steps
        are Flawed" (2024): ``round(arange(T, 0, -T/n)) - 1``.
        """
        n = int(n)
        if n < 1:
            raise ValueError(f"NFE must be at least 1, got {n}")
        T = self.num_train_timesteps
        if n > T:
            raise ValueError(f"cannot take {n} steps on a schedule of {T} timesteps")
        ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)).long() - 1
        return ts[:n]

    def describe(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction_type,
            "beta_schedule": self.config.get("beta_schedule"),
            "alpha_bar_last": float(self.alphas_cumprod[-1]),
        }


__all__ = ["PREDICTION_TYPES", "VPSchedule"]

"""Training a denoiser from data: the teacher side of the diffusion tasks."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mentor.diffusion.schedules import VPSchedule


def as_data_tensor(data) -> Tensor:
    """A ``[N, ...]`` tensor from a tensor, a ``Mixture2D``-like tuple or a ``TensorDataset``."""
    if isinstance(data, Tensor):
        x = data
    elif hasattr(data, "points"):
        x = data.points
    elif hasattr(data, "tensors"):
        x = data.tensors[0]
    elif isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        x = data[0]
    else:
        raise TypeError(
            f"data must be a tensor [N, ...] or a TensorDataset, got {type(data).__name__}"
        )
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"data must be a non-empty [N, ...] tensor, got shape {tuple(x.shape)}")
    return x.float()


def fit_denoiser(
    denoiser: nn.Module,
    schedule: VPSchedule,
    data,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    ema: float | None = None,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    progress: bool = False,
) -> list[float]:
    """Train ``denoiser`` with the DDPM objective; returns the per-step losses.

    Ho et al., "Denoising Diffusion Probabilistic Models" (2020): ``t ~ U{0..T-1}``,
    ``x_t = add_noise(x0, eps, t)``, loss ``MSE(denoiser(x_t, t), schedule.target(x0, eps, t))``
    (noise, velocity or sample per the schedule's ``prediction_type``), AdamW (Loshchilov &
    Hutter, "Decoupled Weight Decay Regularization", 2019). Batches, timesteps and noise come
    from one generator seeded by ``seed``, so runs are deterministic given the model's
    initial weights. With ``ema`` (e.g. 0.999) an exponential moving average of the weights
    is kept (decay warmed up as ``min(ema, (1 + k) / (10 + k))``) and loaded into
    ``denoiser`` at the end. The model is left in eval mode.
    """
    steps, batch_size = int(steps), int(batch_size)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if ema is not None and not 0 < ema < 1:
        raise ValueError(f"ema must be in (0, 1), got {ema}")
    x_all = as_data_tensor(data)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the denoiser has no trainable parameters")
    device = params[0].device
    x_all = x_all.to(device)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    shadow = copy.deepcopy(denoiser).requires_grad_(False) if ema is not None else None
    T, n = schedule.num_train_timesteps, len(x_all)
    denoiser.train()
    losses: list[float] = []
    from mentor.progress import Progress

    bar = Progress(steps, enabled=progress, label="fit denoiser", unit="steps")
    try:
        for k in range(steps):
            idx = torch.randint(0, n, (batch_size,), generator=g)
            x0 = x_all[idx.to(device)]
            t = torch.randint(0, T, (len(idx),), generator=g)
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = t.to(device)
            x_t = schedule.add_noise(x0, noise, t)
            pred = denoiser(x_t, t)
            loss = torch.mean((pred.float() - schedule.target(x0, noise, t)) ** 2)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the denoising loss became {loss.item()} at step {k}; lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if shadow is not None:
                decay = min(ema, (1 + k) / (10 + k))
                with torch.no_grad():
                    for ps, p in zip(shadow.parameters(), denoiser.parameters()):
                        ps.lerp_(p.detach(), 1 - decay)
            losses.append(loss.item())
            bar.update(k + 1, {"loss": losses[-1]})
    finally:
        bar.close()
    if shadow is not None:
        with torch.no_grad():
            for p, ps in zip(denoiser.parameters(), shadow.parameters()):
                p.copy_(ps)
            for b, bs in zip(denoiser.buffers(), shadow.buffers()):
                b.copy_(bs)
    denoiser.eval()
    return losses


__all__ = ["as_data_tensor", "fit_denoiser"]

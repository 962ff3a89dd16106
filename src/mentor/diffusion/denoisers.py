"""Denoisers following the ``denoiser(x_t, t) -> prediction`` convention (``t`` long ``[B]``).

* :class:`MLPDenoiser` for low-dimensional data (the 2-D mixtures of :mod:`.data`);
* :func:`unet` / :class:`UNetDenoiser`, a small diffusers ``UNet2DModel`` for images.

Every denoiser exposes ``data_shape`` (one example's shape) and ``role`` (``"teacher"``,
``"student"``, ...) so shape errors name the setting to change, e.g.
``student.params.sample_size``. :func:`check_compatible` refuses a student whose data shape
differs from its teacher's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _timesteps_for(x: Tensor, t: Tensor | int) -> Tensor:
    """``t`` as a long ``[B]`` tensor on ``x``'s device (a scalar is broadcast)."""
    t = torch.as_tensor(t, device=x.device)
    if t.is_floating_point():
        t = t.round()
    t = t.long()
    if t.dim() == 0 or t.numel() == 1:
        t = t.reshape(1).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(
            f"t must hold one timestep per example ([{x.shape[0]}]), got {tuple(t.shape)}"
        )
    return t


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding ``[B, dim]``.

    Vaswani et al., "Attention Is All You Need" (2017), as used for timesteps by Ho et al.,
    "Denoising Diffusion Probabilistic Models" (2020).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class MLPDenoiser(nn.Module):
    """An MLP denoiser for ``[B, dim]`` points with a sinusoidal time embedding.

    ``depth`` hidden layers of width ``hidden`` with SiLU; the (MLP-projected) time
    embedding is added to every hidden layer, a residual connection skips each after the
    first. Time conditioning by sinusoidal embeddings follows Ho et al., "Denoising Diffusion
    Probabilistic Models" (2020).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        time_dim: int = 64,
        *,
        role: str = "model",
    ) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth), ("time_dim", time_dim)):
            if int(v) < 1:
                raise ValueError(f"{role}.params.{name} must be at least 1, got {v}")
        self.dim, self.hidden, self.depth, self.time_dim = (
            int(dim),
            int(hidden),
            int(depth),
            int(time_dim),
        )
        self.role = role
        self.time_mlp = nn.Sequential(
            nn.Linear(self.time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.t_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            got = f"{x.shape[1]}-D points" if x.dim() == 2 else f"inputs of shape {tuple(x.shape)}"
            raise ValueError(
                f"data are {got} but the MLP denoiser was built for {self.dim}-D points "
                f"({self.role}.params.dim)"
            )
        t = _timesteps_for(x, t)
        temb = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        h = self.act(self.inp(x) + temb)
        for lin, tp in zip(self.layers, self.t_proj):
            h = h + self.act(lin(h) + tp(temb))
        return self.out(h)


class UNetDenoiser(nn.Module):
    """A diffusers ``UNet2DModel`` (``.unet``) called as ``denoiser(x_t, t)``; returns ``.sample``.

    The U-Net follows Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image
    Segmentation" (2015), in the time-conditioned form of Ho et al., "Denoising Diffusion
    Probabilistic Models" (2020).
    """

    def __init__(self, unet: nn.Module, *, role: str = "model") -> None:
        super().__init__()
        self.unet = unet
        self.role = role
        cfg = unet.config
        size = cfg.sample_size
        if isinstance(size, int):
            size = (size, size)
        self.sample_size = tuple(int(s) for s in size)
        self.channels = int(cfg.in_channels)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.sample_size)

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"the UNet denoiser takes images [B, C, H, W], got shape {tuple(x.shape)} "
                f"({self.role}: built for {_shape_str(self.data_shape)})"
            )
        if x.shape[1] != self.channels:
            raise ValueError(
                f"images have {x.shape[1]} channels ({_shape_str(x.shape[1:])}) but the UNet was "
                f"built for {self.channels} ({_shape_str(self.data_shape)}; {self.role}.params.channels)"
            )
        if tuple(x.shape[2:]) != self.sample_size:
            raise ValueError(
                f"images are {_shape_str(x.shape[1:])} but the UNet was built for "
                f"{_shape_str(self.data_shape)} ({self.role}.params.sample_size)"
            )
        return self.unet(x, _timesteps_for(x, t)).sample


def unet(
    sample_size: int,
    channels: int = 1,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    *,
    attention: bool = False,
    role: str = "model",
) -> UNetDenoiser:
    """A small ``diffusers.UNet2DModel`` wrapped as a denoiser.

    ``len(block_out_channels)`` resolution levels (each but the last halves the size, so
    ``sample_size`` must be divisible by ``2 ** (levels - 1)``); ResNet blocks only, or with
    self-attention at the lowest resolution when ``attention``. Group norm uses the largest
    group count <= 32 dividing every width.
    """
    from diffusers import UNet2DModel

    where = f"{role}.params"
    sample_size, channels = int(sample_size), int(channels)
    if sample_size < 1:
        raise ValueError(f"{where}.sample_size must be at least 1, got {sample_size}")
    if channels < 1:
        raise ValueError(f"{where}.channels must be at least 1, got {channels}")
    widths = tuple(int(w) for w in block_out_channels)
    if not widths or min(widths) < 1:
        raise ValueError(
            f"{where}.block_out_channels must be positive widths, got {block_out_channels}"
        )
    if int(layers_per_block) < 1:
        raise ValueError(f"{where}.layers_per_block must be at least 1, got {layers_per_block}")
    down = 2 ** (len(widths) - 1)
    if sample_size % down:
        raise ValueError(
            f"{where}.sample_size={sample_size} is not divisible by {down}, which the "
            f"{len(widths)} levels of {where}.block_out_channels={list(widths)} need"
        )
    groups = max(g for g in range(1, 33) if all(w % g == 0 for w in widths))
    n = len(widths)
    down_types = ["DownBlock2D"] * n
    up_types = ["UpBlock2D"] * n
    if attention:
        down_types[-1] = "AttnDownBlock2D"
        up_types[0] = "AttnUpBlock2D"
    model = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=int(layers_per_block),
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        norm_num_groups=groups,
        attention_head_dim=min(widths[-1], 8) if attention else None,
    )
    return UNetDenoiser(model, role=role)


def data_shape(denoiser) -> tuple[int, ...] | None:
    """One example's shape for a denoiser of this module (or anything with ``data_shape``)."""
    shape = getattr(denoiser, "data_shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def check_compatible(teacher, student) -> None:
    """Refuse a student that generates data of another shape than its teacher."""
    ts, ss = data_shape(teacher), data_shape(student)
    if ts is None or ss is None or ts == ss:
        return
    if len(ts) == 3 and len(ss) == 3:
        hint = (
            f"set student.params.channels={ts[0]} and student.params.sample_size={ts[1]}"
            if ts[1] == ts[2]
            else "build the student for the teacher's image size"
        )
    elif len(ts) == 1 and len(ss) == 1:
        hint = f"set student.params.dim={ts[0]}"
    else:
        hint = "use a student architecture for the teacher's kind of data"
    raise ValueError(
        f"the student generates {_shape_str(ss)} data but the teacher {_shape_str(ts)}; {hint}"
    )


__all__ = [
    "MLPDenoiser",
    "UNetDenoiser",
    "check_compatible",
    "data_shape",
    "sinusoidal_embedding",
    "unet",
]

"""Denoiser builders for the diffusion task (``teacher.builder`` / ``student.builder``).

* ``mlp_denoiser``: :class:`~mentor.diffusion.denoisers.MLPDenoiser` for points (2-D mixtures);
* ``unet_denoiser``: a small diffusers ``UNet2DModel`` (:func:`~mentor.diffusion.denoisers.unet`)
  for images.

The data shape comes from the data (``info.input_shape``); a setting that contradicts it is
refused, naming the setting. ``init: teacher`` starts the student from a copy of the teacher's
weights — the usual start for consistency models (Song et al., "Consistency Models", 2023) and
DMD2's generator (Yin et al., "Improved Distribution Matching Distillation for Fast Image
Synthesis", 2024); it needs the teacher's architecture. ``init: fresh`` (default) initialises
randomly from ``train.seed``.

Errors name ``model.params.*``; :func:`build_denoiser` re-labels them ``teacher.params.*`` or
``student.params.*`` and sets the denoiser's ``role``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mentor.data.sources import DataInfo
from mentor.students.builders import BUILDERS, build_model

INITS = ("fresh", "teacher")
DENOISER_BUILDERS = ("mlp_denoiser", "unet_denoiser")


def _shape(info: DataInfo, builder: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in (info.input_shape or ()))
    if info.task != "diffusion" or not shape:
        raise ValueError(
            f"builder {builder!r} builds a denoiser for diffusion data (data.source gmm2d, "
            f"digits_images, fashion_images); this data is {info.task}"
        )
    return shape


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"model.params.init={init!r}: choose one of {', '.join(INITS)}")


def _from_teacher(model: nn.Module, teacher: nn.Module | None, init: str) -> nn.Module:
    """Copy the teacher's weights into ``model`` for ``init: teacher``.

    Without a teacher (a saved student being rebuilt before its own weights load) the model
    is returned as built.
    """
    if init != "teacher" or teacher is None:
        return model
    if type(teacher) is not type(model):
        raise ValueError(
            f"model.params.init=teacher copies the teacher's weights, but the teacher is a "
            f"{type(teacher).__name__} and this builder makes a {type(model).__name__}: use the "
            "teacher's builder, or init: fresh"
        )
    try:
        model.load_state_dict(teacher.state_dict())
    except RuntimeError as e:
        raise ValueError(
            "model.params.init=teacher copies the teacher's weights, so the student needs the "
            "teacher's architecture (the same builder params, e.g. hidden/depth or "
            f"block_out_channels), or init: fresh ({str(e).splitlines()[0]})"
        ) from None
    return model


@BUILDERS.register("mlp_denoiser")
def mlp_denoiser(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    dim: int | None = None,
    hidden: int = 128,
    depth: int = 3,
    time_dim: int = 64,
    init: str = "fresh",
) -> nn.Module:
    """MLP denoiser ``denoiser(x_t, t)`` for ``[B, dim]`` points (``dim``: the data's)."""
    from mentor.diffusion.denoisers import MLPDenoiser

    shape = _shape(info, "mlp_denoiser")
    _check_init(init)
    if len(shape) != 1:
        raise ValueError(
            f"builder 'mlp_denoiser' takes points [B, dim], but the data are images "
            f"{'x'.join(map(str, shape))}: use builder unet_denoiser"
        )
    if dim is not None and int(dim) != shape[0]:
        raise ValueError(
            f"model.params.dim={dim} but the data are {shape[0]}-D points: set it to "
            f"{shape[0]} (or leave it out)"
        )
    model = MLPDenoiser(shape[0], hidden, depth, time_dim, role="model")
    return _from_teacher(model, teacher, init)


@BUILDERS.register("unet_denoiser")
def unet_denoiser(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    sample_size: int | None = None,
    channels: int | None = None,
    block_out_channels: list[int] | tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    init: str = "fresh",
) -> nn.Module:
    """Small diffusers ``UNet2DModel`` denoiser for ``[B, C, H, H]`` images (size: the data's)."""
    from mentor.diffusion.denoisers import unet

    shape = _shape(info, "unet_denoiser")
    _check_init(init)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(
            f"builder 'unet_denoiser' takes square images [B, C, H, H], but the data are "
            f"{'x'.join(map(str, shape))}: use builder mlp_denoiser for points"
        )
    c, h = shape[0], shape[1]
    if sample_size is not None and int(sample_size) != h:
        raise ValueError(
            f"the images are {c}x{h}x{h} but model.params.sample_size={sample_size}: set it "
            f"to {h} (or leave it out), or resize the data (e.g. data.params.size)"
        )
    if channels is not None and int(channels) != c:
        raise ValueError(
            f"the images have {c} channel(s) but model.params.channels={channels}: set it to "
            f"{c} (or leave it out)"
        )
    model = unet(
        h, c, tuple(block_out_channels), layers_per_block, attention=bool(attention), role="model"
    )
    return _from_teacher(model, teacher, init)


def build_denoiser(
    role: str,
    builder: str,
    params: dict[str, Any],
    info: DataInfo,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """``build_model`` for a denoiser, with errors naming ``{role}.params.*`` / ``{role}.builder``."""
    try:
        model = build_model(builder, params, info, teacher)
    except ValueError as e:
        msg = str(e).replace("model.params", f"{role}.params")
        raise ValueError(msg.replace("builder '", f"{role}.builder '", 1)) from None
    set_role(model, role)
    return model


def set_role(model: nn.Module, role: str) -> nn.Module:
    """Name the setting shape errors of ``model`` point at (``teacher``/``student``)."""
    for m in model.modules():
        if hasattr(m, "role") and hasattr(m, "data_shape"):
            m.role = role
    return model


__all__ = [
    "DENOISER_BUILDERS",
    "INITS",
    "build_denoiser",
    "mlp_denoiser",
    "set_role",
    "unet_denoiser",
]

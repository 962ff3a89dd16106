"""Data sources of the generative (diffusion) task: 2-D Gaussian mixtures and small images.

Items are ``{"x": Tensor, "index": int}`` (plus ``"labels"`` for images: used only by the
evaluation's feature classifier, never by the denoisers); ``DataInfo.task`` is ``"diffusion"``
and ``info.extra`` holds what evaluation needs (the mixture's means and std, the image size).
The arrays come from :mod:`mentor.diffusion.data`.

* ``gmm2d``: the equal-weight mixtures of Metz et al., "Unrolled Generative Adversarial
  Networks" (2017) and Srivastava et al., "VEEGAN" (2017): ``ring8`` or ``grid25``.
* ``digits_images``: scikit-learn's 8x8 digits (Alpaydin & Kaynak, 1998) in ``[-1, 1]``.
* ``fashion_images``: Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) in ``[-1, 1]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mentor.data.sources import DATASETS, DataBundle, DataInfo, check_positive, split_indices

TASK = "diffusion"


class GenerativeDataset(Dataset):
    """Samples ``x [N, ...]`` with stable ids (and class labels for images)."""

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None = None):
        if len(x) != len(ids) or (labels is not None and len(labels) != len(x)):
            raise ValueError("x, ids and labels must have the same length")
        self.x, self.ids, self.labels = x.float(), ids.long(), labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"x": self.x[i], "index": int(self.ids[i])}
        if self.labels is not None:
            item["labels"] = int(self.labels[i])
        return item


def data_tensor(data: Dataset) -> torch.Tensor:
    """All samples of a generative dataset as one ``[N, ...]`` tensor."""
    x = getattr(data, "x", None)
    if isinstance(x, torch.Tensor):
        return x
    return torch.stack([data[i]["x"] for i in range(len(data))])


def _split(
    x: torch.Tensor, y: torch.Tensor | None, val_fraction: float, seed: int
) -> tuple[GenerativeDataset, GenerativeDataset]:
    tr, va = split_indices(len(x), val_fraction, seed)
    ids = torch.arange(len(x))
    tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
    return (
        GenerativeDataset(x[tr_t], ids[tr_t], None if y is None else y[tr_t]),
        GenerativeDataset(x[va_t], ids[va_t], None if y is None else y[va_t]),
    )


@DATASETS.register("gmm2d")
def gmm2d(
    *,
    kind: str = "ring8",
    n: int = 4000,
    std: float = 0.05,
    radius: float = 1.0,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """2-D Gaussian mixture (``kind``: ring8 | grid25) of ``n`` points, component ``std``.

    The points are drawn with ``seed`` (``data.split_seed``); evaluation compares generated
    points with *fresh* draws from the same mixture (another seed), not with these.
    """
    from mentor.diffusion.data import MIXTURES, gaussian_mixture_2d

    if kind not in MIXTURES:
        raise ValueError(f"data.params.kind={kind!r}: choose one of {', '.join(MIXTURES)}")
    check_positive("n", n, optional=False)
    if n < 2:
        raise ValueError(f"data.params.n={n}: use at least 2 points")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0:
        raise ValueError(f"data.params.std={std!r}: use a positive number")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"data.params.radius={radius!r}: use a positive number")
    mix = gaussian_mixture_2d(kind, int(n), float(std), int(seed), radius=float(radius))
    train, val = _split(mix.points, None, val_fraction, seed)
    info = DataInfo(
        task=TASK,
        in_features=2,
        input_shape=(2,),
        extra={
            "generative": "gmm2d",
            "kind": kind,
            "means": mix.means.tolist(),
            "std": float(std),
            "radius": float(radius),
            "mixture_seed": int(seed),
        },
    )
    return DataBundle(train, val, info)


def _image_info(x: torch.Tensor, names: list[str], source: str, **extra: Any) -> DataInfo:
    shape = tuple(int(s) for s in x.shape[1:])
    return DataInfo(
        task=TASK,
        in_features=int(np.prod(shape)),
        input_shape=shape,
        num_classes=len(names),
        class_names=names,
        extra={"generative": source, "image_size": shape[-1], "channels": shape[0], **extra},
    )


def _limit(x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int, key: str):
    check_positive(key, limit)
    if limit is None or limit >= len(x):
        return x, y
    keep = np.sort(np.random.default_rng(seed).permutation(len(x))[: int(limit)])
    return x[keep], y[keep]


@DATASETS.register("digits_images")
def digits_images(
    *, limit: int | None = None, val_fraction: float = 0.2, seed: int = 0
) -> DataBundle:
    """scikit-learn's 8x8 digits (1,797) as ``[1, 8, 8]`` images in ``[-1, 1]``; ``limit`` keeps
    a seeded subset. The held-out split is the reference set of the image metrics."""
    from mentor.diffusion.data import digits_images as load

    x, y = load("all", seed, with_labels=True)
    x, y = _limit(x, y, limit, seed, "limit")
    train, val = _split(x, y, val_fraction, seed)
    return DataBundle(train, val, _image_info(x, [str(i) for i in range(10)], "digits_images"))


@DATASETS.register("fashion_images")
def fashion_images(
    *,
    path: str | None = None,
    limit: int | None = None,
    val_limit: int | None = None,
    size: int = 28,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Fashion-MNIST as ``[1, size, size]`` images in ``[-1, 1]`` (``size`` > 28 pads, e.g. 32
    for U-Nets with more levels): the training files (``limit``: a seeded subset) train, the
    test files (``val_limit``) are held out. No fallback: missing files are an error saying
    how to get them (``val_fraction`` is unused: the test files are the held-out split)."""
    from mentor.data.images import FASHION_CLASSES
    from mentor.diffusion.data import fashion_images as load

    check_positive("limit", limit)
    check_positive("val_limit", val_limit)
    check_positive("size", size, optional=False)
    try:
        xt, yt = load(limit, path=path, split="train", size=size, seed=seed, with_labels=True)
        xv, yv = load(val_limit, path=path, split="test", size=size, seed=seed, with_labels=True)
    except ValueError as e:
        raise ValueError(f"data.params: {e}") from None
    ids_t = torch.arange(len(xt))
    ids_v = torch.arange(len(xv)) + len(xt)
    info = _image_info(xt, list(FASHION_CLASSES), "fashion_images")
    return DataBundle(GenerativeDataset(xt, ids_t, yt), GenerativeDataset(xv, ids_v, yv), info)


__all__ = ["GenerativeDataset", "data_tensor", "digits_images", "fashion_images", "gmm2d"]

"""Data for the diffusion tasks: 2-D Gaussian mixtures, digits (8x8) and Fashion-MNIST images.

All images are ``[N, 1, H, W]`` float32 in ``[-1, 1]``; 2-D points are ``[N, 2]`` float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

MIXTURES = ("ring8", "grid25")


class Mixture2D(NamedTuple):
    """Points ``[n, 2]``, their component ids ``[n]``, the component means ``[K, 2]`` and std."""

    points: Tensor
    labels: Tensor
    means: Tensor
    std: float


def mixture_means(kind: str = "ring8", radius: float = 1.0) -> Tensor:
    """The component means of a mixture: 8 on a circle, or a 5x5 grid spanning ``[-r, r]``."""
    if kind == "ring8":
        ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        m = torch.stack([torch.cos(ang), torch.sin(ang)], dim=1) * radius
    elif kind == "grid25":
        g = torch.linspace(-radius, radius, 5, dtype=torch.float64)
        m = torch.cartesian_prod(g, g)
    else:
        raise ValueError(f"unknown mixture kind {kind!r}; choose one of {', '.join(MIXTURES)}")
    return m.float()


def gaussian_mixture_2d(
    kind: str = "ring8",
    n: int = 2000,
    std: float = 0.05,
    seed: int = 0,
    *,
    radius: float = 1.0,
) -> Mixture2D:
    """Equal-weight isotropic 2-D Gaussian mixture, the mode-coverage benchmark.

    ``ring8``: 8 modes on a circle of ``radius``; ``grid25``: a 5x5 grid over
    ``[-radius, radius]^2`` (the toy sets of Metz et al., "Unrolled Generative Adversarial
    Networks", 2017, and Srivastava et al., "VEEGAN", 2017). Deterministic given ``seed``.
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    means = mixture_means(kind, radius)
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.randint(0, len(means), (int(n),), generator=g)
    pts = means[labels] + float(std) * torch.randn(int(n), 2, generator=g)
    return Mixture2D(pts, labels, means, float(std))


def _split(n: int, split: str, seed: int, test_fraction: float) -> np.ndarray:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return np.arange(n)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(perm[:n_test] if split == "test" else perm[n_test:])


def digits_images(
    split: str = "train",
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    with_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1,797 images) as ``[N, 1, 8, 8]`` in ``[-1, 1]``.

    The UCI "Optical Recognition of Handwritten Digits" set (Alpaydin & Kaynak, 1998).

    ``split`` is ``"train"``, ``"test"`` (a seeded ``test_fraction`` held out) or ``"all"``.
    With ``with_labels`` also the digit classes ``[N]``.
    """
    from sklearn.datasets import load_digits

    ds = load_digits()
    idx = _split(len(ds.images), split, seed, test_fraction)
    x = torch.from_numpy(ds.images[idx].astype(np.float32) / 16.0 * 2 - 1)[:, None]
    if with_labels:
        return x, torch.from_numpy(ds.target[idx].astype(np.int64))
    return x


FASHION_HINT = (
    "install it with `apt-get install dataset-fashion-mnist`, or without root: "
    "`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR` "
    "and set data.params.path=DIR (or $FASHION_MNIST)"
)


def fashion_images(
    limit: int | None = None,
    *,
    path: str | None = None,
    split: str = "train",
    size: int = 28,
    seed: int = 0,
    with_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fashion-MNIST as ``[N, 1, size, size]`` in ``[-1, 1]`` (background -1).

    Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
    Learning Algorithms" (2017).

    Found like mentor's ``fashion_mnist`` data source (``path``, ``$FASHION_MNIST``, Debian's
    ``dataset-fashion-mnist``); ``split`` is ``"train"`` (60,000) or ``"test"`` (10,000).
    ``size > 28`` pads evenly (e.g. 32 for U-Nets with more levels). ``limit`` keeps a
    seeded random subset. No fallback: a missing data set is an error saying how to get it.
    """
    from mentor.data.images import find_fashion_mnist, read_idx

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    size = int(size)
    if size < 28:
        raise ValueError(f"size must be at least 28 (Fashion-MNIST is 28x28), got {size}")
    d = find_fashion_mnist(path)
    if d is None:
        raise FileNotFoundError(f"Fashion-MNIST not found; {FASHION_HINT}")
    stem = "train" if split == "train" else "t10k"
    raw = read_idx(d / f"{stem}-images-idx3-ubyte.gz")
    idx = np.arange(len(raw))
    if limit is not None and int(limit) < len(raw):
        idx = np.sort(np.random.default_rng(seed).permutation(len(raw))[: int(limit)])
    x = torch.from_numpy(raw[idx].astype(np.float32) / 255.0 * 2 - 1)[:, None]
    if size > 28:
        lo = (size - 28) // 2
        x = torch.nn.functional.pad(x, (lo, size - 28 - lo, lo, size - 28 - lo), value=-1.0)
    if with_labels:
        y = read_idx(d / f"{stem}-labels-idx1-ubyte.gz")[idx].astype(np.int64)
        return x, torch.from_numpy(y)
    return x


__all__ = [
    "FASHION_HINT",
    "MIXTURES",
    "Mixture2D",
    "digits_images",
    "fashion_images",
    "gaussian_mixture_2d",
    "mixture_means",
]

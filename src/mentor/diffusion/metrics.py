"""Sample-quality metrics for generative students: MMD, mode coverage, FD, precision/recall.

Image metrics take *feature vectors*, not images: Inception-v3 weights (what FID proper uses)
cannot be downloaded offline, so the features come from a classifier trained by mentor's
``vision`` recipe (or any fixed embedding). Numbers are therefore comparable between runs that
use the same feature network, not with published FID values.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _flat64(x, name: str) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu()
    if x.dim() < 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty [N, ...] array")
    x = x.reshape(len(x), -1).double()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def mmd_rbf(x, y, bandwidths: Sequence[float] | str = DEFAULT_BANDWIDTHS) -> float:
    """Unbiased squared MMD between samples ``x [N, ...]`` and ``y [M, ...]`` (flattened).

    Gretton et al., "A Kernel Two-Sample Test" (JMLR 2012), eq. (3) (the U-statistic):
    ``mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean k(x_i, y_j)`` with the sum of
    RBF kernels ``k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))`` over ``bandwidths`` (for data
    at unit scale such as the 2-D mixtures). ``bandwidths="median"`` uses the median pairwise
    distance of the pooled samples times (0.25, 0.5, 1, 2, 4). Can be slightly negative when
    the distributions are equal. Needs at least 2 samples on each side.
    """
    x, y = _flat64(x, "x"), _flat64(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features per sample but y has {y.shape[1]}")
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples in x and in y")
    dxx, dyy, dxy = torch.cdist(x, x) ** 2, torch.cdist(y, y) ** 2, torch.cdist(x, y) ** 2
    if isinstance(bandwidths, str):
        if bandwidths != "median":
            raise ValueError(f"bandwidths must be numbers or 'median', got {bandwidths!r}")
        pooled = torch.cat([dxx.flatten(), dyy.flatten(), dxy.flatten()])
        med = float(pooled[pooled > 0].median().sqrt()) if (pooled > 0).any() else 1.0
        hs = [med * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    else:
        hs = [float(h) for h in bandwidths]
        if not hs or min(hs) <= 0:
            raise ValueError(f"bandwidths must be positive, got {list(bandwidths)}")

    def k(d2: Tensor) -> Tensor:
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)

    kxx, kyy, kxy = k(dxx), k(dyy), k(dxy)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


class ModeCoverage(NamedTuple):
    """``coverage``: share of modes hit; ``high_quality``: share of samples near a mode."""

    coverage: float
    high_quality: float
    modes_covered: int
    counts: list[int]


def mode_coverage(
    samples, means, std: float, k: float = 3.0, *, min_count: int = 1
) -> ModeCoverage:
    """Mode coverage of a Gaussian mixture with isotropic components of ``std``.

    A sample is *high quality* when it lies within ``k * std`` of some mode; a mode is
    *covered* when at least ``min_count`` samples lie within ``k * std`` of it (the
    protocol of Metz et al., "Unrolled Generative Adversarial Networks", 2017, and
    Srivastava et al., "VEEGAN", 2017). ``counts`` are the high-quality samples per mode
    (each assigned to its nearest mode).
    """
    x, mu = _flat64(samples, "samples"), _flat64(means, "means")
    if x.shape[1] != mu.shape[1]:
        raise ValueError(f"samples are {x.shape[1]}-D but the means are {mu.shape[1]}-D")
    if not std > 0 or not k > 0:
        raise ValueError(f"std and k must be positive, got std={std}, k={k}")
    d = torch.cdist(x, mu)
    dmin, nearest = d.min(dim=1)
    good = dmin <= k * std
    counts = torch.bincount(nearest[good], minlength=len(mu))
    covered = int((counts >= min_count).sum())
    return ModeCoverage(
        coverage=covered / len(mu),
        high_quality=float(good.double().mean()),
        modes_covered=covered,
        counts=[int(c) for c in counts],
    )


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feat_a, feat_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium" (2017): ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with unbiased
    covariances. The trace of the matrix square root is computed the eigen-based, stable way
    rather than with ``scipy.linalg.sqrtm``: ``Tr (S_a S_b)^(1/2) = sum sqrt(eig(S_a^(1/2) S_b
    S_a^(1/2)))``, a symmetric PSD matrix (``eigh``, negative round-off clipped to 0), so no
    complex parts or ill-conditioned iterations arise even for singular covariances. In
    float64. See the module docstring for which features to use (no Inception offline).
    """
    a, b = _flat64(feat_a, "feat_a").numpy(), _flat64(feat_b, "feat_b").numpy()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feat_a has {a.shape[1]} features but feat_b has {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 feature vectors per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    ra = _sqrt_psd(s_a)
    m = ra @ s_b @ ra
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)
    return max(fd, 0.0)


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _kth_radius(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in ``x`` (itself excluded)."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], x)
        # the k+1 smallest include the point itself at distance 0
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _inside(q: Tensor, ref: Tensor, radii: Tensor, chunk: int = 2048) -> Tensor:
    """Whether each query lies within ``radii[j]`` of some reference point ``j``."""
    hits = []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i : i + chunk], ref)
        hits.append((d <= radii[None]).any(dim=1))
    return torch.cat(hits)


def precision_recall(feat_real, feat_fake, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall of generated features against real ones.

    Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative
    Models" (NeurIPS 2019): each set's manifold is the union of balls around its points with
    radius the distance to the ``k``-th nearest neighbour in the same set; precision = share
    of fake samples inside the real manifold, recall = share of real samples inside the fake
    manifold. Features should come from a fixed network (a mentor ``vision`` classifier here;
    Inception/VGG weights are not available offline).
    """
    r, f = _flat64(feat_real, "feat_real"), _flat64(feat_fake, "feat_fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feat_real has {r.shape[1]} features but feat_fake has {f.shape[1]}")
    k = int(k)
    if k < 1 or k >= min(len(r), len(f)):
        raise ValueError(
            f"k must be in [1, {min(len(r), len(f)) - 1}] for {len(r)} real and {len(f)} fake "
            f"samples, got {k}"
        )
    precision = float(_inside(f, r, _kth_radius(r, k)).double().mean())
    recall = float(_inside(r, f, _kth_radius(f, k)).double().mean())
    return PrecisionRecall(precision, recall)


def latency_per_sample(
    fn: Callable[[], object], n: int, repeats: int = 3, *, warmup: int = 1
) -> float:
    """Median wall-clock seconds per sample of ``fn()``, a call that generates ``n`` samples.

    ``warmup`` untimed calls first; CUDA is synchronised around each timed call.
    """
    n, repeats = int(n), int(repeats)
    if n < 1 or repeats < 1:
        raise ValueError(f"n and repeats must be at least 1, got n={n}, repeats={repeats}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(max(int(warmup), 0)):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n


__all__ = [
    "DEFAULT_BANDWIDTHS",
    "ModeCoverage",
    "PrecisionRecall",
    "frechet_distance",
    "latency_per_sample",
    "mmd_rbf",
    "mode_coverage",
    "precision_recall",
]

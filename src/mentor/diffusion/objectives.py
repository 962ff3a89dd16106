"""Few-step diffusion distillation objectives with a step-level API for a training loop.

Every objective is built on a :class:`~mentor.diffusion.schedules.VPSchedule` and follows the
``denoiser(x_t, t) -> prediction`` convention (``t`` long ``[B]``; the prediction is whatever
the schedule's ``prediction_type`` says). The shared protocol (:class:`DiffusionObjective`):

* ``loss(student, teacher, x0, generator=None) -> (loss, logs)`` — the student's loss on a
  batch ``x0`` (real data; for DMD2 / embedding MMD it is the reference and GAN "real" batch);
  ``logs`` holds floats. All randomness comes from ``generator`` (a ``torch.Generator``; the
  global RNG when ``None``), so a loop that checkpoints the generator resumes exactly.
* ``after_step(student) -> logs`` — call once after every student optimizer step: it advances
  the iteration counter (curricula, progressive rounds, Hyper-SD stages) and updates EMA
  targets.
* ``train_step(student, teacher, x0, optimizer, generator=None)`` — one full update (auxiliary
  updates first where the objective has them, then loss / backward / clip / step /
  ``after_step``); returns logs including ``grad_norm``.
* ``aux_modules()`` / ``aux_parameters()`` — networks the objective owns (DMD2's fake score and
  discriminator, EMA targets, progressive teachers); ``aux_loss`` / ``aux_step`` where a second
  network trains (DMD2).
* ``state_dict()`` / ``load_state_dict(state)`` — everything the objective owns (counters, aux
  networks, aux optimizers, histories). Loading before the first call is fine: the state is
  applied when the objective sets itself up on the first ``loss`` / ``train_step``.
* ``sample(student, noise, generator=None)`` — the student's few-step sampler matching what
  the objective trains.

Objectives (registry :data:`DIFFUSION_OBJECTIVES`, built by :func:`build_objective`):
``progressive``, ``consistency_distillation``, ``consistency_training``, ``dmd2``,
``embedding_mmd``, ``hyper_sd_tscd``. Each class docstring cites its paper and states the
formula and defaults, and marks what is reconstructed.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mentor.diffusion.schedules import VPSchedule

# ----------------------------------------------------------------------------- helpers


def _b(v: Tensor, like: Tensor) -> Tensor:
    """A per-example ``[B]`` tensor reshaped to broadcast over ``like`` (``[B, ...]``)."""
    v = v.to(device=like.device, dtype=like.dtype)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn_like(like)
    z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return z.to(like.device)


def _randint(low: int, high: int, n: int, device, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randint(low, high, (n,), device=device)
    t = torch.randint(low, high, (n,), generator=generator, device=generator.device)
    return t.to(device)


def _categorical(probs: Tensor, n: int, device, generator: torch.Generator | None) -> Tensor:
    if generator is not None:
        probs = probs.to(generator.device)
    idx = torch.multinomial(probs.float(), n, replacement=True, generator=generator)
    return idx.to(device)


def _int_param(where: str, value: Any, minimum: int | None = 1) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            v = int(value)
        else:
            raise ValueError(f"{where} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{where} must be at least {minimum}, got {v}")
    return v


def _nfe_param(where: str, value: Any) -> int:
    """A number of function evaluations / sampling steps (must be >= 1)."""
    try:
        return _int_param(where, value, 1)
    except ValueError as e:
        raise ValueError(f"{e} (a number of sampling steps / NFE)") from None


def _float_param(
    where: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{where} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{where} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def _choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"{where} must be one of {', '.join(choices)}, got {value!r}{extra}")
    return value


def _shape(x) -> str:
    return "x".join(str(int(s)) for s in x) or "scalar"


def _predict(model: Callable, x_t: Tensor, t: Tensor, role: str) -> Tensor:
    """``model(x_t, t)`` with a check that the prediction has the input's shape."""
    out = model(x_t, t)
    if not isinstance(out, Tensor) and hasattr(out, "sample"):
        out = out.sample
    if not isinstance(out, Tensor):
        raise TypeError(f"the {role} must return a tensor, got {type(out).__name__}")
    if out.shape != x_t.shape:
        raise ValueError(
            f"the {role} returned shape {_shape(out.shape)} for inputs of shape "
            f"{_shape(x_t.shape)}: student, teacher and data must share one data shape"
        )
    return out.to(x_t.dtype)


def _check_batch(where: str, x0: Any, minimum: int = 1) -> Tensor:
    if not isinstance(x0, Tensor) or x0.dim() < 2 or not x0.is_floating_point():
        got = _shape(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"{where}: x0 must be a floating [B, ...] batch, got {got}")
    if x0.shape[0] < minimum:
        raise ValueError(f"{where} needs a batch of at least {minimum}, got {x0.shape[0]}")
    return x0


def _check_models(where: str, x0: Tensor, **models: Any) -> None:
    """Refuse models whose declared ``data_shape`` differs from each other or from the data."""
    shapes = {
        role: tuple(int(s) for s in m.data_shape)
        for role, m in models.items()
        if m is not None and hasattr(m, "data_shape")
    }
    data = tuple(int(s) for s in x0.shape[1:])
    for role, shp in shapes.items():
        if shp != data:
            others = ", ".join(f"{r} {_shape(s)}" for r, s in shapes.items())
            raise ValueError(
                f"{where}: the {role} was built for data of shape {_shape(shp)} but the batch "
                f"x0 is {_shape(data)} (model shapes: {others}); the student/teacher shape "
                f"mismatch must be fixed in the {role}'s params"
            )


def _trainable(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else [p for p in module.parameters() if p.requires_grad]


def _frozen_copy(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    out.requires_grad_(False)
    return out


def _grad_norm(params: Iterable[Tensor], max_norm: float | None) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = float("inf") if max_norm is None else float(max_norm)
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def _time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al., 2017)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def x0_to_prediction(schedule: VPSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The prediction (noise / velocity / sample, per the schedule) that implies ``x0`` at ``(x_t, t)``.

    The inverse of :meth:`VPSchedule.to_x0` (undefined at ``t = -1`` for noise/velocity):
    ``eps = (x_t − α x0)/σ``, ``v = α eps − σ x0``.
    """
    if schedule.prediction_type == "sample":
        return x0
    a, s = schedule.alpha_sigma(t)
    a, s = _b(a, x_t), _b(s, x_t)
    eps = (x_t - a * x0) / s
    if schedule.prediction_type == "epsilon":
        return eps
    return a * eps - s * x0


# ----------------------------------------------------------------------------- iCT pieces


def pseudo_huber(x: Tensor, y: Tensor, c: float | None = None) -> Tensor:
    """Per-example Pseudo-Huber distance ``sqrt(‖x − y‖² + c²) − c`` (``[B]``).

    Song & Dhariwal, "Improved Techniques for Training Consistency Models" (2023), Sec. 3.3:
    ``c = 0.00054·√d`` with ``d`` the number of elements of one example (``c`` = 0.03 on
    CIFAR-10's 3072 dims); the default here.
    """
    if x.shape != y.shape:
        raise ValueError(
            f"pseudo_huber needs equal shapes, got {_shape(x.shape)} and {_shape(y.shape)}"
        )
    if c is None:
        c = 0.00054 * math.sqrt(x[0].numel())
    sq = (x - y).flatten(1).pow(2).sum(1)
    return torch.sqrt(sq + c * c) - c


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``n`` EDM noise levels, ascending: ``σ_i = (σ_min^{1/ρ} + i/(n−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ``.

    Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative
    Models" (2022); used with ρ = 7 by both consistency-model papers. Float64.
    """
    n = _int_param("karras_sigmas n", n, 2)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def ict_num_steps(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation curriculum ``N(k) = min(s0·2^⌊k/K'⌋, s1) + 1``, ``K' = ⌊K/(log2⌊s1/s0⌋ + 1)⌋``.

    Song & Dhariwal, "Improved Techniques for Training Consistency Models" (2023), Sec. 3.4
    (defaults s0 = 10, s1 = 1280: N doubles 11 → 21 → … → 1281 in 8 equal phases). ``k`` is
    the 0-based training iteration, ``K`` the total number of iterations. N counts grid
    points (N − 1 intervals).
    """
    k = _int_param("iteration", k, 0)
    total_steps = _int_param("total_steps", total_steps, 1)
    s0 = _int_param("initial_steps", s0, 1)
    s1 = _int_param("final_steps", s1, s0)
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    doublings = min(k // k_prime, 62)
    return min(s0 * 2**doublings, s1) + 1


def lognormal_interval_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's lognormal probabilities of the intervals ``[σ_i, σ_{i+1}]`` of an ascending grid.

    ``p(σ_i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std))``,
    P_mean = −1.1, P_std = 2.0 (Song & Dhariwal, 2023, Sec. 3.5): the mass a lognormal
    ``ln σ ~ N(P_mean, P_std²)`` puts on each interval, normalised to sum to 1. Float64
    ``[n − 1]``.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    if s.dim() != 1 or s.numel() < 2 or not bool((s[1:] > s[:-1]).all()) or bool((s <= 0).any()):
        raise ValueError("sigmas must be a 1-D ascending grid of positive noise levels")
    cdf = torch.special.erf((s.log() - p_mean) / (math.sqrt(2.0) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp_min(0)
    if float(p.sum()) <= 0:
        p = torch.ones_like(p)
    return p / p.sum()


def edm_sigma(schedule: VPSchedule, t: Tensor) -> Tensor:
    """The EDM noise level of VP timestep ``t``: ``σ_EDM = σ_t/α_t = sqrt((1 − ᾱ_t)/ᾱ_t)`` (float64).

    A VP sample ``x_t = α_t x0 + σ_t ε`` is ``α_t·(x0 + σ_EDM ε)``, the EDM (variance-exploding)
    sample at level σ_EDM scaled by α_t; computed from the same float32 ``alpha_sigma`` the
    schedule noises with, so ``x_t/α_t`` and σ_EDM agree with :meth:`VPSchedule.add_noise`.
    """
    a, s = schedule.alpha_sigma(t)
    return s.double() / a.double()


def consistency_timesteps(
    schedule: VPSchedule,
    n: int,
    *,
    sigma_min: float | None = None,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> Tensor:
    """An ascending grid of VP timesteps whose EDM σ follow Karras' ρ-spacing (≤ ``n`` points).

    ``n`` Karras levels between σ_EDM of the lowest timestep (``t = 0``, or the one nearest
    ``sigma_min``) and σ_EDM of the highest timestep with σ_EDM ≤ ``sigma_max`` (80, iCT's
    σ_max) are each mapped to the VP timestep of nearest log-σ; duplicates are dropped, so a
    1000-step schedule yields fewer than ``n`` points once ``n`` nears the number of timesteps
    in range (reconstruction: the consistency papers use a continuous σ).
    """
    n = _int_param("discretization steps", n, 2)
    T = schedule.num_train_timesteps
    sig = edm_sigma(schedule, torch.arange(T))
    logsig = sig.log()
    t_lo = 0
    if sigma_min is not None:
        t_lo = int((logsig - math.log(sigma_min)).abs().argmin())
    in_range = (sig <= sigma_max).nonzero().flatten()
    if in_range.numel() == 0 or int(in_range.max()) <= t_lo:
        raise ValueError(
            f"sigma_max={sigma_max} leaves no timestep range above t={t_lo} on this schedule "
            f"(σ_EDM spans {float(sig[0]):.4g}..{float(sig[-1]):.4g})"
        )
    t_hi = int(in_range.max())
    levels = karras_sigmas(n, float(sig[t_lo]), float(sig[t_hi]), rho).log()
    seg = logsig[t_lo : t_hi + 1]
    right = torch.searchsorted(seg, levels).clamp(1, seg.numel() - 1)
    left = right - 1
    nearer_left = (levels - seg[left]).abs() <= (seg[right] - levels).abs()
    idx = torch.where(nearer_left, left, right) + t_lo
    idx[0], idx[-1] = t_lo, t_hi
    return torch.unique(idx).long()


# ----------------------------------------------------------------------------- MMD


def mmd_rbf(
    x: Tensor, y: Tensor, *, scales: Sequence[float] = (0.5, 1.0, 2.0), unbiased: bool = False
) -> Tensor:
    """Squared MMD between samples ``x [n, d]`` and ``y [m, d]`` with a multi-bandwidth RBF kernel.

    ``k(a, b) = (1/S) Σ_s exp(−‖a − b‖² / (s·h))``, ``h`` = median squared pairwise distance
    of the pooled samples (detached; the median heuristic), ``s`` ∈ ``scales``.
    ``MMD² = E k(x, x') + E k(y, y') − 2 E k(x, y)`` (Gretton et al., "A Kernel Two-Sample
    Test", 2012): the V-statistic (≥ 0, 0 for identical sets) unless ``unbiased``.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"mmd_rbf needs [n, d] and [m, d] features with equal d, got "
            f"{_shape(x.shape)} and {_shape(y.shape)}"
        )
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd_rbf needs at least 2 samples per side, got {n} and {m}")
    z = torch.cat([x, y]).float()
    sq = z.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    off = ~torch.eye(n + m, dtype=torch.bool, device=z.device)
    h = d2.detach()[off].median()
    if not bool(h > 0):
        h = torch.ones((), device=z.device)
    k = sum(torch.exp(-d2 / (float(s) * h)) for s in scales) / len(scales)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    if unbiased:
        exx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        eyy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        return exx + eyy - 2 * kxy.mean()
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


class _RandomFeatureNet(nn.Module):
    def __init__(self, in_features: int, width: int, depth: int, generator: torch.Generator):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(depth):
            lin = nn.Linear(d, width)
            with torch.no_grad():
                lin.weight.normal_(0.0, 1.0 / math.sqrt(d), generator=generator)
                lin.bias.uniform_(-0.5, 0.5, generator=generator)
            layers += [lin, nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


def random_feature_nets(
    in_features: int, *, num: int = 4, width: int = 256, depth: int = 2, seed: int = 0
) -> list[nn.Module]:
    """``num`` frozen, randomly initialised MLP feature extractors (flattened input).

    The "diverse set of randomly initialized networks" of the Embedding Loss paper (Ying et al.,
    2026) in an architecture that fits any data shape; the paper's image networks are
    convolutional — pass those as callables for images. Weights ``N(0, 1/fan_in)``, biases
    ``U(−0.5, 0.5)``, SiLU, each net a different draw from one ``seed``.
    """
    g = torch.Generator().manual_seed(int(seed))
    return [_RandomFeatureNet(int(in_features), int(width), int(depth), g) for _ in range(int(num))]


class _NoisyDiscriminator(nn.Module):
    """A small MLP discriminator on noised samples ``D(x_t, t) -> logit [B]`` (flattened input)."""

    def __init__(self, in_features: int, hidden: int = 128, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(in_features + time_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x.flatten(1).float(), _time_embedding(t, self.time_dim)], dim=1)
        return self.net(h).squeeze(1)


# ----------------------------------------------------------------------------- divergence check


def fake_loss_diverged(
    history: Sequence[Any],
    *,
    window: int = 50,
    factor: float = 3.0,
    key: str = "fake_loss",
    warn: bool = True,
) -> bool:
    """Early warning for DMD2: True when the fake-score loss has blown up.

    ``history`` is a list of floats or of log dicts holding ``key``. Diverged when the last
    ``window`` values contain a non-finite one, or when their mean exceeds ``factor`` × the
    mean of the ``window`` values before them (the loss grew by more than ``factor`` over one
    window). Needs at least ``2·window`` values otherwise. Issues a ``RuntimeWarning`` when
    ``warn``. (The fake-score loss also rises while the generator's spread grows from a
    collapsed start, so a slow rise is not flagged; a jump within a window is.)
    """
    window = _int_param("window", window, 1)
    factor = _float_param("factor", factor, low=1.0, low_open=True)
    vals = [
        float(h[key]) if isinstance(h, Mapping) else float(h)
        for h in history
        if not isinstance(h, Mapping) or key in h
    ]
    recent = vals[-window:]
    msg = None
    if recent and not all(math.isfinite(v) for v in recent):
        msg = f"the DMD2 fake-score loss became non-finite in the last {len(recent)} updates"
    elif len(vals) >= 2 * window:
        before = vals[-2 * window : -window]
        base = max(sum(before) / window, 1e-12)
        now = sum(recent) / window
        if now > factor * base:
            msg = (
                f"the DMD2 fake-score loss grew {now / base:.2f}x within {window} updates "
                f"(mean {base:.4g} -> {now:.4g}, threshold {factor}x): the fake score no longer "
                f"tracks the generator; lower the generator lr or raise fake_updates"
            )
    if msg is not None and warn:
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return msg is not None


# ----------------------------------------------------------------------------- base class


class DiffusionObjective:
    """Base class: the step-level protocol shared by every few-step objective (see module doc)."""

    name = "objective"
    #: whether ``loss`` calls the teacher (consistency training does not)
    needs_teacher = True

    def __init__(self, schedule: VPSchedule | None = None) -> None:
        if schedule is None:
            schedule = VPSchedule.default()
        if not isinstance(schedule, VPSchedule):
            raise TypeError(
                f"{self.name}.schedule must be a VPSchedule, got {type(schedule).__name__}"
            )
        self.schedule = schedule
        self.iteration = 0
        self.max_grad_norm: float | None = None
        self._ready = False
        self._pending: dict[str, Any] | None = None

    # -- setup / ownership ---------------------------------------------------------------
    @property
    def T(self) -> int:
        return self.schedule.num_train_timesteps

    def setup(self, student: nn.Module, teacher: nn.Module | None, x0: Tensor) -> None:
        """Validate shapes and build owned networks (idempotent; called by ``loss``)."""
        if self._ready:
            return
        _check_batch(self.name, x0)
        if self.needs_teacher and teacher is None and not self._owns_teacher():
            raise ValueError(f"{self.name} needs a teacher (got None)")
        _check_models(self.name, x0, student=student, teacher=teacher)
        self._build(student, teacher, x0)
        self._ready = True
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply_state(pending)

    def _build(self, student, teacher, x0) -> None:  # networks the objective owns
        pass

    def _owns_teacher(self) -> bool:  # progressive distillation after its first round
        return False

    def aux_modules(self) -> list[nn.Module]:
        """Networks the objective owns (to checkpoint, move to a device, put in train/eval)."""
        return []

    def aux_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of :meth:`aux_modules` (trained by the objective itself)."""
        return [p for m in self.aux_modules() for p in _trainable(m)]

    # -- training ------------------------------------------------------------------------
    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        x0: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, student: nn.Module) -> dict[str, Any]:
        """Call after each student optimizer step: advances the iteration counter."""
        self.iteration += 1
        return {}

    def train_step(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        x0: Tensor,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator | None = None,
        *,
        max_grad_norm: float | None = None,
    ) -> dict[str, Any]:
        """One student update: loss → backward → clip (``max_grad_norm``) → step → ``after_step``."""
        self.setup(student, teacher, x0)
        loss, logs = self.loss(student, teacher, x0, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.max_grad_norm if max_grad_norm is None else max_grad_norm
        logs["grad_norm"] = _grad_norm(student.parameters(), clip)
        optimizer.step()
        for p in self.aux_parameters():  # e.g. a GAN term reaching the discriminator
            p.grad = None
        logs.update(self.after_step(student))
        return logs

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the objective owns; pass to :meth:`load_state_dict` to resume exactly."""
        if self._pending is not None:  # loaded but never set up: hand the same state back
            return copy.deepcopy(self._pending)
        state = {"objective": self.name, "iteration": self.iteration}
        state.update(self._extra_state())
        return state

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("objective") != self.name:
            got = state.get("objective") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state_dict is for objective {got!r}, not {self.name!r}")
        state = dict(state)
        self.iteration = _int_param(f"{self.name} state iteration", state["iteration"], 0)
        self._prepare_load(state)
        if self._ready:
            self._apply_state(state)
        else:
            self._pending = state

    def _prepare_load(self, state: Mapping[str, Any]) -> None:
        """Hook: owned networks the state holds but this objective has not built yet."""

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        pass

    # -- sampling ------------------------------------------------------------------------
    def sample(self, student: nn.Module, noise: Tensor, generator=None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, iteration={self.iteration})"


def _ddim_sample(model, schedule: VPSchedule, noise: Tensor, timesteps: Sequence[int]) -> Tensor:
    """Deterministic DDIM over descending ``timesteps`` then to clean data (no grad)."""
    x = noise
    ts = [int(t) for t in timesteps] + [-1]
    with torch.no_grad():
        for t, s in zip(ts[:-1], ts[1:]):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x0 = schedule.to_x0(_predict(model, x, tt, "student"), x, tt)
            x = schedule.ddim_step(x, x0, tt, torch.full_like(tt, s))
    return x


# ----------------------------------------------------------------------------- 1. progressive


class ProgressiveSchedule:
    """The rounds of progressive distillation: the student's step count halves every round.

    Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (2022),
    Algorithm 2: round ``r`` trains a student with ``N_r = initial_steps / 2^r`` DDIM steps to
    match its teacher's ``2·N_r`` steps; at the end of the round the student becomes the
    teacher (:meth:`promote`) and keeps training as the next round's student (the paper
    initialises the new student from the new teacher — the same weights). Rounds run
    ``iters_per_round`` optimizer steps each (default 50 000 — reconstruction of the paper's
    budget per halving; it used longer runs for some datasets/rounds) until ``final_steps``.
    """

    def __init__(
        self, initial_steps: int = 256, final_steps: int = 1, iters_per_round: int = 50_000
    ):
        self.initial_steps = _nfe_param("progressive.student_steps", initial_steps)
        self.final_steps = _nfe_param("progressive.final_student_steps", final_steps)
        self.iters_per_round = _int_param("progressive.iters_per_round", iters_per_round, 1)
        if self.final_steps > self.initial_steps:
            raise ValueError(
                f"progressive.final_student_steps={final_steps} exceeds student_steps={initial_steps}"
            )
        ratio = self.initial_steps // self.final_steps
        if self.initial_steps % self.final_steps or ratio & (ratio - 1):
            raise ValueError(
                f"progressive.student_steps={initial_steps} must be final_student_steps="
                f"{final_steps} times a power of two (each round halves the step count)"
            )
        self.rounds = [self.initial_steps >> r for r in range(ratio.bit_length())]

    def round_index(self, iteration: int) -> int:
        return min(int(iteration) // self.iters_per_round, len(self.rounds) - 1)

    def student_steps(self, iteration: int) -> int:
        """The student's DDIM step count at (0-based) optimizer step ``iteration``."""
        return self.rounds[self.round_index(iteration)]

    def round_ended(self, steps_done: int) -> bool:
        """True when ``steps_done`` optimizer steps complete a round that has a successor."""
        steps_done = int(steps_done)
        return (
            steps_done > 0
            and steps_done % self.iters_per_round == 0
            and steps_done // self.iters_per_round < len(self.rounds)
        )

    @staticmethod
    def promote(student: nn.Module) -> nn.Module:
        """The next round's teacher: a frozen (``requires_grad=False``, eval-mode) copy of ``student``."""
        return _frozen_copy(student).eval()


class ProgressiveDistillation(DiffusionObjective):
    """Progressive distillation: one student DDIM step matches two teacher DDIM steps.

    Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (2022),
    Algorithm 2, on the discrete trailing grid of the schedule. With ``N`` student steps, the
    student grid is ``schedule.timesteps(N) + [−1]`` and the teacher grid
    ``schedule.timesteps(2N) + [−1]`` (nested: the teacher's even points are the student's).
    For a uniformly drawn student step ``t → t''`` with teacher midpoint ``t'``::

        z_t  = α_t x + σ_t ε
        z_t' = DDIM_teacher(z_t, t → t'),   z_t'' = DDIM_teacher(z_t', t' → t'')
        x̃   = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t)      (x̃ = z_t'' at t'' = −1)
        L    = w(λ_t) · mean_dims (x̃ − x̂_θ(z_t))²,   x̂_θ = schedule.to_x0(student(z_t, t))

    so one student DDIM step from ``z_t`` lands on the teacher's two-step ``z_t''``.
    ``weighting="truncated_snr"`` (default): ``w = max(α_t²/σ_t², 1)``; ``"snr_plus_one"``:
    ``w = 1 + α_t²/σ_t²``, which equals the v-prediction MSE ``‖v̂ − ṽ‖²``. The paper's norm
    is a sum over dimensions; here it is a mean (a constant factor).

    ``student_steps`` (default 256, needs ``2·N ≤ T``) is the student's NFE. With
    ``iters_per_round`` set, a :class:`ProgressiveSchedule` halves N every round down to
    ``final_student_steps`` (default 1) and, at each round's end, :meth:`after_step` freezes a
    copy of the student as the teacher of the next round (owned, checkpointed, and used by
    :meth:`loss` in place of the ``teacher`` argument from then on). The paper's teachers use
    the v/x parameterisations; an ε-predicting student is unstable at the top timestep.
    """

    name = "progressive"

    def __init__(
        self,
        schedule: VPSchedule | None = None,
        *,
        student_steps: int = 256,
        final_student_steps: int | None = None,
        iters_per_round: int | None = None,
        weighting: str = "truncated_snr",
    ) -> None:
        super().__init__(schedule)
        n = _nfe_param("progressive.student_steps", student_steps)
        if 2 * n > self.T:
            raise ValueError(
                f"progressive.student_steps={n} needs 2·{n} = {2 * n} distinct teacher timesteps "
                f"but the schedule has {self.T}"
            )
        self.weighting = _choice(
            "progressive.weighting", weighting, ("truncated_snr", "snr_plus_one")
        )
        if iters_per_round is None:
            if final_student_steps is not None and int(final_student_steps) != n:
                raise ValueError(
                    "progressive.final_student_steps needs progressive.iters_per_round (the "
                    "length of a halving round)"
                )
            self.rounds: ProgressiveSchedule | None = None
            self._fixed_steps = n
        else:
            self.rounds = ProgressiveSchedule(
                n, 1 if final_student_steps is None else final_student_steps, iters_per_round
            )
            self._fixed_steps = None
        self._teacher: nn.Module | None = None
        self._needs_teacher_copy = False

    def student_steps(self) -> int:
        """The current student NFE."""
        if self.rounds is None:
            return self._fixed_steps
        return self.rounds.student_steps(self.iteration)

    def student_timesteps(self, n: int | None = None) -> list[int]:
        """The descending student grid for ``n`` steps (without the final ``−1``)."""
        n = self.student_steps() if n is None else _nfe_param("steps", n)
        return self.schedule.timesteps(n).tolist()

    def _build(self, student, teacher, x0) -> None:
        if self._needs_teacher_copy:
            self._teacher = ProgressiveSchedule.promote(student)
            self._needs_teacher_copy = False

    def _owns_teacher(self) -> bool:
        return self._teacher is not None or self._needs_teacher_copy

    def aux_modules(self) -> list[nn.Module]:
        return [] if self._teacher is None else [self._teacher]

    def current_teacher(self, teacher: nn.Module | None) -> nn.Module | None:
        """The teacher in use: the promoted student after the first round, else ``teacher``."""
        return teacher if self._teacher is None else self._teacher

    def distillation_target(
        self, teacher: nn.Module, z_t: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor
    ) -> Tensor:
        """``x̃``: the clean sample whose DDIM step ``t → t_next`` from ``z_t`` hits the teacher's two steps."""
        sch = self.schedule
        with torch.no_grad():
            x0_a = sch.to_x0(_predict(teacher, z_t, t, "teacher"), z_t, t)
            z_mid = sch.ddim_step(z_t, x0_a, t, t_mid)
            x0_b = sch.to_x0(_predict(teacher, z_mid, t_mid, "teacher"), z_mid, t_mid)
            z_next = sch.ddim_step(z_mid, x0_b, t_mid, t_next)
            a_t, s_t = (v.double() for v in sch.alpha_sigma(t))
            a_n, s_n = (v.double() for v in sch.alpha_sigma(t_next))
            ratio = s_n / s_t
            denom = a_n - ratio * a_t
            return (z_next - _b(ratio, z_t) * z_t) / _b(denom, z_t)

    def loss(self, student, teacher, x0, generator=None):
        x0 = _check_batch(self.name, x0)
        self.setup(student, teacher, x0)
        teacher = self.current_teacher(teacher)
        n = self.student_steps()
        dev = x0.device
        s_grid = torch.cat([self.schedule.timesteps(n), torch.tensor([-1])]).to(dev)
        t_grid = torch.cat([self.schedule.timesteps(2 * n), torch.tensor([-1])]).to(dev)
        if not torch.equal(t_grid[::2], s_grid):
            raise RuntimeError(
                f"internal: the {2 * n}-step teacher grid does not contain the {n}-step student grid"
            )
        B = x0.shape[0]
        i = _randint(0, n, B, dev, generator)
        t, t_next, t_mid = s_grid[i], s_grid[i + 1], t_grid[2 * i + 1]
        eps = _randn(x0, generator)
        z_t = self.schedule.add_noise(x0, eps, t)
        target = self.distillation_target(teacher, z_t, t, t_mid, t_next)
        x_hat = self.schedule.to_x0(_predict(student, z_t, t, "student"), z_t, t)
        snr = self.schedule.snr(t).to(device=dev)
        w = snr.clamp_min(1.0) if self.weighting == "truncated_snr" else snr + 1.0
        per = _per_sample_mean((x_hat - target) ** 2)
        loss = (w.to(per.dtype) * per).mean()
        logs = {
            "loss": float(loss.detach()),
            "student_steps": n,
            "mse_x": float(per.detach().mean()),
            "weight_mean": float(w.mean()),
        }
        return loss, logs

    def after_step(self, student) -> dict[str, Any]:
        logs = super().after_step(student)
        if self.rounds is not None and self.rounds.round_ended(self.iteration):
            self._teacher = ProgressiveSchedule.promote(student)
            logs["promoted"] = True
            logs["student_steps"] = self.student_steps()
        return logs

    def _extra_state(self) -> dict[str, Any]:
        return {"teacher": None if self._teacher is None else self._teacher.state_dict()}

    def _apply_state(self, state) -> None:
        sd = state.get("teacher")
        if sd is None:
            self._teacher = None
            return
        if self._teacher is None:
            raise RuntimeError("internal: promoted teacher missing at load")
        self._teacher.load_state_dict(sd)

    def _prepare_load(self, state) -> None:
        if state.get("teacher") is not None and self._teacher is None:
            self._needs_teacher_copy = True  # the copy is made from the student at setup
            self._ready = False

    def sample(self, student, noise, generator=None) -> Tensor:
        """N-step deterministic DDIM with the student on its training grid."""
        return _ddim_sample(student, self.schedule, noise, self.student_timesteps())


# ----------------------------------------------------------------------------- 2. consistency


class _EMATargetMixin:
    """An optional EMA copy of the student as the consistency target (``target_ema`` > 0),
    checkpointed with the objective; shared by the consistency objectives and TSCD."""

    _target: nn.Module | None
    target_ema: float
    name: str

    def _update_target(self, student: nn.Module) -> None:
        if self._target is None:
            return
        mu = self.target_ema
        with torch.no_grad():
            for pt, p in zip(self._target.parameters(), student.parameters()):
                pt.mul_(mu).add_(p.detach(), alpha=1 - mu)
            for bt, b in zip(self._target.buffers(), student.buffers()):
                bt.copy_(b)

    def _extra_state(self) -> dict[str, Any]:
        return {"target": None if self._target is None else self._target.state_dict()}

    def _prepare_load(self, state) -> None:
        if state.get("target") is not None and self._target is None:
            self._needs_target_copy = True  # the copy is made from the student at setup
            self._ready = False

    def _apply_state(self, state) -> None:
        sd = state.get("target")
        if sd is not None:
            if self._target is None:
                raise ValueError(f"{self.name}: the state has an EMA target but target_ema is 0")
            self._target.load_state_dict(sd)


class _ConsistencyBase(_EMATargetMixin, DiffusionObjective):
    """Shared machinery of consistency distillation / training (see the subclasses)."""

    def __init__(
        self,
        schedule: VPSchedule | None = None,
        *,
        sigma_data: float = 0.5,
        sigma_min: float | None = None,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        discretization_steps: int | None = None,
        initial_steps: int = 10,
        final_steps: int = 1280,
        total_steps: int = 400_000,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        interval_sampling: str = "lognormal",
        loss_type: str = "pseudo_huber",
        huber_c: float | None = None,
        weighting: str = "inverse_delta",
        target_ema: float = 0.0,
    ) -> None:
        super().__init__(schedule)
        n = self.name
        self.sigma_data = _float_param(f"{n}.sigma_data", sigma_data, low=0, low_open=True)
        self.sigma_max = _float_param(f"{n}.sigma_max", sigma_max, low=0, low_open=True)
        self.rho = _float_param(f"{n}.rho", rho, low=0, low_open=True)
        if sigma_min is not None:
            sigma_min = _float_param(f"{n}.sigma_min", sigma_min, low=0, low_open=True)
        self.sigma_min_request = sigma_min
        if discretization_steps is not None:
            discretization_steps = _int_param(f"{n}.discretization_steps", discretization_steps, 2)
        self.discretization_steps = discretization_steps
        self.initial_steps = _int_param(f"{n}.initial_steps", initial_steps, 1)
        self.final_steps = _int_param(f"{n}.final_steps", final_steps, self.initial_steps)
        self.total_steps = _int_param(f"{n}.total_steps", total_steps, 1)
        self.p_mean = _float_param(f"{n}.p_mean", p_mean)
        self.p_std = _float_param(f"{n}.p_std", p_std, low=0, low_open=True)
        self.interval_sampling = _choice(
            f"{n}.interval_sampling", interval_sampling, ("lognormal", "uniform")
        )
        self.loss_type = _choice(f"{n}.loss_type", loss_type, ("pseudo_huber", "l2"))
        if huber_c is not None:
            huber_c = _float_param(f"{n}.huber_c", huber_c, low=0, low_open=True)
        self.huber_c = huber_c
        self.weighting = _choice(f"{n}.weighting", weighting, ("inverse_delta", "uniform"))
        self.target_ema = _float_param(
            f"{n}.target_ema", target_ema, low=0.0, high=1.0, high_open=True
        )
        # the grid's end points are fixed; sigma_min is the sigma of the lowest point
        probe = consistency_timesteps(
            self.schedule, 2, sigma_min=sigma_min, sigma_max=self.sigma_max, rho=self.rho
        )
        self.t_min, self.t_max = int(probe[0]), int(probe[-1])
        self.sigma_min = float(edm_sigma(self.schedule, torch.tensor([self.t_min]))[0])
        self._grids: dict[int, Tensor] = {}
        self._target: nn.Module | None = None
        self._needs_target_copy = False

    # -- grid / curriculum ---------------------------------------------------------------
    def current_steps(self) -> int:
        """N (grid points) now: fixed ``discretization_steps`` or iCT's N(k) curriculum."""
        if self.discretization_steps is not None:
            return self.discretization_steps
        return ict_num_steps(self.iteration, self.total_steps, self.initial_steps, self.final_steps)

    def grid(self, n: int | None = None) -> Tensor:
        """Ascending VP timesteps of the N-point grid (see :func:`consistency_timesteps`)."""
        n = self.current_steps() if n is None else int(n)
        if n not in self._grids:
            self._grids[n] = consistency_timesteps(
                self.schedule,
                n,
                sigma_min=self.sigma_min_request,
                sigma_max=self.sigma_max,
                rho=self.rho,
            )
        return self._grids[n]

    def interval_probs(self, n: int | None = None) -> Tensor:
        g = self.grid(n)
        if self.interval_sampling == "uniform":
            return torch.full((g.numel() - 1,), 1.0 / (g.numel() - 1), dtype=torch.float64)
        return lognormal_interval_probs(edm_sigma(self.schedule, g), self.p_mean, self.p_std)

    # -- parameterisation ----------------------------------------------------------------
    def boundary_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Consistency models' ``c_skip(σ) = σ_d²/((σ − σ_min)² + σ_d²)``, ``c_out(σ) = σ_d(σ − σ_min)/√(σ_d² + σ²)``.

        Song, Dhariwal, Chen & Sutskever, "Consistency Models" (2023), App. C, with σ the
        EDM level of VP timestep ``t`` (:func:`edm_sigma`), σ_d = ``sigma_data`` = 0.5 and
        σ_min the σ of the grid's lowest timestep, so ``c_skip(σ_min) = 1``,
        ``c_out(σ_min) = 0`` exactly. Float64 ``[B]``.
        """
        sig = edm_sigma(self.schedule, t)
        sd, dm = self.sigma_data, sig - self.sigma_min
        return sd**2 / (dm**2 + sd**2), sd * dm / torch.sqrt(sd**2 + sig**2)

    def output_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``f(x_t, t) = A·x_t/α_t + B·x̂0(x_t, t)`` (float64 ``[B]``).

        The VP network is read as an EDM denoiser ``x̂0 = c_skip^EDM x + c_out^EDM F`` (Karras
        et al., 2022: ``c_skip^EDM = σ_d²/(σ² + σ_d²)``, ``c_out^EDM = σσ_d/√(σ² + σ_d²)``) on
        the EDM input ``x = x_t/α_t``; its raw output ``F`` is put through the consistency
        boundary parameterisation ``f = c_skip x + c_out F``. Hence ``B = c_out/c_out^EDM =
        (σ − σ_min)/σ`` and ``A = c_skip − B·c_skip^EDM`` (a student initialised from the
        teacher starts as the teacher's denoiser up to the σ_min shift — reconstruction of how
        the EDM-parameterised consistency models map onto a VP ε/v/x0 network).
        """
        sig = edm_sigma(self.schedule, t)
        c_skip, _ = self.boundary_coefficients(t)
        b = (sig - self.sigma_min) / sig
        a = c_skip - b * self.sigma_data**2 / (sig**2 + self.sigma_data**2)
        return a, b

    def consistency_fn(
        self, model: Callable, x_t: Tensor, t: Tensor, role: str = "student"
    ) -> Tensor:
        """``f_θ(x_t, t)``: the consistency model's clean-sample estimate (EDM = data space)."""
        x0 = self.schedule.to_x0(_predict(model, x_t, t, role), x_t, t)
        alpha, _ = self.schedule.alpha_sigma(t)
        a, b = self.output_coefficients(t)
        return _b(a, x_t) * (x_t / _b(alpha, x_t)) + _b(b, x_t) * x0

    def as_x0_model(self, student: nn.Module) -> nn.Module:
        """``student`` wrapped so ``model(x_t, t)`` returns ``f_θ(x_t, t)`` (for x0-predicting samplers)."""
        return _ConsistencyX0(self, student)

    # -- loss ----------------------------------------------------------------------------
    def _lower_point(self, teacher, x0, x_hi, z, t_hi, t_lo) -> Tensor:
        raise NotImplementedError

    def _build(self, student, teacher, x0) -> None:
        if self.target_ema > 0 and (self._target is None or self._needs_target_copy):
            self._target = _frozen_copy(student)
            self._needs_target_copy = False

    def aux_modules(self) -> list[nn.Module]:
        return [] if self._target is None else [self._target]

    def loss(self, student, teacher, x0, generator=None):
        x0 = _check_batch(self.name, x0)
        self.setup(student, teacher, x0)
        n = self.current_steps()
        grid = self.grid(n).to(x0.device)
        B, dev = x0.shape[0], x0.device
        i = _categorical(self.interval_probs(n), B, dev, generator)
        t_lo, t_hi = grid[i], grid[i + 1]
        z = _randn(x0, generator)
        x_hi = self.schedule.add_noise(x0, z, t_hi)
        with torch.no_grad():
            x_lo = self._lower_point(teacher, x0, x_hi, z, t_hi, t_lo)
        f_hi = self.consistency_fn(student, x_hi, t_hi)
        target_model = student if self._target is None else self._target
        with torch.no_grad():
            f_lo = self.consistency_fn(target_model, x_lo, t_lo, role="student (target)")
        if self.loss_type == "pseudo_huber":
            d = pseudo_huber(f_hi, f_lo, self.huber_c)
        else:
            d = _per_sample_mean((f_hi - f_lo) ** 2)
        if self.weighting == "inverse_delta":
            lam = 1.0 / (edm_sigma(self.schedule, t_hi) - edm_sigma(self.schedule, t_lo))
        else:
            lam = torch.ones(B, dtype=torch.float64)
        lam = lam.to(device=dev, dtype=d.dtype)
        loss = (lam * d).mean()
        logs = {
            "loss": float(loss.detach()),
            "discretization_steps": n,
            "grid_points": int(grid.numel()),
            "distance": float(d.detach().mean()),
            "weight_mean": float(lam.mean()),
        }
        return loss, logs

    def after_step(self, student) -> dict[str, Any]:
        logs = super().after_step(student)
        self._update_target(student)
        return logs

    def sample(
        self, student, noise, generator=None, timesteps: Sequence[int] | None = None
    ) -> Tensor:
        """Consistency sampling (CM Algorithm 1): ``f`` at ``timesteps`` (default ``[t_max]``, 1 NFE), re-noising in between."""
        ts = [self.t_max] if timesteps is None else [int(t) for t in timesteps]
        if not ts:
            raise ValueError("sample needs at least 1 timestep (NFE >= 1)")
        if any(not self.t_min <= t <= self.t_max for t in ts) or any(
            b >= a for a, b in zip(ts, ts[1:])
        ):
            raise ValueError(
                f"timesteps must be strictly descending within [{self.t_min}, {self.t_max}], got {ts}"
            )
        B = noise.shape[0]
        with torch.no_grad():
            t0 = torch.full((B,), ts[0], dtype=torch.long, device=noise.device)
            x = _b(self.schedule.alpha_sigma(t0)[1], noise) * noise
            for j, t in enumerate(ts):
                tt = torch.full((B,), t, dtype=torch.long, device=noise.device)
                out = self.consistency_fn(student, x, tt)
                if j + 1 < len(ts):
                    tn = torch.full_like(tt, ts[j + 1])
                    x = self.schedule.add_noise(out, _randn(out, generator), tn)
        return out


class _ConsistencyX0(nn.Module):
    def __init__(self, objective: _ConsistencyBase, student: nn.Module):
        super().__init__()
        self.objective = objective
        self.student = student

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(x_t.shape[0])
        return self.objective.consistency_fn(self.student, x_t, t)


_CM_DOC = """

    Shared rules (Song, Dhariwal, Chen & Sutskever, "Consistency Models", 2023, with the
    improvements of Song & Dhariwal, "Improved Techniques for Training Consistency Models",
    2023 — iCT — applied by default):

    * **Grid.** EDM noise levels σ (Karras et al., 2022) are tied to the VP schedule by
      ``σ_EDM(t) = σ_t/α_t`` (:func:`edm_sigma`; ``x_t/α_t = x0 + σ_EDM ε``). The N-point
      grid is Karras' ρ = 7 spacing between σ_min = σ_EDM(t = 0) (or ``sigma_min``) and
      ``sigma_max`` = 80, each level snapped to the nearest VP timestep
      (:func:`consistency_timesteps`).
    * **Curriculum.** N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 with s0 = ``initial_steps`` = 10,
      s1 = ``final_steps`` = 1280, K = ``total_steps`` = 400 000 (iCT's CIFAR-10 length),
      k = ``self.iteration`` (:func:`ict_num_steps`); ``discretization_steps`` fixes N.
    * **Intervals.** ``[σ_i, σ_{i+1}]`` drawn with iCT's lognormal probabilities
      (P_mean = −1.1, P_std = 2.0; :func:`lognormal_interval_probs`) or ``"uniform"``.
    * **Parameterisation.** ``f_θ(x_t, t) = A·x_t/α_t + B·x̂0_θ(x_t, t)`` — the boundary
      condition c_skip/c_out with ``f(x, σ_min) = x`` (:meth:`output_coefficients`).
    * **Loss.** ``λ(σ_i)·d(f_θ(x_{σ_{i+1}}, σ_{i+1}), sg(f_θ⁻(x_{σ_i}, σ_i)))``, mean over the
      batch, with ``d`` the Pseudo-Huber distance, c = 0.00054·√d (``loss_type``,
      ``huber_c``) and ``λ = 1/(σ_{i+1} − σ_i)`` (``weighting="inverse_delta"``).
    * **Target.** iCT drops the EMA teacher: θ⁻ = sg(θ), the student itself under no-grad
      (``target_ema=0``). ``target_ema=μ > 0`` keeps an owned EMA copy (CM's original
      setting, μ = 0.95 for CD), updated in :meth:`after_step` and checkpointed.
    """


class ConsistencyDistillation(_ConsistencyBase):
    """Consistency distillation (CD): the teacher's one-step DDIM ODE solver links adjacent levels.

    ``x_{σ_{i+1}} = α x0 + σ z``; ``x̂_{σ_i} = DDIM_teacher(x_{σ_{i+1}}, t_{i+1} → t_i)`` —
    DDIM is the first-order (Euler) solver of the probability-flow ODE in EDM coordinates
    (Song et al., 2023, use Heun; DDIM is what this schedule offers and is exact for a
    single-point data set). The original CM CD setting is ``discretization_steps=18,
    target_ema=0.95, loss_type="l2", weighting="uniform", interval_sampling="uniform"`` (LPIPS
    is not available here); the defaults are iCT's.
    """

    name = "consistency_distillation"

    def _lower_point(self, teacher, x0, x_hi, z, t_hi, t_lo) -> Tensor:
        x0_t = self.schedule.to_x0(_predict(teacher, x_hi, t_hi, "teacher"), x_hi, t_hi)
        return self.schedule.ddim_step(x_hi, x0_t, t_hi, t_lo)


class ConsistencyTraining(_ConsistencyBase):
    """Consistency training (CT): no teacher; both points share the noise, ``x_{σ} = α x0 + σ z``.

    The unbiased estimator of the score at the data point replaces the teacher's ODE step
    (Song et al., 2023, Sec. 5); with the iCT defaults below this is iCT. ``teacher`` is
    ignored (may be ``None``).
    """

    name = "consistency_training"
    needs_teacher = False

    def _lower_point(self, teacher, x0, x_hi, z, t_hi, t_lo) -> Tensor:
        return self.schedule.add_noise(x0, z, t_lo)


for _cls in (ConsistencyDistillation, ConsistencyTraining):
    if _cls.__doc__:  # None under python -OO
        _cls.__doc__ += _CM_DOC


# ----------------------------------------------------------------------------- few-step generators


class _GeneratorMixin:
    """A one- or few-step generator from noise, with DMD2's backward simulation when training."""

    schedule: VPSchedule
    name: str

    def _init_generator(self, num_steps: int, generator_timesteps: Sequence[int] | None) -> None:
        if generator_timesteps is None:
            n = _nfe_param(f"{self.name}.num_steps", num_steps)
            ts = self.schedule.timesteps(n).tolist()
        else:
            ts = [int(t) for t in generator_timesteps]
            T = self.schedule.num_train_timesteps
            if not ts:
                raise ValueError(
                    f"{self.name}.generator_timesteps must hold at least 1 timestep (NFE >= 1)"
                )
            if any(not 0 <= t < T for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
                raise ValueError(
                    f"{self.name}.generator_timesteps must be strictly descending in [0, {T}), got {ts}"
                )
        self.generator_timesteps = ts

    def generate(
        self, student: nn.Module, noise: Tensor, generator=None, *, simulate: bool = True
    ) -> Tensor:
        """Generator samples with gradient through the last student call.

        One step: ``x0 = to_x0(student(noise, t_0))``. Few steps with ``simulate`` (training):
        DMD2's backward simulation — a step ``k`` drawn uniformly, the student run without
        gradient through steps ``0..k−1`` (each output re-noised with fresh noise to the next
        timestep), then step ``k`` with gradient (Yin et al., 2024, Sec. 4.5). Without
        ``simulate``: every step, the last one with gradient.
        """
        ts = self.generator_timesteps
        B, dev = noise.shape[0], noise.device
        k = len(ts) - 1
        if simulate and len(ts) > 1:
            k = int(_randint(0, len(ts), 1, "cpu", generator)[0])
        x = noise
        with torch.no_grad():
            for j in range(k):
                tt = torch.full((B,), ts[j], dtype=torch.long, device=dev)
                x0 = self.schedule.to_x0(_predict(student, x, tt, "student"), x, tt)
                tn = torch.full_like(tt, ts[j + 1])
                x = self.schedule.add_noise(x0, _randn(x0, generator), tn)
        tt = torch.full((B,), ts[k], dtype=torch.long, device=dev)
        return self.schedule.to_x0(_predict(student, x, tt, "student"), x, tt)

    def sample(self, student, noise, generator=None) -> Tensor:
        """All generator steps without gradient (``len(generator_timesteps)`` NFE)."""
        with torch.no_grad():
            return self.generate(student, noise, generator, simulate=False)


# ----------------------------------------------------------------------------- 3. DMD2


class DMD2(_GeneratorMixin, DiffusionObjective):
    """DMD2: distribution matching with a fake score trained on a faster time scale.

    Yin, Gharbi, Park, Richardson, Shechtman, Durand & Freeman, "Improved Distribution Matching
    Distillation for Fast Image Synthesis" (2024). The student is a one- or few-step generator
    from noise (:meth:`generate`; ``num_steps`` = 1 by default at ``t = T − 1``, several steps
    use ``schedule.timesteps(num_steps)`` — 999/749/499/249 for 4 — with backward simulation).

    **Generator loss** (``loss``), on a generator sample ``x``::

        t ~ U{⌊0.02T⌋ .. ⌊0.98T⌋},  x_t = α_t sg(x) + σ_t ε
        g = (x̂0_fake(x_t) − x̂0_real(x_t)) / mean_dims |x − x̂0_real(x_t)|   (per example)
        L_DM = ½ · mean (x − sg(x − g))²      (so ∂L/∂x = g / numel)

    with the real score the (frozen) teacher and the fake score a trainable copy of it
    (``fake_score``; default ``deepcopy(teacher)``). No regression loss. With
    ``gan_weight > 0`` (default 0, off; DMD2 used 3e-3 on ImageNet) the non-saturating GAN term
    ``gan_weight·softplus(−D(x_t', t'))``, ``t' ~ U{0..T−1}``, is added.

    **Fake-score loss** (``aux_loss``) on detached generator samples: the denoising loss
    ``mean (fake(x_t, t) − schedule.target(x, ε, t))²``, ``t ~ U{0..T−1}`` (ε-MSE for an ε
    teacher, as DMD2), plus with the GAN on ``disc_weight·(softplus(D(fake_t)) +
    softplus(−D(real_t)))`` (``disc_weight`` = 1e-2, DMD2's ImageNet value), real = ``x0``.
    **Discriminator:** the paper puts a classification head on the fake-score U-Net's
    bottleneck; denoisers here expose only ``denoiser(x_t, t)``, so this implementation uses a
    *separate* small MLP ``D(x_t, t)`` on flattened noised samples with a sinusoidal time
    embedding (``discriminator`` to supply another module). The fake score and discriminator
    train with the objective's own AdamW (``fake_lr`` = 2e-6, betas (0.9, 0.999),
    weight_decay 0.01, gradient clipping ``max_grad_norm`` = 10 — DMD2's ImageNet settings).

    **Two time-scale update rule:** :meth:`train_step` runs ``fake_updates`` (= 5) fake-score
    updates (fresh generator samples each) before every generator update (DMD2 interleaves
    them as one fake update per iteration and a generator update every 5th). Stability logs:
    ``fake_loss``, ``fake_grad_norm``, ``grad_norm`` (generator), ``dm_grad_norm``; the fake
    losses are kept in ``history`` and :meth:`diverged` (run by ``train_step``) warns when
    they grow by more than ``divergence_factor`` (3) over ``divergence_window`` (50) updates.
    """

    name = "dmd2"

    def __init__(
        self,
        schedule: VPSchedule | None = None,
        *,
        num_steps: int = 1,
        generator_timesteps: Sequence[int] | None = None,
        fake_updates: int = 5,
        fake_lr: float = 2e-6,
        fake_betas: Sequence[float] = (0.9, 0.999),
        fake_weight_decay: float = 0.01,
        max_grad_norm: float | None = 10.0,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        gan_weight: float = 0.0,
        disc_weight: float = 1e-2,
        disc_hidden: int = 128,
        fake_score: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        divergence_window: int = 50,
        divergence_factor: float = 3.0,
    ) -> None:
        DiffusionObjective.__init__(self, schedule)
        n = self.name
        self._init_generator(num_steps, generator_timesteps)
        self.fake_updates = _int_param(f"{n}.fake_updates", fake_updates, 1)
        self.fake_lr = _float_param(f"{n}.fake_lr", fake_lr, low=0, low_open=True)
        betas = tuple(float(b) for b in fake_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{n}.fake_betas must be two numbers in [0, 1), got {fake_betas!r}")
        self.fake_betas = betas
        self.fake_weight_decay = _float_param(f"{n}.fake_weight_decay", fake_weight_decay, low=0)
        if max_grad_norm is not None:
            max_grad_norm = _float_param(f"{n}.max_grad_norm", max_grad_norm, low=0, low_open=True)
        self.max_grad_norm = max_grad_norm
        self.min_step_percent = _float_param(
            f"{n}.min_step_percent", min_step_percent, low=0, high=1
        )
        self.max_step_percent = _float_param(
            f"{n}.max_step_percent", max_step_percent, low=0, high=1
        )
        self.min_t = int(self.min_step_percent * self.T)
        self.max_t = min(int(self.max_step_percent * self.T), self.T - 1)
        if self.max_t < self.min_t:
            raise ValueError(
                f"{n}.max_step_percent={max_step_percent} is below min_step_percent={min_step_percent}"
            )
        self.gan_weight = _float_param(f"{n}.gan_weight", gan_weight, low=0)
        self.disc_weight = _float_param(f"{n}.disc_weight", disc_weight, low=0)
        self.disc_hidden = _int_param(f"{n}.disc_hidden", disc_hidden, 1)
        if fake_score is not None and not isinstance(fake_score, nn.Module):
            raise ValueError(
                f"{n}.fake_score must be an nn.Module, got {type(fake_score).__name__}"
            )
        if discriminator is not None and not isinstance(discriminator, nn.Module):
            raise ValueError(
                f"{n}.discriminator must be an nn.Module, got {type(discriminator).__name__}"
            )
        self.fake_score: nn.Module | None = fake_score
        self.discriminator: nn.Module | None = discriminator
        self.divergence_window = _int_param(f"{n}.divergence_window", divergence_window, 1)
        self.divergence_factor = _float_param(
            f"{n}.divergence_factor", divergence_factor, low=1, low_open=True
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[float] = []
        self._warned_at = -(10**9)

    @property
    def use_gan(self) -> bool:
        return self.gan_weight > 0

    def _build(self, student, teacher, x0) -> None:
        if self.fake_score is None:
            self.fake_score = copy.deepcopy(teacher)
        self.fake_score.requires_grad_(True)
        self.fake_score.train()
        if self.use_gan and self.discriminator is None:
            self.discriminator = _NoisyDiscriminator(x0[0].numel(), self.disc_hidden)
            p = next(iter(self.fake_score.parameters()), None)
            if p is not None:
                self.discriminator.to(p.device)
        params = self.aux_parameters()
        if not params:
            raise ValueError(
                f"{self.name}: the fake score has no trainable parameters (pass fake_score=, a "
                f"trainable copy of the teacher)"
            )
        self.optimizer = torch.optim.AdamW(
            params, lr=self.fake_lr, betas=self.fake_betas, weight_decay=self.fake_weight_decay
        )

    def aux_modules(self) -> list[nn.Module]:
        mods = [self.fake_score] if self.fake_score is not None else []
        if self.use_gan and self.discriminator is not None:
            mods.append(self.discriminator)
        return mods

    def _disc_logits(self, x: Tensor, generator) -> Tensor:
        t = _randint(0, self.T, x.shape[0], x.device, generator)
        x_t = self.schedule.add_noise(x, _randn(x, generator), t)
        return self.discriminator(x_t, t).reshape(x.shape[0], -1).mean(1)

    def distribution_matching_grad(self, teacher, x: Tensor, generator=None) -> Tensor:
        """The (normalised) DMD gradient ``g`` at generator samples ``x`` (no grad)."""
        with torch.no_grad():
            x = x.detach()
            t = _randint(self.min_t, self.max_t + 1, x.shape[0], x.device, generator)
            x_t = self.schedule.add_noise(x, _randn(x, generator), t)
            real = self.schedule.to_x0(_predict(teacher, x_t, t, "teacher"), x_t, t)
            fake = self.schedule.to_x0(_predict(self.fake_score, x_t, t, "fake score"), x_t, t)
            p_real, p_fake = x - real, x - fake
            norm = p_real.abs().flatten(1).mean(1)
            return torch.nan_to_num((p_real - p_fake) / _b(norm, x))

    def loss(self, student, teacher, x0, generator=None):
        x0 = _check_batch(self.name, x0)
        self.setup(student, teacher, x0)
        x = self.generate(student, _randn(x0, generator), generator)
        g = self.distribution_matching_grad(teacher, x, generator)
        loss_dm = 0.5 * F.mse_loss(x, (x - g).detach())
        loss = loss_dm
        logs: dict[str, Any] = {"loss_dm": float(loss_dm.detach()), "dm_grad_norm": float(g.norm())}
        if self.use_gan:
            loss_gan = F.softplus(-self._disc_logits(x, generator)).mean()
            loss = loss + self.gan_weight * loss_gan
            logs["loss_gan"] = float(loss_gan.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def aux_loss(self, student, teacher, x0, generator=None) -> tuple[Tensor, dict[str, float]]:
        """The fake-score denoising loss on generator samples (+ the discriminator loss)."""
        x0 = _check_batch(self.name, x0)
        self.setup(student, teacher, x0)
        with torch.no_grad():
            x = self.generate(student, _randn(x0, generator), generator)
        t = _randint(0, self.T, x.shape[0], x.device, generator)
        eps = _randn(x, generator)
        x_t = self.schedule.add_noise(x, eps, t)
        pred = _predict(self.fake_score, x_t, t, "fake score")
        loss_fake = F.mse_loss(pred, self.schedule.target(x, eps, t))
        loss = loss_fake
        logs = {"fake_loss": float(loss_fake.detach())}
        if self.use_gan:
            d_fake = self._disc_logits(x, generator)
            d_real = self._disc_logits(x0.detach(), generator)
            loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
            loss = loss + self.disc_weight * loss_d
            logs["disc_loss"] = float(loss_d.detach())
            logs["disc_real_prob"] = float(torch.sigmoid(d_real.detach()).mean())
            logs["disc_fake_prob"] = float(torch.sigmoid(d_fake.detach()).mean())
        return loss, logs

    def aux_step(self, student, teacher, x0, generator=None) -> dict[str, float]:
        """One optimizer update of the fake score (and discriminator) with the owned AdamW."""
        self.setup(student, teacher, x0)
        loss, logs = self.aux_loss(student, teacher, x0, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs["fake_grad_norm"] = _grad_norm(self.aux_parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.history.append(logs["fake_loss"])
        cap = 200 * self.divergence_window
        if len(self.history) > 2 * cap:
            del self.history[:-cap]
        return logs

    def train_step(self, student, teacher, x0, optimizer, generator=None, *, max_grad_norm=None):
        """``fake_updates`` × :meth:`aux_step`, then one generator update (two time-scale rule)."""
        self.setup(student, teacher, x0)
        aux = [self.aux_step(student, teacher, x0, generator) for _ in range(self.fake_updates)]
        logs = super().train_step(
            student, teacher, x0, optimizer, generator, max_grad_norm=max_grad_norm
        )
        for key in aux[0]:
            logs[key] = sum(a[key] for a in aux) / len(aux)
        logs["fake_loss_last"] = aux[-1]["fake_loss"]
        logs["diverged"] = False
        if len(self.history) - self._warned_at >= self.divergence_window:
            if self.diverged(warn=True):
                logs["diverged"] = True
                self._warned_at = len(self.history)
        return logs

    def diverged(
        self, logs_history: Sequence[Any] | None = None, *, window=None, factor=None, warn=True
    ) -> bool:
        """:func:`fake_loss_diverged` on ``logs_history`` (default: the owned ``history``)."""
        return fake_loss_diverged(
            self.history if logs_history is None else logs_history,
            window=self.divergence_window if window is None else window,
            factor=self.divergence_factor if factor is None else factor,
            warn=warn,
        )

    def _extra_state(self) -> dict[str, Any]:
        return {
            "fake_score": None if self.fake_score is None else self.fake_score.state_dict(),
            "discriminator": (
                self.discriminator.state_dict()
                if self.use_gan and self.discriminator is not None
                else None
            ),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "history": list(self.history),
            "warned_at": self._warned_at,
        }

    def _apply_state(self, state) -> None:
        if state.get("fake_score") is not None:
            self.fake_score.load_state_dict(state["fake_score"])
        if state.get("discriminator") is not None:
            if self.discriminator is None:
                raise ValueError(f"{self.name}: the state has a discriminator but gan_weight is 0")
            self.discriminator.load_state_dict(state["discriminator"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.history = [float(v) for v in state.get("history", [])]
        self._warned_at = int(state.get("warned_at", -(10**9)))

    def _prepare_load(self, state) -> None:
        self.history = [float(v) for v in state.get("history", [])]


# ----------------------------------------------------------------------------- 4. embedding loss


class EmbeddingMMD(_GeneratorMixin, DiffusionObjective):
    """Embedding Loss: MMD between features of student samples and reference samples.

    Ying, Chen, Li, Xu & Xiao, "Efficient Diffusion Distillation via Embedding Loss" (2026,
    arXiv 2604.22379). Generator samples ``x_S`` (as in :class:`DMD2`: ``num_steps`` = 1 from
    noise at ``T − 1``) are compared with a reference batch — ``x0`` (``reference="data"``,
    default: the paper aligns the generator with the data; pass teacher samples as ``x0`` for
    teacher-sample matching) or teacher samples drawn on the fly by ``teacher_steps``-step DDIM
    from fresh noise (``reference="teacher"``)::

        L = weight · (1/|Φ|) Σ_φ MMD²_RBF(φ(x_S), sg(φ(x_ref)))

    ``features``: a callable, a list of callables (each ``[B, ...] -> [B, ...]``, flattened),
    ``"identity"`` (default), or ``"random"`` — ``num_feature_nets`` (4) frozen random MLPs of
    width ``feature_width`` (256) from ``feature_seed`` (:func:`random_feature_nets`). Kernel:
    :func:`mmd_rbf` (median-heuristic bandwidth × ``kernel_scales`` (0.5, 1, 2), V-statistic).
    Reconstructed: the paper's exact feature networks, bandwidths and weight are not
    reproduced (only its abstract was available); the paper uses EL as a supplementary loss
    beside DMD/DI/CM — add ``weight × this loss`` to another objective's loss to do that.
    """

    name = "embedding_mmd"
    needs_teacher = False

    def __init__(
        self,
        schedule: VPSchedule | None = None,
        *,
        num_steps: int = 1,
        generator_timesteps: Sequence[int] | None = None,
        features: Any = "identity",
        num_feature_nets: int = 4,
        feature_width: int = 256,
        feature_seed: int = 0,
        kernel_scales: Sequence[float] = (0.5, 1.0, 2.0),
        unbiased: bool = False,
        reference: str = "data",
        teacher_steps: int = 32,
        weight: float = 1.0,
    ) -> None:
        DiffusionObjective.__init__(self, schedule)
        n = self.name
        self._init_generator(num_steps, generator_timesteps)
        if isinstance(features, str):
            _choice(f"{n}.features", features, ("identity", "random"))
        elif not (
            callable(features)
            or (isinstance(features, Sequence) and features and all(callable(f) for f in features))
        ):
            raise ValueError(
                f"{n}.features must be 'identity', 'random', a callable or a list of callables"
            )
        self.features_spec = features
        self.num_feature_nets = _int_param(f"{n}.num_feature_nets", num_feature_nets, 1)
        self.feature_width = _int_param(f"{n}.feature_width", feature_width, 1)
        self.feature_seed = _int_param(f"{n}.feature_seed", feature_seed, None)
        scales = [float(s) for s in kernel_scales]
        if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
            raise ValueError(f"{n}.kernel_scales must be positive numbers, got {kernel_scales!r}")
        self.kernel_scales = tuple(scales)
        self.unbiased = bool(unbiased)
        self.reference = _choice(f"{n}.reference", reference, ("data", "teacher"))
        self.teacher_steps = _nfe_param(f"{n}.teacher_steps", teacher_steps)
        self.weight = _float_param(f"{n}.weight", weight, low=0)
        self.needs_teacher = self.reference == "teacher"
        self._features: list[Callable] = []

    def _build(self, student, teacher, x0) -> None:
        spec = self.features_spec
        if spec == "identity":
            self._features = [lambda x: x]
        elif spec == "random":
            nets = random_feature_nets(
                x0[0].numel(),
                num=self.num_feature_nets,
                width=self.feature_width,
                seed=self.feature_seed,
            )
            self._features = [m.to(x0.device) for m in nets]
        elif callable(spec):
            self._features = [spec]
        else:
            self._features = list(spec)

    def aux_modules(self) -> list[nn.Module]:
        return [f for f in self._features if isinstance(f, nn.Module)]

    def aux_parameters(self) -> list[nn.Parameter]:
        return []  # feature extractors are fixed

    def mmd(self, samples: Tensor, reference: Tensor) -> Tensor:
        """``(1/|Φ|) Σ_φ MMD²(φ(samples), sg(φ(reference)))`` (unweighted)."""
        total = 0.0
        for phi in self._features:
            fs = phi(samples).flatten(1)
            with torch.no_grad():
                fr = phi(reference).flatten(1)
            if fs.shape[1] != fr.shape[1]:
                raise ValueError(
                    f"{self.name}: student and reference features differ in size "
                    f"({fs.shape[1]} vs {fr.shape[1]})"
                )
            total = total + mmd_rbf(
                fs, fr.to(fs.dtype), scales=self.kernel_scales, unbiased=self.unbiased
            )
        return total / len(self._features)

    def loss(self, student, teacher, x0, generator=None):
        x0 = _check_batch(self.name, x0, minimum=2)
        self.setup(student, teacher, x0)
        x = self.generate(student, _randn(x0, generator), generator)
        if self.reference == "teacher":
            ts = self.schedule.timesteps(self.teacher_steps).tolist()
            ref = _ddim_sample(teacher, self.schedule, _randn(x0, generator), ts)
        else:
            ref = x0
        value = self.mmd(x, ref)
        loss = self.weight * value
        return loss, {"loss": float(loss.detach()), "mmd2": float(value.detach())}


# ----------------------------------------------------------------------------- 5. Hyper-SD TSCD


class TrajectorySegmentedCD(_EMATargetMixin, DiffusionObjective):
    """Hyper-SD's trajectory segmented consistency distillation (TSCD).

    Ren, Xia, Lu, Zhang, Wu, Xie, Wang & Xiao, "Hyper-SD: Trajectory Segmented Consistency
    Model for Efficient Image Synthesis" (2024), Sec. 3.1. The timestep range is cut into
    ``k`` segments at the boundaries ``schedule.timesteps(k) + [−1]``; within a segment the
    student is a consistency model onto the segment's lower boundary ``s``::

        F_θ(x_t, t) = DDIM(x_t, x̂0_θ(x_t, t), t → s)        (F(x_s, s) = x_s: boundary)
        t ~ U(teacher grid = schedule.timesteps(ode_steps)),  x_t = α_t x0 + σ_t ε
        t' = max(next teacher grid point below t, s)
        x_t' = DDIM_teacher(x_t, t → t')
        L = mean_batch d(F_θ(x_t, t), sg(F_θ⁻(x_t', t')))   (target x_t' itself when t' = s)

    The number of segments follows ``segments`` = (8, 4, 2, 1), each stage
    ``iters_per_stage`` (10 000) optimizer steps; with one segment this is ordinary CD onto
    clean data (``F = x̂0``). After stage ``k`` the student samples in ``k`` steps on the
    boundaries (:meth:`sample`). ``d``: mean squared error (``loss_type="l2"``, default) or
    Pseudo-Huber. θ⁻ = sg(θ) (``target_ema=0``, default) or an owned EMA copy.
    Reconstructed: the stage lengths, ``ode_steps`` = 50 (LCM's skipping interval 20 on
    1000 steps) and the DDIM-to-boundary parameterisation follow the paper's description; its
    adversarial term, human-feedback and score-distillation stages are not included.
    """

    name = "hyper_sd_tscd"

    def __init__(
        self,
        schedule: VPSchedule | None = None,
        *,
        segments: Sequence[int] = (8, 4, 2, 1),
        iters_per_stage: int = 10_000,
        ode_steps: int = 50,
        loss_type: str = "l2",
        huber_c: float | None = None,
        target_ema: float = 0.0,
    ) -> None:
        super().__init__(schedule)
        n = self.name
        if isinstance(segments, (int, str)) or not segments:
            raise ValueError(
                f"{n}.segments must be a non-empty list of segment counts, got {segments!r}"
            )
        segs = [_nfe_param(f"{n}.segments", k) for k in segments]
        if any(b >= a for a, b in zip(segs, segs[1:])):
            raise ValueError(
                f"{n}.segments must be strictly decreasing (e.g. 8, 4, 2, 1), got {segs}"
            )
        if segs[0] > self.T:
            raise ValueError(f"{n}.segments: {segs[0]} segments exceed the {self.T} timesteps")
        self.segments = segs
        self.iters_per_stage = _int_param(f"{n}.iters_per_stage", iters_per_stage, 1)
        self.ode_steps = _nfe_param(f"{n}.ode_steps", ode_steps)
        if self.ode_steps > self.T:
            raise ValueError(f"{n}.ode_steps={ode_steps} exceeds the schedule's {self.T} timesteps")
        self.loss_type = _choice(f"{n}.loss_type", loss_type, ("l2", "pseudo_huber"))
        if huber_c is not None:
            huber_c = _float_param(f"{n}.huber_c", huber_c, low=0, low_open=True)
        self.huber_c = huber_c
        self.target_ema = _float_param(
            f"{n}.target_ema", target_ema, low=0.0, high=1.0, high_open=True
        )
        self._target: nn.Module | None = None
        self._needs_target_copy = False

    def current_segments(self) -> int:
        return self.segments[min(self.iteration // self.iters_per_stage, len(self.segments) - 1)]

    def boundaries(self, k: int | None = None) -> Tensor:
        """Ascending segment boundaries ``[−1, …, T − 1]`` (``k + 1`` values)."""
        k = self.current_segments() if k is None else _nfe_param("segments", k)
        return torch.cat([torch.tensor([-1]), self.schedule.timesteps(k).flip(0)])

    def segment_start(self, t: Tensor, k: int | None = None) -> Tensor:
        """The lower boundary ``s < t`` of the segment holding each timestep ``t``."""
        b = self.boundaries(k).to(t.device)
        idx = torch.searchsorted(b, t, right=False) - 1
        return b[idx.clamp_min(0)]

    def segment_fn(self, model, x_t: Tensor, t: Tensor, s: Tensor, role: str = "student") -> Tensor:
        """``F(x_t, t) = DDIM(x_t, x̂0(x_t, t), t → s)``."""
        x0 = self.schedule.to_x0(_predict(model, x_t, t, role), x_t, t)
        return self.schedule.ddim_step(x_t, x0, t, s)

    def _build(self, student, teacher, x0) -> None:
        if self.target_ema > 0 and (self._target is None or self._needs_target_copy):
            self._target = _frozen_copy(student)
            self._needs_target_copy = False

    def aux_modules(self) -> list[nn.Module]:
        return [] if self._target is None else [self._target]

    def loss(self, student, teacher, x0, generator=None):
        x0 = _check_batch(self.name, x0)
        self.setup(student, teacher, x0)
        k = self.current_segments()
        B, dev = x0.shape[0], x0.device
        grid = torch.cat([self.schedule.timesteps(self.ode_steps), torch.tensor([-1])]).to(dev)
        j = _randint(0, self.ode_steps, B, dev, generator)
        t, t_next = grid[j], grid[j + 1]
        s = self.segment_start(t, k)
        t_prime = torch.maximum(t_next, s)
        eps = _randn(x0, generator)
        x_t = self.schedule.add_noise(x0, eps, t)
        with torch.no_grad():
            x0_teacher = self.schedule.to_x0(_predict(teacher, x_t, t, "teacher"), x_t, t)
            x_tp = self.schedule.ddim_step(x_t, x0_teacher, t, t_prime)
            target = x_tp.clone()
            inner = (t_prime > s).nonzero().flatten()
            if inner.numel():
                tm = student if self._target is None else self._target
                target[inner] = self.segment_fn(
                    tm, x_tp[inner], t_prime[inner], s[inner], role="student (target)"
                )
        pred = self.segment_fn(student, x_t, t, s)
        if self.loss_type == "pseudo_huber":
            d = pseudo_huber(pred, target, self.huber_c)
        else:
            d = _per_sample_mean((pred - target) ** 2)
        loss = d.mean()
        return loss, {"loss": float(loss.detach()), "segments": k}

    def after_step(self, student) -> dict[str, Any]:
        logs = super().after_step(student)
        self._update_target(student)
        logs["segments"] = self.current_segments()
        return logs

    def sample(self, student, noise, generator=None, steps: int | None = None) -> Tensor:
        """DDIM on the segment boundaries: ``steps`` (default: current segments) NFE."""
        k = self.current_segments() if steps is None else _nfe_param("steps", steps)
        return _ddim_sample(student, self.schedule, noise, self.schedule.timesteps(k).tolist())


# ----------------------------------------------------------------------------- registry

DIFFUSION_OBJECTIVES: dict[str, type[DiffusionObjective]] = {
    "progressive": ProgressiveDistillation,
    "consistency_distillation": ConsistencyDistillation,
    "consistency_training": ConsistencyTraining,
    "dmd2": DMD2,
    "embedding_mmd": EmbeddingMMD,
    "hyper_sd_tscd": TrajectorySegmentedCD,
}


def objective_params(name: str) -> list[str]:
    """The keyword parameters ``build_objective(name, ...)`` accepts."""
    cls = _lookup(name)
    return [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _lookup(name: str) -> type[DiffusionObjective]:
    if name not in DIFFUSION_OBJECTIVES:
        names = sorted(DIFFUSION_OBJECTIVES)
        hint = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown diffusion objective {name!r}{extra} (known: {', '.join(names)})")
    return DIFFUSION_OBJECTIVES[name]


def build_objective(name: str, **params: Any) -> DiffusionObjective:
    """Build a registered objective by name; unknown names or parameters raise ``ValueError``."""
    cls = _lookup(name)
    valid = objective_params(name)
    unknown = [k for k in params if k not in valid]
    if unknown:
        parts = []
        for k in unknown:
            hint = difflib.get_close_matches(k, valid, n=1)
            parts.append(f"{k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        raise ValueError(
            f"unknown parameter(s) for diffusion objective {name!r}: {', '.join(parts)}; "
            f"valid: {', '.join(valid)}"
        )
    return cls(**params)


__all__ = [
    "DIFFUSION_OBJECTIVES",
    "DMD2",
    "ConsistencyDistillation",
    "ConsistencyTraining",
    "DiffusionObjective",
    "EmbeddingMMD",
    "ProgressiveDistillation",
    "ProgressiveSchedule",
    "TrajectorySegmentedCD",
    "build_objective",
    "consistency_timesteps",
    "edm_sigma",
    "fake_loss_diverged",
    "ict_num_steps",
    "karras_sigmas",
    "lognormal_interval_probs",
    "mmd_rbf",
    "objective_params",
    "pseudo_huber",
    "random_feature_nets",
    "x0_to_prediction",
]

"""TGeo-KD: a learned, per-sample fusion of the distillation and label losses.

Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu, "Less or More From Teacher: Exploiting Trilateral Geometry
For Knowledge Distillation" (ICLR 2024). Per counted row ``i``::

    L_i = α_i · τ²·KL(p_T^τ ‖ p_S^τ) + (1 − α_i) · CE(z_S, y_i),    α_i = f_φ(x_i) ∈ (0, 1)

``x_i`` holds the intra-sample relations of the student's prediction ``S = softmax(z_S)``, the
teacher's ``T = softmax(z_T)`` and the one-hot ground truth ``G``, and the inter-sample
relation to ``T̄``, the teacher's mean prediction over labelled samples of class ``y_i``
(:func:`tgeo_features`, the nine ``C``-vectors of the authors' CIFAR-100 code). ``f_φ`` is a
small MLP ``9C → hidden → 1`` with ReLU and a sigmoid. φ is learned by bilevel optimisation
(:meth:`TGeoKDLoss.meta_step`): the fused loss trains the student with α fixed; φ moves to lower
the student's CE on held-out labelled data after one virtual SGD step of the student.

φ is kept out of the loss module's parameters (the engine optimises every parameter of the
Objective with the student): it has its own Adam, and :meth:`TGeoKDLoss.fusion_state` /
:meth:`TGeoKDLoss.load_fusion_state` save and restore it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mentor.losses import _checks as C
from mentor.losses._base import LOSSES, Loss
from mentor.losses._reduce import counted_mask, upcast
from mentor.signals import HeadLogits

# Nine C-vectors per row: S, T, T̄, G, |S−G|, |S−T|, |S−T̄|, (G−T̄)⊙(G−S), (G−T)⊙(G−S).
FEATURES = 9
# Above this many classes the fusion net (9C inputs) and the class means (C×C) are too large:
# TGeo-KD is a classification method.
MAX_CLASSES = 8192

_CHECK = C.checker(
    temperature=C.positive,
    hidden=C.positive_int,
    meta_lr=C.positive,
    meta_weight_decay=C.non_negative,
)


def _check(**hp: Any) -> None:
    """Hyperparameter values of tgeo_kd (TGeo-KD, Hu et al., ICLR 2024); ValueError if bad."""
    _CHECK(**hp)
    seed = hp.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def tgeo_features(s_prob: Tensor, t_prob: Tensor, g: Tensor, t_bar: Tensor) -> Tensor:
    """The fusion net's input ``[N, 9C]`` from the trilateral geometry of S, T and G.

    Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
    Distillation" (ICLR 2024), in the order of the authors' CIFAR-100 code:
    ``[S, T, T̄, G, |S−G|, |S−T|, |S−T̄|, (G−T̄)⊙(G−S), (G−T)⊙(G−S)]`` — the triangle's vertices
    (plus T̄), its edges as coordinate-wise distances, and the two edges meeting at G multiplied
    coordinate-wise (the angle at G). All inputs ``[N, C]``: student and teacher probabilities,
    one-hot labels, the teacher's class-mean probabilities of each row's class.
    """
    return torch.cat(
        [
            s_prob,
            t_prob,
            t_bar,
            g,
            (s_prob - g).abs(),
            (s_prob - t_prob).abs(),
            (s_prob - t_bar).abs(),
            (g - t_bar) * (g - s_prob),
            (g - t_prob) * (g - s_prob),
        ],
        dim=-1,
    )


def fuse_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: Tensor,
    *,
    temperature: float,
) -> Tensor:
    """Per-row ``α·τ²·KL(p_T^τ‖p_S^τ) + (1 − α)·CE(z_S, y)`` for rows ``[N, C]``.

    Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
    Distillation" (ICLR 2024), with Hinton's τ² on the soft term (as ``kd``). Rows whose label
    is −100 must have ``α = 1`` (their CE term is 0). ``alpha`` ``[N]`` is used as given (the
    caller decides whether it carries a gradient).
    """
    lps = F.log_softmax(student_logits / temperature, dim=-1)
    lpt = F.log_softmax(teacher_logits / temperature, dim=-1)
    pt = lpt.exp()
    kl = torch.where(pt > 0, pt * (lpt - lps), torch.zeros_like(pt)).sum(-1)
    lab = labels >= 0
    y = labels.clamp_min(0).unsqueeze(-1)
    ce = -F.log_softmax(student_logits, dim=-1).gather(-1, y).squeeze(-1)
    ce = torch.where(lab, ce, torch.zeros_like(ce))
    alpha = alpha.to(kl.dtype)
    return alpha * (temperature**2) * kl + (1 - alpha) * ce


def _uniform(g: torch.Generator, shape: tuple[int, ...], fan_in: int) -> Tensor:
    """``(rand * 2 - 1) / √fan_in`` from ``g`` (fusion-net init; TGeo-KD, Hu et al., 2024)."""
    return (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(fan_in)


def init_fusion_net(num_classes: int, hidden: int, seed: int) -> nn.Sequential:
    """The fusion net ``Linear(9C, hidden) → ReLU → Linear(hidden, 1)`` (then a sigmoid).

    Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
    Distillation" (ICLR 2024); size as the authors' CIFAR-100 code (one hidden layer of 128).
    Deterministic initialisation: ``torch.Generator().manual_seed(seed)`` draws, in this order,
    ``W1 [hidden, 9C]``, ``b1 [hidden]``, ``W2 [1, hidden]``, ``b2 [1]``, each
    ``(torch.rand(shape, generator=g) * 2 - 1) / √fan_in`` in float32 (uniform in ±1/√fan_in,
    PyTorch's ``nn.Linear`` bounds).
    """
    d = FEATURES * num_classes
    net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net[0].weight.copy_(_uniform(g, (hidden, d), d))
        net[0].bias.copy_(_uniform(g, (hidden,), d))
        net[2].weight.copy_(_uniform(g, (1, hidden), hidden))
        net[2].bias.copy_(_uniform(g, (1,), hidden))
    return net


class _Fusion:
    """φ, its Adam and the teacher's per-class sums: a plain object, so that nothing here is a
    parameter or buffer of the loss module (the student's optimizer must not see φ)."""

    def __init__(self) -> None:
        """Nothing built yet (TGeo-KD, Hu et al., ICLR 2024)."""
        self.net: nn.Sequential | None = None
        self.optimizer: torch.optim.Adam | None = None
        self.class_sum: Tensor | None = None  # [C, C] float64: Σ teacher probs per label
        self.class_count: Tensor | None = None  # [C] float64
        self.meta_steps = 0


class _Bound(nn.Module):
    """``forward(model, batch)`` as a module, so ``functional_call`` swaps the model's weights."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, dict], Any]) -> None:
        """Bind ``fn`` to ``model`` (TGeo-KD's virtual step, Hu et al., ICLR 2024)."""
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: dict) -> Any:
        """``fn(model, batch)`` (TGeo-KD's virtual step, Hu et al., ICLR 2024)."""
        return self.fn(self.model, batch)


def _adam_state(opt: torch.optim.Optimizer, params: list[Tensor]) -> dict[str, Tensor]:
    """φ's Adam state as flat ``adam.<i>.<name>`` CPU tensors (TGeo-KD, Hu et al., 2024)."""
    out: dict[str, Tensor] = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[f"adam.{i}.{k}"] = torch.as_tensor(v).detach().clone().cpu()
    return out


class TGeoKDLoss(Loss):
    """TGeo-KD loss module (its docstring is :func:`tgeo_kd`'s, set below).

    Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
    Distillation" (ICLR 2024).
    """

    name: ClassVar[str] = "tgeo_kd"
    inputs: ClassVar[str] = "logits"
    defaults: ClassVar[dict[str, Any]] = {
        "temperature": 4.0,
        "hidden": 128,
        "meta_lr": 1e-3,
        "meta_weight_decay": 0.0,
        "seed": 0,
    }
    # Objective.check_dual_head: a dual-head student has no single head for this loss.
    fuses_label_and_teacher: ClassVar[bool] = True
    check = staticmethod(_check)

    def __init__(self, **hp: Any) -> None:
        """Validate hyperparameters; the fusion net is built at the first call, when the number
        of classes is known (Hu et al., "Less or More From Teacher: Exploiting Trilateral
        Geometry For Knowledge Distillation", ICLR 2024)."""
        super().__init__(**hp)
        self._fusion = _Fusion()
        self.last_alpha: Tensor | None = None  # detached mean α of the last call (for logs)

    # ------------------------------------------------------------------ the fusion net
    @property
    def fusion_net(self) -> nn.Sequential | None:
        """The net φ (None before the first call); not a submodule of this loss (TGeo-KD, Hu et
        al., ICLR 2024)."""
        return self._fusion.net

    def fusion_parameters(self) -> list[nn.Parameter]:
        """φ's parameters, optimised by :meth:`meta_step` only (TGeo-KD, Hu et al., 2024)."""
        net = self._fusion.net
        return [] if net is None else list(net.parameters())

    def _ready(self, num_classes: int, device: torch.device) -> _Fusion:
        """Build φ and the class sums for ``num_classes`` on ``device`` (or move them there)
        (TGeo-KD, Hu et al., ICLR 2024)."""
        f = self._fusion
        if num_classes > MAX_CLASSES:
            raise ValueError(
                f"loss 'tgeo_kd' is for classification: {num_classes} classes would give its "
                f"fusion net {FEATURES * num_classes} inputs (limit {MAX_CLASSES} classes)"
            )
        if f.net is None:
            f.net = init_fusion_net(num_classes, int(self.hp["hidden"]), int(self.hp["seed"]))
            f.net.to(device)
            f.optimizer = torch.optim.Adam(
                f.net.parameters(),
                lr=float(self.hp["meta_lr"]),
                weight_decay=float(self.hp["meta_weight_decay"]),
            )
        n_in = f.net[0].in_features // FEATURES
        if n_in != num_classes:
            raise ValueError(
                f"loss 'tgeo_kd': its fusion net was built for {n_in} classes, the logits have "
                f"{num_classes}"
            )
        if f.class_sum is None:
            f.class_sum = torch.zeros(num_classes, num_classes, dtype=torch.float64)
            f.class_count = torch.zeros(num_classes, dtype=torch.float64)
        self._move(device)
        return f

    def _move(self, device: torch.device) -> None:
        """Move φ (in place, so Adam keeps its parameters), Adam's state and the sums
        (TGeo-KD, Hu et al., ICLR 2024)."""
        f = self._fusion
        assert f.net is not None and f.optimizer is not None
        if f.net[0].weight.device != device:
            for p in f.net.parameters():
                p.data = p.data.to(device)
            for st in f.optimizer.state.values():
                for k, v in st.items():
                    if isinstance(v, Tensor) and k != "step":
                        st[k] = v.to(device)
        if f.class_sum is not None and f.class_sum.device != device:
            f.class_sum, f.class_count = f.class_sum.to(device), f.class_count.to(device)

    def _class_means(self, t_prob: Tensor, y: Tensor, update: bool) -> Tensor:
        """T̄ of each row: the teacher's mean probabilities over labelled rows of its class
        seen so far, this batch included (stored only when ``update``): the inter-sample
        relation of TGeo-KD (Hu et al., ICLR 2024)."""
        f = self._fusion
        assert f.class_sum is not None and f.class_count is not None
        lab = y >= 0
        cls = y[lab]
        total = f.class_sum.index_add(0, cls, t_prob[lab].detach().to(f.class_sum.dtype))
        count = f.class_count.index_add(0, cls, torch.ones_like(cls, dtype=f.class_count.dtype))
        if update:
            f.class_sum, f.class_count = total, count
        means = total / count.clamp_min(1).unsqueeze(-1)
        return means[y.clamp_min(0)].to(t_prob.dtype)

    def _alpha(self, s: Tensor, t: Tensor, y: Tensor, *, update: bool) -> Tensor:
        """α ``[N]`` for counted rows ``s``, ``t`` ``[N, C]`` and labels ``y`` (−100: α = 1);
        differentiable with respect to φ when gradients are enabled (TGeo-KD, Hu et al., ICLR
        2024)."""
        num_classes = s.shape[-1]
        if bool((y >= num_classes).any()):
            raise ValueError(f"loss 'tgeo_kd': a label is >= the number of classes ({num_classes})")
        f = self._ready(num_classes, s.device)
        assert f.net is not None
        s_prob = F.softmax(s.detach(), dim=-1)
        t_prob = F.softmax(t.detach(), dim=-1)
        t_bar = self._class_means(t_prob, y, update)
        lab = y >= 0
        g = F.one_hot(y.clamp_min(0), num_classes).to(s_prob.dtype)
        x = tgeo_features(s_prob, t_prob, g, t_bar)
        lin1, lin2 = f.net[0], f.net[2]
        h = F.relu(F.linear(x, lin1.weight.to(x.dtype), lin1.bias.to(x.dtype)))
        a = torch.sigmoid(F.linear(h, lin2.weight.to(x.dtype), lin2.bias.to(x.dtype))).squeeze(-1)
        return torch.where(lab, a, torch.ones_like(a))

    def fusion_ratio(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor
    ) -> Tensor:
        """α ``[N]`` of rows ``[N, C]`` (no gradient; −100 rows: 1; class means not updated).

        Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
        Distillation" (ICLR 2024).
        """
        s = upcast(student_logits)
        with torch.no_grad():
            return self._alpha(s, upcast(teacher_logits).to(s.dtype), labels, update=False)

    # ------------------------------------------------------------------ the loss
    def _rows(
        self, student: Tensor, teacher: Any, labels: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Counted rows of student, teacher (upcast, common dtype) and labels (TGeo-KD, Hu et
        al., ICLR 2024)."""
        if labels is None:
            raise ValueError("loss 'tgeo_kd' needs labels: pass labels= (class ids, -100 = ignore)")
        if isinstance(teacher, HeadLogits):
            teacher = teacher.logits()
        if not isinstance(teacher, Tensor):
            raise ValueError(
                f"loss 'tgeo_kd' needs dense teacher logits (its fusion net reads the teacher's "
                f"whole distribution); a {type(teacher).__name__} teacher is not supported"
            )
        if teacher.shape != student.shape:
            raise ValueError(
                f"loss 'tgeo_kd': teacher {tuple(teacher.shape)} and student "
                f"{tuple(student.shape)} logits must have the same shape"
            )
        m = counted_mask(student, labels, mask).reshape(-1).to(student.device)
        c = student.shape[-1]
        s, t = upcast(student).reshape(-1, c), upcast(teacher).reshape(-1, c)
        dt = torch.promote_types(s.dtype, t.dtype)
        y = labels.reshape(-1).to(student.device)
        return s[m].to(dt), t[m].to(dt), y[m]

    def forward(
        self,
        student: Tensor,
        teacher: Any,
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Mean over counted rows of ``α·τ²·KL(p_T^τ‖p_S^τ) + (1 − α)·CE`` with α from φ.

        Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
        Distillation" (ICLR 2024). α is detached (φ learns in :meth:`meta_step` only); in
        training mode with gradients on, the class means T̄ absorb this batch. Keyword
        arguments override stored hyperparameters (``temperature``).
        """
        hp = {**self.hp, **kwargs}
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            raise ValueError(f"loss 'tgeo_kd' has no hyperparameter {unknown[0]!r}")
        _check(**hp)
        s, t, y = self._rows(student, teacher, labels, mask)
        if s.shape[0] == 0:
            return s.sum()
        update = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            alpha = self._alpha(s, t, y, update=update)
        self.last_alpha = alpha.mean().detach()
        return fuse_rows(s, t, y, alpha, temperature=float(hp["temperature"])).mean()

    # ------------------------------------------------------------------ bilevel update of φ
    def meta_step(
        self,
        student: nn.Module,
        forward: Callable[[nn.Module, dict], Tensor],
        train_batch: dict,
        teacher_logits: Tensor,
        meta_batch: dict,
        *,
        inner_lr: float,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> float:
        """One bilevel update of φ; returns the meta loss (held-out CE after the virtual step).

        Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
        Distillation" (ICLR 2024): lower level ``θ*(φ) = argmin_θ Σ_train L(θ, α_φ)``, upper level
        ``min_φ Σ_meta CE(θ*(φ))``, approximated by one unrolled step (as in learning to
        reweight): ``θ' = θ − inner_lr · ∇_θ mean_i[α_i KD_i + (1 − α_i) CE_i]`` on
        ``train_batch`` (α_i depends on φ, so θ' does), then the CE of the student with weights
        θ' on the labelled rows of ``meta_batch`` is backpropagated to φ through θ' and α, and
        φ's Adam takes one step. ``forward(model, batch)`` returns the logits (a plain tensor);
        it is run through ``torch.func.functional_call``, so the student's own weights, buffers
        (batch-norm statistics) and gradients are left untouched. Train rows with label −100 are
        not counted; the class means T̄ are read, not updated. ``reduce`` (optional) maps each
        gradient of φ before the Adam step, e.g. an all-reduce mean so that every process of a
        multi-process run keeps the same φ.
        """
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or inner_lr <= 0:
            raise ValueError(f"meta_step: inner_lr must be a number > 0, got {inner_lr!r}")
        params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("meta_step: the student has no trainable parameters")
        buffers = {f"model.{n}": b.detach().clone() for n, b in student.named_buffers()}
        bound = _Bound(student, forward)

        def run(weights: Mapping[str, Tensor], batch: dict) -> Tensor:
            """The student's logits with ``weights`` (TGeo-KD's virtual step, Hu et al. 2024)."""
            named = {f"model.{n}": w for n, w in weights.items()}
            out = torch.func.functional_call(bound, {**named, **buffers}, (batch,))
            if not isinstance(out, Tensor):
                raise ValueError(
                    f"meta_step: forward(model, batch) must return logits as a tensor, got "
                    f"{type(out).__name__} (tgeo_kd cannot train a dual-head student)"
                )
            return out

        z = run(params, train_batch)
        if "labels" not in train_batch:
            raise ValueError("meta_step: train_batch has no 'labels'")
        s, t, y = self._rows(z, teacher_logits.detach(), train_batch["labels"], None)
        if s.shape[0] == 0:
            raise ValueError("meta_step: train_batch has no labelled row (label != -100)")
        f = self._ready(s.shape[-1], s.device)
        assert f.optimizer is not None
        alpha = self._alpha(s, t, y, update=False)  # differentiable in φ
        inner = fuse_rows(s, t, y, alpha, temperature=float(self.hp["temperature"])).mean()
        names = list(params)
        grads = torch.autograd.grad(
            inner, [params[n] for n in names], create_graph=True, allow_unused=True
        )
        virtual = {
            n: params[n] if g is None else params[n] - inner_lr * g for n, g in zip(names, grads)
        }
        zm = run(virtual, meta_batch)
        if "labels" not in meta_batch:
            raise ValueError("meta_step: meta_batch has no 'labels'")
        ym = meta_batch["labels"].reshape(-1).to(zm.device)
        if not bool((ym != -100).any()):
            raise ValueError("meta_step: meta_batch has no labelled row (label != -100)")
        meta = F.cross_entropy(upcast(zm).reshape(-1, zm.shape[-1]), ym, ignore_index=-100)
        phi = self.fusion_parameters()
        g_phi = torch.autograd.grad(meta, phi, allow_unused=True)
        for p, g in zip(phi, g_phi):
            g = torch.zeros_like(p) if g is None else g.detach()
            p.grad = reduce(g) if reduce is not None else g
        f.optimizer.step()
        f.optimizer.zero_grad(set_to_none=True)
        f.meta_steps += 1
        return float(meta.detach())

    # ------------------------------------------------------------------ checkpoints
    def fusion_state(self) -> dict[str, Tensor]:
        """φ, its Adam state, the class sums and the meta-step count as flat CPU tensors.

        Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
        Distillation" (ICLR 2024). Keys ``net.0.weight``, ``net.0.bias``, ``net.2.weight``,
        ``net.2.bias``, ``class_sum``, ``class_count``, ``meta_steps``, ``adam.<i>.<name>``;
        empty before the first call (nothing built yet). Safe for ``safetensors``.
        """
        f = self._fusion
        if f.net is None:
            return {}
        out = {f"net.{k}": v.detach().clone().cpu() for k, v in f.net.state_dict().items()}
        assert f.class_sum is not None and f.class_count is not None and f.optimizer is not None
        out["class_sum"] = f.class_sum.detach().clone().cpu()
        out["class_count"] = f.class_count.detach().clone().cpu()
        out["meta_steps"] = torch.tensor(f.meta_steps, dtype=torch.int64)
        out.update(_adam_state(f.optimizer, list(f.net.parameters())))
        return out

    def load_fusion_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`fusion_state` returned (an empty state changes nothing).

        Hu et al., "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
        Distillation" (ICLR 2024). The net is rebuilt for the saved number of classes; a hidden
        size other than this loss's ``hidden`` raises ``ValueError``.
        """
        if not state:
            return
        w1 = state["net.0.weight"]
        hidden, d = int(w1.shape[0]), int(w1.shape[1])
        if hidden != int(self.hp["hidden"]) or d % FEATURES:
            raise ValueError(
                f"tgeo_kd fusion state has a net {d} -> {hidden}; this loss has hidden="
                f"{self.hp['hidden']}"
            )
        device = self._fusion.net[0].weight.device if self._fusion.net is not None else None
        self._fusion = _Fusion()
        f = self._ready(d // FEATURES, torch.device("cpu"))
        assert f.net is not None and f.optimizer is not None
        f.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        f.class_sum = state["class_sum"].detach().clone().to(torch.float64)
        f.class_count = state["class_count"].detach().clone().to(torch.float64)
        f.meta_steps = int(state.get("meta_steps", torch.tensor(0)))
        params = list(f.net.parameters())
        adam: dict[int, dict[str, Tensor]] = {}
        for k, v in state.items():
            if k.startswith("adam."):
                _, i, name = k.split(".", 2)
                adam.setdefault(int(i), {})[name] = v.detach().clone()
        for i, st in adam.items():
            f.optimizer.state[params[i]] = st
        if device is not None:
            self._move(device)


def tgeo_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 4.0,
    hidden: int = 128,
    meta_lr: float = 1e-3,
    meta_weight_decay: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """TGeo-KD: per-sample α·KD + (1−α)·CE, α from a meta-learned net on S/T/G geometry.

    Paper: Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu, "Less or More From Teacher: Exploiting
    Trilateral Geometry For Knowledge Distillation" (ICLR 2024). Per counted row
    ``L = α·τ²·KL(p_T^τ‖p_S^τ) + (1−α)·CE(z_S, y)``, mean over counted rows, with
    ``α = sigmoid(MLP([S, T, T̄, G, |S−G|, |S−T|, |S−T̄|, (G−T̄)⊙(G−S), (G−T)⊙(G−S)]))``,
    ``S``/``T`` the softmax (τ = 1) of student/teacher logits, ``G`` one-hot, ``T̄`` the running
    mean of the teacher's probabilities over the labelled rows of the same class (updated by
    training-mode calls with gradients on). α carries no gradient here; ``meta_step`` learns
    the net (Adam, ``meta_lr``, ``meta_weight_decay``) on held-out labels. Counted rows whose
    label is −100 (a ``mask`` keeps them) use KD only (α = 1). Defaults τ = 4, hidden = 128,
    meta_lr = 1e-3, meta_weight_decay = 0, seed = 0 (deterministic init of the net). Labels
    required; dense teacher only; up to 8192 classes.
    """
    loss = TGeoKDLoss(
        temperature=temperature,
        hidden=hidden,
        meta_lr=meta_lr,
        meta_weight_decay=meta_weight_decay,
        seed=seed,
    )
    return loss(student_logits, teacher_logits, labels=labels, mask=mask)


TGeoKDLoss.__doc__ = tgeo_kd.__doc__
TGeoKDLoss.fn = staticmethod(tgeo_kd)  # the functional form: a fresh net from ``seed``
tgeo_kd.module = TGeoKDLoss  # type: ignore[attr-defined]
LOSSES.register("tgeo_kd", TGeoKDLoss, description=(tgeo_kd.__doc__ or "").strip().splitlines()[0])

__all__ = ["TGeoKDLoss", "fuse_rows", "init_fusion_net", "tgeo_features", "tgeo_kd"]

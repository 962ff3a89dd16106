"""Dual-head students: one head learns from the labels, a second from the teacher (DHO).

Kang, Lee, Jang, Hwang, "Simple Semi-supervised Knowledge Distillation from Vision-Language
Models via Dual-Head Optimization" (2025). A single head trained on both the label loss and the
distillation loss receives conflicting gradients; DHO gives the student's shared features two
linear heads, ``h_CE`` trained by the label loss (CE on labelled rows) and ``h_KD`` trained by
the distillation loss, and predicts at inference with a linear combination of their
probabilities::

    p(x) = α·softmax(h_CE(f(x))) + (1 − α)·softmax(h_KD(f(x)) / β)

``α`` (weight of the label head) and ``β`` (temperature of the distillation head) are set after
training, e.g. by :func:`search_combination` on held-out data, without retraining.

:func:`wrap_dual_head` turns any classifier whose logits are exactly the output of an
``nn.Linear`` (``nn.Sequential`` MLP/CNN students, ``HFClassifier``, TF-IDF MLPs without output
normalisation, HF models' output embeddings) into a :class:`DualHead`: in training mode it
returns :class:`DualLogits` (both heads' logits; :class:`mentor.losses.Objective` sends them to
its label and teacher terms), in eval mode the combined *log*-probabilities ``log p(x)`` as one
tensor (valid logits for argmax, softmax, CE and calibration metrics).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# File written next to a saved inner student by :func:`save_dual_head`.
DUAL_HEAD_FILE = "dual_head.safetensors"
# The validation grid of the DHO authors' code: α in 0, 0.05, ..., 1 and these β.
DHO_ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
DHO_TEMPERATURES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)
INITS = ("fresh", "copy")


@dataclass(eq=False)
class DualLogits:
    """The logits of both heads of a :class:`DualHead` in training mode.

    ``label`` comes from the head trained by the label loss (``h_CE``), ``distill`` from the head
    trained by the teacher terms (``h_KD``); same shape. Slicing along leading dims applies to
    both (``dual[:, :-1]`` for a causal shift). Kang et al., "Simple Semi-supervised Knowledge
    Distillation from Vision-Language Models via Dual-Head Optimization" (2025).
    """

    label: Tensor
    distill: Tensor

    def __post_init__(self) -> None:
        """Both heads must give logits of the same shape (Kang et al., DHO, 2025)."""
        if self.label.shape != self.distill.shape:
            raise ValueError(
                f"DualLogits: label {tuple(self.label.shape)} and distill "
                f"{tuple(self.distill.shape)} logits must have the same shape"
            )

    @property
    def shape(self) -> torch.Size:
        """The logits' shape (both heads share it) (Kang et al., DHO, 2025)."""
        return self.label.shape

    def __getitem__(self, idx: Any) -> DualLogits:
        """Index both heads' logits alike (Kang et al., DHO, 2025)."""
        return DualLogits(self.label[idx], self.distill[idx])

    def detach(self) -> DualLogits:
        """Both logits without gradient (Kang et al., DHO, 2025)."""
        return DualLogits(self.label.detach(), self.distill.detach())

    def to(self, *args: Any, **kwargs: Any) -> DualLogits:
        """Both logits moved/cast like ``Tensor.to`` (Kang et al., DHO, 2025)."""
        return DualLogits(self.label.to(*args, **kwargs), self.distill.to(*args, **kwargs))


def _check_alpha(alpha: Any) -> float:
    """α as a float in [0, 1] (the inference rule of DHO, Kang et al., 2025); else ValueError."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(
            f"dual head alpha (weight of the label head at inference) must be a number in "
            f"[0, 1], got {alpha!r}"
        )
    return float(alpha)


def _check_temperature(temperature: Any) -> float:
    """β as a finite float > 0 (the inference rule of DHO, Kang et al., 2025); else ValueError."""
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not ok or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"dual head temperature (β, divides the distillation head's logits at inference) "
            f"must be a finite number > 0, got {temperature!r}"
        )
    return float(temperature)


def combine_heads(dual: DualLogits, alpha: float, temperature: float) -> Tensor:
    """``log(α·softmax(label) + (1 − α)·softmax(distill/β))``, computed stably in log space.

    Kang, Lee, Jang, Hwang, "Simple Semi-supervised Knowledge Distillation from Vision-Language
    Models via Dual-Head Optimization" (2025): the inference rule. Half-precision logits are
    combined in float32. ``α = 1`` gives the label head's log-probabilities, ``α = 0`` the
    distillation head's at temperature β.
    """
    alpha, temperature = _check_alpha(alpha), _check_temperature(temperature)
    la, lb = dual.label, dual.distill
    if la.dtype in (torch.float16, torch.bfloat16):
        la, lb = la.float(), lb.float()
    lp_label = F.log_softmax(la, dim=-1)
    lp_distill = F.log_softmax(lb / temperature, dim=-1)
    if alpha == 1.0:
        return lp_label
    if alpha == 0.0:
        return lp_distill
    return torch.logaddexp(lp_label + math.log(alpha), lp_distill + math.log1p(-alpha))


def _raw_logits(out: Any) -> Any:
    """The logits a model returned (``.logits``, the first element of a tuple, or a tensor), as
    ``model_outputs`` reads them (DHO, Kang et al., 2025)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def find_linear_head(student: nn.Module, num_classes: int | None = None) -> str:
    """Dotted path of the student's output head: an ``nn.Linear`` whose output are the logits.

    Kang et al., "Simple Semi-supervised Knowledge Distillation from Vision-Language Models via
    Dual-Head Optimization" (2025) put both heads on the student's last features. The head is
    the last ``nn.Linear`` with ``out_features == num_classes`` when ``num_classes`` is given;
    otherwise a Hugging Face model's output embeddings when they are an ``nn.Linear``, else the
    last ``nn.Linear`` registered in the model. :class:`DualHead` checks at every call that the
    model's output is this layer's output. Raises ``ValueError`` when there is none.
    """
    linears = [(n, m) for n, m in student.named_modules() if isinstance(m, nn.Linear) and n]
    if num_classes is not None:
        hits = [n for n, m in linears if m.out_features == num_classes]
        if not hits:
            seen = ", ".join(f"{n} ({m.out_features})" for n, m in linears) or "none"
            raise ValueError(
                f"no nn.Linear output head with out_features == {num_classes} in "
                f"{type(student).__name__} (linear layers: {seen}); a dual head needs the "
                "student's logits to be the output of a linear layer"
            )
        return hits[-1]
    get_out = getattr(student, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if isinstance(out_emb, nn.Linear):
        for n, m in linears:
            if m is out_emb:
                return n
    if not linears:
        raise ValueError(
            f"{type(student).__name__} has no nn.Linear layer: a dual head needs the student's "
            "logits to be the output of a linear layer (e.g. builders mlp, cnn, hf_classifier, "
            "tfidf_mlp)"
        )
    return linears[-1][0]


class DualHead(nn.Module):
    """A student with a second, distillation-only linear head on its shared features (DHO).

    Kang, Lee, Jang, Hwang, "Simple Semi-supervised Knowledge Distillation from Vision-Language
    Models via Dual-Head Optimization" (2025). ``student`` keeps its own head (``head_path``),
    which becomes the label head ``h_CE``; ``distill_head`` (``h_KD``) is a copy of it,
    re-initialised (``init="fresh"``, the paper's independently initialised heads) or keeping
    its weights (``init="copy"``, as the authors initialise both heads alike for CLIP students).
    Training mode returns :class:`DualLogits`; eval mode the combined log-probabilities
    ``log(α·softmax(h_CE) + (1 − α)·softmax(h_KD/β))``. ``alpha`` and ``temperature`` (β) are
    buffers, so ``state_dict`` saves them with both heads.
    """

    def __init__(
        self,
        student: nn.Module,
        head_path: str,
        *,
        alpha: float = 0.5,
        temperature: float = 1.0,
        init: str = "fresh",
    ) -> None:
        """Add the distillation head next to ``student``'s head at ``head_path`` (DHO, 2025)."""
        super().__init__()
        if isinstance(student, DualHead):
            raise ValueError("the student already has a dual head")
        if init not in INITS:
            raise ValueError(f"dual head init must be one of {', '.join(INITS)}; got {init!r}")
        try:
            head = student.get_submodule(head_path)
        except AttributeError:
            raise ValueError(f"{type(student).__name__} has no submodule {head_path!r}") from None
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{head_path!r} of {type(student).__name__} is a {type(head).__name__}, not an "
                "nn.Linear output head"
            )
        self.student = student
        self.head_path = head_path
        self.init = init
        self.distill_head = copy.deepcopy(head)
        if init == "fresh":
            self.distill_head.reset_parameters()
        self.register_buffer("alpha", torch.tensor(_check_alpha(alpha)))
        self.register_buffer("temperature", torch.tensor(_check_temperature(temperature)))
        self._both = False  # tune_combination: both heads even in eval mode

    @property
    def label_head(self) -> nn.Linear:
        """The student's own head, trained by the label loss (h_CE of DHO, Kang et al. 2025)."""
        return self.student.get_submodule(self.head_path)  # type: ignore[return-value]

    @property
    def takes_texts(self) -> bool:
        """Whether the wrapped student reads raw texts (``model_outputs``; DHO, 2025)."""
        return bool(getattr(self.student, "takes_texts", False))

    def set_combination(self, alpha: float | None = None, temperature: float | None = None) -> None:
        """Set the inference rule's α and/or β (Kang et al., DHO, 2025); invalid values raise."""
        if alpha is not None:
            self.alpha.fill_(_check_alpha(alpha))
        if temperature is not None:
            self.temperature.fill_(_check_temperature(temperature))

    def combination(self) -> tuple[float, float]:
        """The current (α, β) of the inference rule (Kang et al., DHO, 2025)."""
        return float(self.alpha), float(self.temperature)

    def heads(self, *args: Any, **kwargs: Any) -> DualLogits:
        """Both heads' logits for the student's inputs, in any mode (Kang et al., DHO, 2025).

        The student runs as usual; a hook on its head records the head's input features, which
        the distillation head maps to its own logits. Raises ``ValueError`` when the student's
        output is not its head's output (e.g. an L2-normalised embedding).
        """
        seen: dict[str, Any] = {}

        def hook(_mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            """Record the head's input features and output (DHO, Kang et al., 2025)."""
            seen["features"], seen["output"] = inputs[0], output

        handle = self.label_head.register_forward_hook(hook)
        try:
            out = self.student(*args, **kwargs)
        finally:
            handle.remove()
        if "features" not in seen:
            raise ValueError(
                f"the head {self.head_path!r} of {type(self.student).__name__} was not called in "
                "its forward pass; a dual head needs logits = head(features)"
            )
        logits, head_out = _raw_logits(out), seen["output"]
        same = logits is head_out or (
            isinstance(logits, Tensor)
            and logits.shape == head_out.shape
            and torch.equal(logits, head_out)
        )
        if not same:
            raise ValueError(
                f"{type(self.student).__name__} transforms the output of its head "
                f"{self.head_path!r} (e.g. normalises it), so its logits are not head(features): "
                "a dual head cannot be added to this student"
            )
        return DualLogits(logits, self.distill_head(seen["features"]))

    def combine(self, dual: DualLogits) -> Tensor:
        """Combined log-probabilities of :meth:`heads`' logits (Kang et al., DHO, 2025)."""
        return combine_heads(dual, float(self.alpha), float(self.temperature))

    def forward(self, *args: Any, **kwargs: Any) -> DualLogits | Tensor:
        """Training: :class:`DualLogits`; eval: combined log-probs (Kang et al., DHO, 2025)."""
        dual = self.heads(*args, **kwargs)
        return dual if self.training or self._both else self.combine(dual)

    @torch.no_grad()
    def tune_combination(
        self,
        batches: Iterable[Mapping[str, Any]],
        *,
        call: Callable[[nn.Module, Mapping[str, Any]], Any] | None = None,
        alphas: Sequence[float] = DHO_ALPHAS,
        temperatures: Sequence[float] = DHO_TEMPERATURES,
    ) -> tuple[float, float, float]:
        """Pick and set the (α, β) most accurate on held-out ``batches``; returns (α, β, acc).

        Kang et al., "Simple Semi-supervised Knowledge Distillation from Vision-Language Models
        via Dual-Head Optimization" (2025) tune the inference rule on validation data after
        training, without retraining. Each batch (on the model's device) has ``labels``
        (−100: not counted); ``call(model, batch)`` runs the model (default
        :func:`mentor.models.model_outputs`). Runs in eval mode (dropout off); the mode is
        restored afterwards. See :func:`search_combination` for the grid.
        """
        from mentor.models import model_outputs

        call = call or model_outputs
        was_training = self.training
        self.eval()
        self._both = True
        labels, heads = [], []
        try:
            for batch in batches:
                out = call(self, batch)
                if not isinstance(out, DualLogits):
                    raise ValueError(f"call(model, batch) returned {type(out).__name__}")
                c = out.shape[-1]
                heads.append((out.label.reshape(-1, c), out.distill.reshape(-1, c)))
                labels.append(batch["labels"].reshape(-1).to(out.label.device))
        finally:
            self._both = False
            self.train(was_training)
        if not heads:
            raise ValueError("tune_combination needs at least one batch")
        dual = DualLogits(torch.cat([a for a, _ in heads]), torch.cat([b for _, b in heads]))
        alpha, beta, acc = search_combination(
            dual, torch.cat(labels), alphas=alphas, temperatures=temperatures
        )
        self.set_combination(alpha, beta)
        return alpha, beta, acc

    def extra_repr(self) -> str:
        """Head, init, α and β (DHO, Kang et al., 2025)."""
        return (
            f"head={self.head_path!r}, init={self.init!r}, alpha={float(self.alpha):g}, "
            f"temperature={float(self.temperature):g}"
        )


def wrap_dual_head(
    student: nn.Module,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    num_classes: int | None = None,
    init: str = "fresh",
) -> DualHead:
    """Give ``student`` a second, distillation-only head (Dual-Head Optimization).

    Kang, Lee, Jang, Hwang, "Simple Semi-supervised Knowledge Distillation from Vision-Language
    Models via Dual-Head Optimization" (2025). The head is found by :func:`find_linear_head`
    (``num_classes`` picks the last ``nn.Linear`` with that many outputs). ``alpha`` weighs the
    label head at inference, ``temperature`` (β) divides the distillation head's logits;
    defaults 0.5 and 1 (the paper tunes both on held-out data: :func:`search_combination`).
    ``init="fresh"`` initialises the new head independently (the paper's ResNet/MobileNet
    students), ``"copy"`` copies the existing head. Raises ``ValueError`` for a student without
    a linear head, ``alpha`` outside [0, 1] or ``temperature <= 0``.
    """
    alpha, temperature = _check_alpha(alpha), _check_temperature(temperature)
    return DualHead(
        student,
        find_linear_head(student, num_classes),
        alpha=alpha,
        temperature=temperature,
        init=init,
    )


@torch.no_grad()
def search_combination(
    dual: DualLogits,
    labels: Tensor,
    *,
    alphas: Sequence[float] = DHO_ALPHAS,
    temperatures: Sequence[float] = DHO_TEMPERATURES,
) -> tuple[float, float, float]:
    """The (α, β, accuracy) of the inference rule that is most accurate on held-out data.

    Kang et al., "Simple Semi-supervised Knowledge Distillation from Vision-Language Models via
    Dual-Head Optimization" (2025) pick α and β on validation data after training; the default
    grid is the authors' (α in 0, 0.05, ..., 1; β in 0.5, 0.75, 1, 1.25, 1.5, 2, 4). ``dual``:
    both heads' logits ``[N, C]`` (:meth:`DualHead.heads`), ``labels`` ``[N]`` (−100 = not
    counted). Ties keep the first setting found (β outer, α inner loop). Set the result with
    :meth:`DualHead.set_combination`.
    """
    lab = labels.reshape(-1).to(dual.label.device)
    keep = lab != -100
    if not bool(keep.any()):
        raise ValueError("search_combination needs at least one labelled row (label != -100)")
    c = dual.shape[-1]
    la = dual.label.reshape(-1, c)[keep].float()
    lb = dual.distill.reshape(-1, c)[keep].float()
    y = lab[keep]
    p_label = la.softmax(-1)
    best = (float("nan"), float("nan"), -1.0)
    for beta in temperatures:
        p_distill = (lb / _check_temperature(beta)).softmax(-1)
        for a in alphas:
            a = _check_alpha(a)
            p = a * p_label + (1 - a) * p_distill
            acc = float((p.argmax(-1) == y).float().mean())
            if acc > best[2]:
                best = (a, float(beta), acc)
    return best


def save_dual_head(model: DualHead, folder: str | Path) -> dict[str, Any]:
    """Write the distillation head, α and β to ``folder/dual_head.safetensors``.

    Kang et al., "Simple Semi-supervised Knowledge Distillation from Vision-Language Models via
    Dual-Head Optimization" (2025). The inner student (with the label head) is saved as any
    student; the returned entry (``{"dual_head": {...}}``) goes into its ``mentor_model.json`` so
    :func:`load_dual_head` can wrap it again.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not k.startswith("student.")
    }
    tmp = folder / (DUAL_HEAD_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / DUAL_HEAD_FILE)
    alpha, temperature = model.combination()
    return {
        "dual_head": {
            "head": model.head_path,
            "alpha": alpha,
            "temperature": temperature,
            "init": model.init,
            "file": DUAL_HEAD_FILE,
        }
    }


def load_dual_head(student: nn.Module, folder: str | Path, meta: Mapping[str, Any]) -> DualHead:
    """Wrap a loaded inner student again and restore what :func:`save_dual_head` wrote.

    Kang et al., "Simple Semi-supervised Knowledge Distillation from Vision-Language Models via
    Dual-Head Optimization" (2025). ``meta`` is the saved ``mentor_model.json`` (or its
    ``dual_head`` entry). The model is returned in eval mode (combined predictions).
    """
    from safetensors.torch import load_file

    entry = meta.get("dual_head", meta)
    model = DualHead(student, entry["head"], init=entry.get("init", "fresh"))
    state = load_file(str(Path(folder) / entry.get("file", DUAL_HEAD_FILE)))
    model.distill_head.load_state_dict(
        {k.removeprefix("distill_head."): v for k, v in state.items() if "distill_head." in k}
    )
    model.set_combination(float(state["alpha"]), float(state["temperature"]))
    return model.eval()


__all__ = [
    "DHO_ALPHAS",
    "DHO_TEMPERATURES",
    "DUAL_HEAD_FILE",
    "DualHead",
    "DualLogits",
    "combine_heads",
    "find_linear_head",
    "load_dual_head",
    "save_dual_head",
    "search_combination",
    "wrap_dual_head",
]

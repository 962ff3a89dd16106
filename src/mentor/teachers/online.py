"""Online teachers: a frozen module run on every batch (``source: online``), and a previous
run's student as the teacher (``source: run``, born-again networks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mentor.models import LOGITS_FROM, model_outputs, position_ids
from mentor.models.taps import FeatureTaps
from mentor.teachers.base import (
    SourceContext,
    TeacherOutput,
    TeacherSource,
    freeze,
    register_source,
)


class OnlineOptions(BaseModel):
    """``teacher.top_k``: send the loss the teacher's top-k per position (log-probs + tail)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(None, ge=1)


@register_source("online")
class OnlineTeacher(TeacherSource):
    """A frozen module run on each batch under ``torch.no_grad()``.

    Recipe: ``teacher: {builder: NAME, params: {...}}`` (fitted on labels first with
    ``fit:``) or ``teacher: {path: FOLDER}``; ``precision: bf16`` runs it under autocast.
    ``top_k: K`` turns its logits into a :class:`~mentor.signals.TopK` signal (the K most
    likely classes' log-probs and the tail mass, what a sparse cache stores), so sparse-signal
    losses train online too — also on samples generated during training, which no cache holds.
    """

    Options = OnlineOptions
    uses_module = True
    cacheable = True

    @classmethod
    def from_config(cls, ctx: SourceContext) -> OnlineTeacher:
        """The recipe's teacher module, built (or fitted) once by the assembly layer."""
        module = ctx.module()
        known = ctx.known_outputs() if hasattr(ctx, "known_outputs") else None
        top_k = ctx.cfg.teacher.options.top_k
        return cls(
            module, precision=ctx.cfg.teacher.precision, taps=ctx.taps, known=known, top_k=top_k
        )

    def __init__(
        self,
        module: nn.Module,
        *,
        precision: str = "fp32",
        taps: Sequence[str] = (),
        known: Mapping[int, Tensor] | None = None,
        top_k: int | None = None,
    ) -> None:
        """Freeze ``module``; ``taps`` are module paths whose outputs feature losses compare.

        ``known``: outputs of this frozen module already computed for some example ids (e.g.
        the training set, while a frozen-encoder teacher's head was fitted); a batch whose ids
        are all known is answered from them instead of running the module.
        """
        self.module = freeze(module)
        self.precision = precision
        self.top_k = top_k
        self.taps = list(taps)
        self._hooks = FeatureTaps(self.module, self.taps, role="teacher") if self.taps else None
        usable = known is not None and not self.taps and precision == "fp32"
        self.known = dict(known) if usable else None

    def to(self, device: torch.device | str) -> OnlineTeacher:
        """Move the frozen module to ``device``."""
        self.module.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """Run the teacher (bf16 autocast when ``precision='bf16'``)."""
        dev = next(self.module.parameters(), torch.empty(0)).device
        if self.known is not None and "index" in batch:
            ids = [int(i) for i in batch["index"]]
            if all(i in self.known for i in ids):
                known = torch.stack([self.known[i] for i in ids]).to(dev)
                return TeacherOutput(logits=self._signal(known))
        self.module.eval()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = model_outputs(self.module, batch)
        feats = self._hooks.pop() if self._hooks else {}
        return TeacherOutput(logits=self._signal(logits), features=feats)

    def _signal(self, logits: Tensor) -> Any:
        """Dense logits, or their top-k (``top_k``; at most the number of classes)."""
        if self.top_k is None:
            return logits
        from mentor.signals import TopK

        return TopK.from_logits(logits, min(self.top_k, logits.shape[-1]))

    @torch.no_grad()
    def head_output(self, batch: dict[str, Any]) -> TeacherOutput:
        """Like calling the teacher, but its logits stay as final hidden states + output head.

        For a Hugging Face causal LM whose logits are ``lm_head(hidden)``: returns a
        :class:`~mentor.signals.HeadLogits` that a fused loss turns into logits chunk by chunk.
        """
        from mentor.signals import HeadLogits

        self.module.eval()
        head = linear_head(self.module)
        if head is None:
            raise ValueError(
                f"{type(self.module).__name__} has no plain linear output head (needs a Hugging "
                "Face *ForCausalLM whose logits are lm_head(hidden), without soft-capping/scale)"
            )
        dev = next(self.module.parameters(), torch.empty(0)).device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.module.base_model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=position_ids(batch),
            )
        feats = self._hooks.pop() if self._hooks else {}
        hidden, start = out.last_hidden_state, batch.get(LOGITS_FROM)
        if isinstance(start, int) and start > 0:  # only these positions' logits are needed
            hidden = hidden[:, start:]
        return TeacherOutput(logits=HeadLogits(hidden, head.weight, head.bias), features=feats)


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The output head of a causal LM whose logits are exactly ``head(base_model(...))``.

    None when there is no ``base_model``/linear head, or the config rescales the logits
    (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``).
    """
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(head, nn.Linear) or not hasattr(model, "base_model"):
        return None
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return head


class RunOptions(BaseModel):
    """``teacher.run``: a finished run directory whose ``student/`` becomes the teacher."""

    model_config = ConfigDict(extra="forbid")
    run: str


@register_source("run")
class RunTeacher(OnlineTeacher):
    """A previous run's student as the frozen teacher (born-again networks: Furlanello et al.,
    "Born-Again Neural Networks", 2018). Recipe: ``teacher: {source: run, run: RUN_DIR}``."""

    Options = RunOptions
    uses_module = False
    cacheable = True

    @classmethod
    def from_config(cls, ctx: SourceContext) -> RunTeacher:
        """Load ``RUN_DIR/student``."""
        return cls(cls.load(ctx.cfg.teacher), precision=ctx.cfg.teacher.precision, taps=ctx.taps)

    @staticmethod
    def load(tc: Any) -> nn.Module:
        """The student saved in ``teacher.run`` (a clear error when the run is unfinished)."""
        from mentor.students import load_model

        folder = Path(tc.options.run) / "student"
        if not folder.exists():
            raise FileNotFoundError(
                f"teacher.run={tc.options.run!r}: {folder} does not exist (give a finished "
                "mentor run directory)"
            )
        return load_model(folder)[0]

    @classmethod
    def plan_parameters(cls, ctx: SourceContext) -> int | None:
        """Parameters of the previous run's student."""
        return sum(p.numel() for p in cls.load(ctx.cfg.teacher).parameters())

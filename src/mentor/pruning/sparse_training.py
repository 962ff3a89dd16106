"""Training a sparse student: masks kept through every optimizer step, staged or AST updates.

A student built by ``student.builder: prune`` with an unstructured or N:M method carries a
:class:`SparseTraining` (``model.mentor_sparse``). The engine calls :meth:`after_step` after
every optimizer step and checkpoints :meth:`state_dict`:

* ``fixed`` masks: the pruned weights are set back to exactly 0 after each step (the optimizer
  — weight decay, Adam's moments — may move them; the mask wins);
* ``stages: [s1, s2, ...]`` (gradual pruning: prune → distil → prune more): the run is split
  into equal parts and at the start of part k the mask is recomputed from the current
  weights at sparsity ``s_k`` (the theory of staged compression: "Sparse Knowledge
  Distillation: A Mathematical Framework for Probability-Domain Temperature Scaling and
  Multi-Stage Compression", 2025; the schedule is the usual step-wise one of Zhu & Gupta,
  "To prune, or not to prune", 2017);
* ``mask_updates: ast``: AST's adaptive masks (:class:`mentor.pruning.masks.ASTSchedule`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mentor.pruning.masks import ASTSchedule, MaskSet


class SparseTraining:
    """The masks of a sparse student and how they change during distillation."""

    def __init__(
        self,
        masks: MaskSet,
        *,
        method: str,
        pattern: str,
        sparsity: float | None = None,
        stages: Sequence[float] | None = None,
        mask_updates: str = "fixed",
        update_every: int = 10,
        norms: Mapping[str, Tensor] | None = None,
    ) -> None:
        """``masks``: the initial masks (keyed by the student's module names)."""
        if mask_updates not in ("fixed", "ast"):
            raise ValueError(f"student.params.mask_updates={mask_updates!r}: choose fixed or ast")
        if mask_updates == "ast" and stages:
            raise ValueError(
                "student.params: stages and mask_updates=ast both change the masks during "
                "training; choose one"
            )
        self.masks, self.method, self.pattern = masks, method, pattern
        self.sparsity_target = None if ":" in pattern else sparsity
        self.stages = [float(s) for s in stages] if stages else None
        self.stage = 0
        self.mask_updates, self.update_every = mask_updates, int(update_every)
        self.norms = dict(norms) if norms else None
        self._ast: ASTSchedule | None = None

    def _stage_at(self, step: int, total: int) -> int:
        assert self.stages is not None
        return min(len(self.stages) - 1, step * len(self.stages) // max(1, total))

    @torch.no_grad()
    def after_step(self, student: nn.Module, step: int, total: int) -> dict[str, float]:
        """After optimizer step ``step`` (1-based) of ``total``: update and enforce the masks."""
        logs: dict[str, float] = {}
        if self.stages is not None:
            k = self._stage_at(step, total)
            if k != self.stage:  # prune more, from the weights distillation has moved
                self.stage = k
                self.masks.update_from_weights(
                    student, self.method, sparsity=self.stages[k], pattern=self.pattern,
                    norms=self.norms,
                )  # fmt: skip
        if self.mask_updates == "ast":
            if self._ast is None:
                self._ast = ASTSchedule(
                    total, pattern=self.pattern, sparsity=self.sparsity_target,
                    method=self.method, update_every=self.update_every, norms=self.norms,
                )  # fmt: skip
            got = self._ast.after_step(self.masks, student, step)
            logs.update({f"sparse.{k}": float(v) for k, v in got.items()})
            if not got.get("hard"):
                return logs  # AST decays pruned weights instead of zeroing them until the end
        self.masks.enforce(student)
        return logs

    def sparsity(self, student: nn.Module) -> dict[str, Any]:
        """Zeros among the prunable weights (per module and overall)."""
        return self.masks.sparsity(student)

    def state_dict(self) -> dict[str, Tensor]:
        """The masks and the stage reached (for exact resume)."""
        out = dict(self.masks.state_dict())
        out["sparse.stage"] = torch.tensor([self.stage], dtype=torch.long)
        return out

    def load_state_dict(
        self, state: Mapping[str, Tensor], student: nn.Module | None = None
    ) -> None:
        """Restore :meth:`state_dict` (mask shapes are checked against ``student``)."""
        masks = {k: v for k, v in state.items() if k.startswith("mask.")}
        self.masks.load_state_dict(masks, model=student)
        if "sparse.stage" in state:
            self.stage = int(state["sparse.stage"][0])

"""``source: routed``: every example is answered by ONE of several teachers.

A mixture of specialised teachers in the spirit of MST-Distill ("MST-Distill: Mixture of
Specialized Teachers for Cross-Modal Knowledge Distillation", 2025). MST-Distill *learns* an
instance-level routing network; this source routes by a fixed, rule-based router instead:

* ``route_by: field``: a data field of the example (e.g. ``domain`` of a JSONL row) is looked
  up in ``routes`` (value -> member index or name), else ``default``, else an error. Per
  batch, each member runs only on the rows routed to it.
* ``route_by: confidence``: every member runs on the whole batch and each example takes the
  signal of the member most confident on it. ``confidence: max_prob`` (default) scores a
  prediction by its largest softmax probability, ``entropy`` by its negative entropy. A causal
  LM is scored per *sequence*: the mean of the per-position scores over the positions its
  loss counts (the causal shift applied: the logits of position ``t`` predict token ``t+1``;
  with prompt data the completion tokens only, else every attended token; see
  ``mentor.tasks``). Ties go to the lower member index.

The routed signal is the chosen member's logits, row by row; ``TeacherOutput.features``
carries ``routed_member`` (``LongTensor[B]``: which member served each example), and the
source keeps running counts per member (``counts``, ``split_line()``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mentor.teachers.base import SourceContext, TeacherOutput, TeacherSource, register_source
from mentor.teachers.ensemble import members_parameters, online_members, validate_members

log = logging.getLogger(__name__)

ROUTE_FEATURE = "routed_member"  # TeacherOutput.features key: member index per example
OUTPUT = "output"  # the cache's pseudo feature: the teacher's output itself


class RoutedOptions(BaseModel):
    """``teacher.members`` and how an example picks one of them."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    members: list[Any] = Field(default_factory=list)
    names: list[str] | None = None
    route_by: Literal["field", "confidence"] = "field"
    field: str | None = None
    routes: dict[Any, int | str] = Field(default_factory=dict)
    default: int | str | None = None
    confidence: Literal["max_prob", "entropy"] = "max_prob"


def _member_index(ref: Any, key: str, n: int, names: Sequence[str] | None) -> int:
    """A member reference (index or name) as an index; ``key`` names the setting."""
    if isinstance(ref, str) and names and ref in names:
        return list(names).index(ref)
    if isinstance(ref, str) and ref.strip().isdigit():
        ref = int(ref)
    if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < n:
        return ref
    known = f" or one of teacher.names ({', '.join(names)})" if names else ""
    raise ValueError(f"{key}={ref!r} names no member: use a member index 0..{n - 1}{known}")


def _route_key(v: Any) -> str:
    """A field value as the key ``routes`` is looked up with (YAML keys are compared as text)."""
    if isinstance(v, Tensor):
        v = v.item()
    return str(v)


@register_source("routed")
class RoutedTeacher(TeacherSource):
    """Route each example to one member teacher (see the module docstring)."""

    Options = RoutedOptions
    cacheable = True  # `mentor cache` stores the routed signal (see ``cache_function``)

    def __init__(
        self,
        teachers: Sequence[TeacherSource],
        *,
        route_by: str = "field",
        field: str | None = None,
        routes: Mapping[Any, Any] | None = None,
        default: Any = None,
        names: Sequence[str] | None = None,
        confidence: str = "max_prob",
        per_token: bool | None = None,
    ) -> None:
        """``per_token``: causal-LM logits ``[B, T, V]`` (default: guessed from the rank)."""
        n = len(teachers)
        if n < 2:
            raise ValueError(
                f"a routed teacher needs at least two members (got {n}): add teacher.members"
            )
        if route_by not in ("field", "confidence"):
            raise ValueError(f"teacher.route_by={route_by!r}: choose field or confidence")
        if confidence not in ("max_prob", "entropy"):
            raise ValueError(f"teacher.confidence={confidence!r}: choose max_prob or entropy")
        if names is not None and (len(names) != n or len(set(names)) != n):
            raise ValueError(f"teacher.names must be {n} different names, one per member")
        if route_by == "field":
            if not field:
                raise ValueError(
                    "teacher.route_by=field needs teacher.field: the data field to route on "
                    "(e.g. field: domain)"
                )
            if not routes:
                raise ValueError(
                    f"teacher.route_by=field needs teacher.routes: {field} value -> member "
                    "(e.g. routes: {news: 0, code: 1})"
                )
        else:
            given = [k for k, v in (("field", field), ("routes", routes), ("default", default))
                     if v not in (None, {})]  # fmt: skip
            if given:
                raise ValueError(
                    f"teacher.{given[0]} is for route_by: field; route_by: confidence sends each "
                    f"example to its most confident member (remove teacher.{given[0]})"
                )
        self.teachers = list(teachers)
        self.names = list(names) if names is not None else None
        self.labels = self.names or [f"member {i}" for i in range(n)]  # for messages
        self.route_by, self.field, self.confidence = route_by, field, confidence
        self.table = {
            str(k): _member_index(v, f"teacher.routes[{k!r}]", n, names)
            for k, v in (routes or {}).items()
        }
        self.default = (
            None if default is None else _member_index(default, "teacher.default", n, names)
        )
        self.per_token = per_token
        self.counts = [0] * n
        self.taps = []
        self._width: int | None = None  # the members' output size, once one is known
        self._width_of = 0  # the member it was first seen on

    # ------------------------------------------------------------------ registry hooks
    @classmethod
    def validate_options(cls, raw: Mapping[str, Any], teacher_config: type[BaseModel]) -> Any:
        """Members as full ``teacher:`` sections (at least two); routes checked by name/index."""
        o = RoutedOptions.model_validate(dict(raw))
        o.members = validate_members(o.members, teacher_config, "routed")
        o.routes = {str(k): v for k, v in o.routes.items()}
        cls._from_options(o, [None] * len(o.members))  # every routing error, before any build
        return o

    @classmethod
    def _from_options(cls, o: Any, teachers: Sequence[Any], per_token: bool | None = None) -> Any:
        return cls(
            teachers, route_by=o.route_by, field=o.field, routes=o.routes, default=o.default,
            names=o.names, confidence=o.confidence, per_token=per_token,
        )  # fmt: skip

    @classmethod
    def from_config(cls, ctx: SourceContext) -> RoutedTeacher:
        """Every member run online; field routing checks the data and prints the split."""
        o = ctx.cfg.teacher.options
        if ctx.taps:
            raise ValueError(
                f"teacher.source=routed gives logits only, but the objective taps teacher "
                f"features ({', '.join(ctx.taps)}): use logit terms, or one teacher"
            )
        task = ctx.data.info.task
        if o.route_by == "confidence" and task == "embedding":
            raise ValueError(
                "teacher.route_by=confidence needs class or token probabilities; an embedding "
                "teacher has none: use route_by: field"
            )
        src = cls._from_options(o, online_members(ctx, o.members), per_token=task == "causal_lm")
        src._check_sizes([_output_size(t.module) for t in src.teachers])  # type: ignore[attr-defined]
        if o.route_by == "field":
            from mentor._console import err

            train = src.plan_split(ctx.data.train)
            src.plan_split(ctx.data.val)  # every held-out value must route too
            err.print(
                f"routed teacher: {src.split_line(train)} (train)",
                markup=False, highlight=False, soft_wrap=True,
            )  # fmt: skip
        return src

    @classmethod
    def plan_parameters(cls, ctx: SourceContext) -> int | None:
        """The members' parameters together."""
        return members_parameters(ctx, ctx.cfg.teacher.options.members)

    # ------------------------------------------------------------------ routing
    def to(self, device: torch.device | str) -> RoutedTeacher:
        """Move every member."""
        for t in self.teachers:
            t.to(device)
        return self

    def route(self, values: Sequence[Any], ids: Sequence[int] | None = None) -> Tensor:
        """Member index per field value (``routes``, else ``default``; else a clear error)."""
        keys = [_route_key(v) for v in values]
        out = [self.table.get(k, self.default) for k in keys]
        bad = [i for i, m in enumerate(out) if m is None]
        if bad:
            vals = sorted({keys[i] for i in bad})
            n = len(self.teachers)
            members = f"an index 0..{n - 1}" + (
                f" or one of {', '.join(self.names)}" if self.names else ""
            )
            where = ""
            if ids is not None:
                where = " (example ids " + ", ".join(str(int(ids[i])) for i in bad[:5]) + ")"
            raise ValueError(
                f"teacher.routes has no route for {self.field}="
                + ", ".join(repr(v) for v in vals[:5])
                + f"{where}: add {'them' if len(vals) > 1 else 'it'} to teacher.routes or set "
                f"teacher.default to a member ({members})"
            )
        return torch.tensor(out, dtype=torch.long)

    def plan_split(self, data: Any) -> list[int]:
        """Examples per member of a dataset (field routing), checking every value routes."""
        values = _field_values(data, self.field)  # type: ignore[arg-type]
        routes = self.route(values) if values else torch.zeros(0, dtype=torch.long)
        return torch.bincount(routes, minlength=len(self.teachers)).tolist()

    def split_line(self, counts: Sequence[int] | None = None) -> str:
        """``news: 120, code: 80 (by domain)``: examples per member (default: served so far)."""
        counts = self.counts if counts is None else counts
        by = f"by {self.field}" if self.route_by == "field" else f"by {self.confidence}"
        parts = ", ".join(f"{n}: {c:,}" for n, c in zip(self.labels, counts))
        return f"{parts} ({by})"

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        """The routed signal: each row from its member; ``features['routed_member']``."""
        if self.route_by == "field":
            logits, route = self._by_field(batch)
        else:
            logits, route = self._by_confidence(batch)
        for m, c in enumerate(torch.bincount(route, minlength=len(self.teachers)).tolist()):
            self.counts[m] += c
        if log.isEnabledFor(logging.DEBUG):
            log.debug("routed teacher, served so far: %s", self.split_line())
        return TeacherOutput(logits=logits, features={ROUTE_FEATURE: route.to(logits.device)})

    def _by_field(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if self.field not in batch:
            raise KeyError(
                f"teacher.field={self.field!r}: the batch has no field {self.field!r} (it has "
                f"{', '.join(sorted(batch))}); for JSONL prompt data pass it through with "
                f"data.params.fields: [{self.field}] (generation.mode=replay reuses samples "
                "without data fields: use route_by: confidence there)"
            )
        values = batch[self.field]
        if isinstance(values, Tensor):
            values = values.reshape(len(values), -1)[:, 0] if values.dim() > 1 else values
            values = values.tolist()
        route = self.route(list(values), batch.get("index"))
        b = len(route)
        used = route.unique().tolist()
        if len(used) == 1:  # the whole batch goes to one member: no copy
            z = self._dense(used[0], self.teachers[used[0]](batch).logits)
            return z, route
        out: Tensor | None = None
        for m in used:
            rows = (route == m).nonzero().squeeze(1)
            z = self._dense(m, self.teachers[m](_rows(batch, rows, b)).logits).float()
            if out is None:
                out = z.new_empty((b, *z.shape[1:]))
            elif z.shape[1:] != out.shape[1:]:
                raise ValueError(
                    f"routed members gave outputs of shapes {tuple(out.shape[1:])} and "
                    f"{tuple(z.shape[1:])} per example; they must agree"
                )
            out[rows.to(out.device)] = z
        assert out is not None
        return out, route

    def _by_confidence(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        out = best = route = None
        for m, t in enumerate(self.teachers):
            z = self._dense(m, t(batch).logits).float()
            score = self._confidence(z, batch)
            if out is None:  # a copy: the member's own tensor is never written to
                out, best = z.clone(), score
                route = torch.zeros(len(z), dtype=torch.long, device=z.device)
                continue
            if z.shape != out.shape:
                raise ValueError(
                    f"routed members gave outputs of shapes {tuple(out.shape)} and "
                    f"{tuple(z.shape)}; they must agree"
                )
            better = score > best  # ties stay with the lower index
            out[better] = z[better]
            best = torch.where(better, score, best)
            route[better] = m  # type: ignore[index]
        assert out is not None and route is not None
        return out, route.cpu()

    def _confidence(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Per-example confidence: max probability or negative entropy, per sequence for LMs."""
        logp = torch.log_softmax(logits.float(), -1)
        if self.confidence == "max_prob":
            score = logp.max(-1).values.exp()
        else:
            score = (logp.exp() * logp).sum(-1)  # -entropy: higher is more confident
        if score.dim() == 1:
            return score
        per_token = self.per_token if self.per_token is not None else logits.dim() == 3
        mask = batch.get("completion_mask") if per_token else None
        if mask is None:
            mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(score)
        mask = mask.to(score.device).float().reshape(score.shape)
        if per_token:  # the causal shift: logits at t predict token t+1, the last predict none
            score, mask = score[:, :-1], mask[:, 1:]
        return (score * mask).sum(1) / mask.sum(1).clamp_min(1)

    def _dense(self, m: int, z: Any) -> Tensor:
        if not isinstance(z, Tensor):
            raise TypeError("routed teachers combine dense logits; members must run online")
        self._check_sizes([None] * m + [int(z.shape[-1])])
        return z

    def _check_sizes(self, sizes: Sequence[int | None]) -> None:
        """Members must share the output space (classes or vocabulary)."""
        for m, n in enumerate(sizes):
            if n is None:
                continue
            if self._width is None:
                self._width, self._width_of = n, m
            elif n != self._width:
                a, b = self._width_of, m
                raise ValueError(
                    f"teacher.members: {self.labels[b]} gives {n:,} classes/vocabulary "
                    f"entries but {self.labels[a]} gives {self._width:,}; routed members "
                    "must share one output space (same classes, same tokenizer and vocabulary): "
                    "use members built for the same data and tokenizer"
                )

    # ------------------------------------------------------------------ caching
    def provenance_module(self) -> nn.Module:
        """Every member's module in one container (hashed into the cache's provenance)."""
        return RoutedMembers([t.module for t in self.teachers])  # type: ignore[attr-defined]

    def provenance_spec(self) -> dict[str, Any]:
        """The routing spec recorded under ``teacher.spec`` of a cache's provenance."""
        return {
            "source": "routed",
            "routing": {
                "route_by": self.route_by,
                "field": self.field,
                "routes": dict(self.table),
                "default": self.default,
                "confidence": self.confidence if self.route_by == "confidence" else None,
                "names": self.names,
            },
        }

    def cache_function(self, features: Sequence[str], device: torch.device | str) -> Any:
        """A teacher function ``batch -> (logits, features)`` for ``mentor cache``.

        Only the routed output itself can be stored as a feature (``output``, embedding
        teachers): the members' modules differ, so their taps do.
        """
        other = [f for f in features if f != OUTPUT]
        if other:
            raise ValueError(
                f"mentor cache of a routed teacher stores its routed signal only; drop "
                f"--features {' '.join(other)}"
            )
        self.to(device)
        self.counts = [0] * len(self.teachers)

        def run(batch: dict[str, Any]) -> tuple[Any, dict[str, Tensor]]:
            out = self(batch)
            return out.logits, ({OUTPUT: out.logits} if OUTPUT in features else {})

        def close() -> None:
            from mentor._console import err

            err.print(f"routed teacher: cached {self.split_line()}", markup=False,
                      highlight=False, soft_wrap=True)  # fmt: skip

        run.close = close  # type: ignore[attr-defined]
        return run


class RoutedMembers(nn.ModuleList):
    """The members of a routed teacher, as one module for provenance (weights, parameters)."""


def _output_size(module: nn.Module) -> int | None:
    from mentor.students.vocab import output_size

    return output_size(module)


def _rows(batch: Mapping[str, Any], rows: Tensor, b: int) -> dict[str, Any]:
    """The rows ``rows`` of every per-example entry of ``batch`` (others kept as they are)."""
    out: dict[str, Any] = {}
    picked = rows.tolist()
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == b:
            out[k] = v[rows.to(v.device)]
        elif isinstance(v, (list, tuple)) and len(v) == b:
            out[k] = [v[i] for i in picked]
        else:
            out[k] = v
    return out


def _field_values(data: Any, field: str) -> list[Any]:
    """Every example's ``field`` (a clear error when the data's items have no such field)."""
    n = len(data)
    if n == 0:
        return []
    fields = getattr(data, "fields", None)
    if isinstance(fields, Mapping) and field in fields:
        return list(fields[field])
    first = data[0]
    if not isinstance(first, Mapping) or field not in first:
        has = ", ".join(sorted(first)) if isinstance(first, Mapping) else type(first).__name__
        raise ValueError(
            f"teacher.field={field!r}: the data's examples have no field {field!r} (they have "
            f"{has}); for JSONL prompt data pass it through with data.params.fields: [{field}], "
            "or route on a field the data has"
        )
    if field == "labels" and isinstance(getattr(data, "labels", None), Tensor):
        return data.labels.tolist()
    return [data[i][field] for i in range(n)]


__all__ = ["ROUTE_FEATURE", "RoutedOptions", "RoutedTeacher"]

"""Registered model builders (``student.builder`` / ``teacher.builder`` in a recipe).

A builder is ``fn(info, teacher=None, **params) -> nn.Module``. A built model can be saved
to a folder (``model.safetensors`` + ``mentor_model.json``) and rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from mentor.data.sources import DataInfo
from mentor.registry import Registry

BUILDERS: Registry[Callable[..., nn.Module]] = Registry("model builder")


def _need(info: DataInfo, attr: str, builder: str) -> Any:
    v = getattr(info, attr)
    if v is None:
        raise ValueError(f"builder {builder!r} needs data with a known {attr}")
    return v


@BUILDERS.register("mlp")
def mlp(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    hidden: list[int] | int = 64,
    dropout: float = 0.0,
    in_features: int | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """Multi-layer perceptron with ReLU: in_features -> hidden... -> num_classes."""
    dims = [in_features or _need(info, "in_features", "mlp")]
    dims += [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(dims[-1], num_classes or _need(info, "num_classes", "mlp")))
    return nn.Sequential(*layers)


@BUILDERS.register("cnn")
def cnn(
    info: DataInfo,
    teacher: nn.Module | None = None,
    *,
    channels: list[int] | None = None,
    hidden: int = 64,
    dropout: float = 0.0,
) -> nn.Module:
    """Small CNN: [conv3x3-ReLU-maxpool] per entry of ``channels``, then a 2-layer head."""
    shape = _need(info, "input_shape", "cnn")
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise ValueError(f"builder 'cnn' needs image inputs [C,H,W], data has shape {shape}")
    c, h, w = shape
    layers: list[nn.Module] = (
        [nn.Unflatten(1, (c, h, w))] if len(info.input_shape or ()) != 3 else []
    )
    for out in channels or [16, 32]:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, _need(info, "num_classes", "cnn")))
    return nn.Sequential(*layers)


def build_model(
    builder: str,
    params: dict[str, Any],
    info: DataInfo,
    teacher: nn.Module | None = None,
    data: Any = None,
) -> nn.Module:
    """Build a model by registered name; bad parameters name the builder and valid ones.

    ``hf:<path>`` loads a user's own Hugging Face model (``builder="hf"`` with ``model=path``).
    Builders that take a ``data`` argument (e.g. ``tfidf_mlp``) get the training set.
    """
    if builder.startswith("hf:"):
        builder, params = "hf", {**params, "model": builder[3:]}
    fn = BUILDERS.get(builder)
    sig = inspect.signature(fn)
    valid = [p for p, v in sig.parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = [k for k in params if k not in valid]
    if unknown:
        from mentor.registry import did_you_mean

        raise ValueError(
            f"builder {builder!r} has no parameter {unknown[0]!r}."
            f"{did_you_mean(unknown[0], valid)} Valid parameters: {', '.join(valid)}"
        )
    model = (
        fn(info, teacher, data, **params)
        if "data" in sig.parameters
        else fn(info, teacher, **params)
    )
    if not hasattr(model, "mentor_rebuild"):  # how save_model/load_model rebuild it
        model.mentor_rebuild = (builder, dict(params))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def save_model(
    model: nn.Module, folder: str | Path, builder: str, params: dict[str, Any], info: DataInfo
) -> Path:
    """Save ``model`` to ``folder`` with a ``mentor_model.json`` saying how to reload it.

    Hugging Face models and adapters are written with ``save_pretrained`` (plus the data's
    tokenizer), TF-IDF students with their vocabulary, other modules as ``model.safetensors``
    rebuilt by their builder.
    """
    from mentor.models.hf import hf_core, save_hf
    from mentor.models.tfidf import TfidfMLP
    from mentor.students.dual_head import DualHead, save_dual_head

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dual = None
    if isinstance(model, DualHead):  # the inner student as usual, plus the second head
        dual, model = model, model.student
    if hf_core(model) is not None:
        tok = None
        if info.tokenizer:
            from mentor.models.assets import load_tokenizer

            tok = load_tokenizer(info.tokenizer)
        meta = save_hf(model, folder, tok)
    elif isinstance(model, TfidfMLP):
        meta = model.save(folder)
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        tmp = folder / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(folder / "model.safetensors")
        meta = {"format": "builder"}
        rebuild = getattr(model, "mentor_rebuild", None)
        if rebuild is not None and tuple(rebuild) != (builder, params):
            # e.g. a pruned copy of a teacher: rebuilt by the teacher's (or cnn) builder
            meta["rebuild"] = {"builder": rebuild[0], "params": rebuild[1]}
    sparse = getattr(model, "mentor_sparse", None)
    if sparse is not None:  # an unstructured / N:M sparse student: say how sparse
        got = sparse.sparsity(model)
        meta["sparsity"] = {"sparsity": got["sparsity"], "nonzero": got["nonzero"],
                            "total": got["total"], "pattern": sparse.pattern}  # fmt: skip
    meta.update(builder=builder, params=params, info=dataclasses.asdict(info))
    if dual is not None:
        meta.update(save_dual_head(dual, folder))
    (folder / "mentor_model.json").write_text(json.dumps(meta, indent=2, default=str))
    return folder


def _info_from_meta(raw: dict[str, Any]) -> DataInfo:
    known = {f.name for f in dataclasses.fields(DataInfo)}
    kw = {k: v for k, v in raw.items() if k in known}
    kw["input_shape"] = tuple(kw.get("input_shape") or ()) or None
    return DataInfo(**kw)


def load_model(folder: str | Path) -> tuple[nn.Module, DataInfo]:
    """Rebuild a model saved by ``save_model`` (weights via safetensors, no remote code)."""
    folder = Path(folder)
    meta_path = folder / "mentor_model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} has no mentor_model.json: not a saved mentor model")
    meta = json.loads(meta_path.read_text())
    info = _info_from_meta(meta["info"])
    fmt = meta.get("format", "builder")
    if fmt in ("hf", "hf_adapter"):
        from mentor.models.hf import load_hf
        from mentor.pruning.structured import restore_pruned_heads

        # heads removed by structured pruning are re-applied before the weights load
        model = load_hf(folder, meta, prepare=restore_pruned_heads).eval()
    elif fmt == "tfidf_mlp":
        from mentor.models.tfidf import TfidfMLP

        model = TfidfMLP.load(folder, meta).eval()
    else:
        how = meta.get("rebuild") or {"builder": meta["builder"], "params": meta["params"]}
        model = build_model(how["builder"], how["params"], info)
        state = load_file(str(folder / "model.safetensors"))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"{folder}: the saved weights do not fit the model its mentor_model.json "
                f"describes (builder {how['builder']!r} with {how['params']}): was it pruned "
                f"or built with other settings? ({str(e).splitlines()[0]})"
            ) from None
    if "dual_head" in meta:  # DHO: wrap the inner student again with its distillation head
        from mentor.students.dual_head import load_dual_head

        model = load_dual_head(model, folder, meta)
    return model, info


__all__ = ["BUILDERS", "build_model", "count_parameters", "load_model", "save_model"]

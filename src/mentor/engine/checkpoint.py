"""Checkpoints: atomic, complete-or-absent, enough to resume bit-exactly.

Layout of ``RUN/checkpoints/step_00000100/``: ``trainable.safetensors`` (student + objective
projectors), ``optimizer.pt``, ``scheduler.pt`` (tensors and numbers only; loaded with
``weights_only=True``), ``teacher.safetensors`` (EMA teachers only), ``rng_rank{r}.json``,
per-process tensors ``{name}_rank{r}.safetensors`` (``replay_rank{r}.safetensors``: the
replay buffer of ``generation.mode=replay``), ``state.json`` (step, data position,
early-stopping and objective state), and ``checksums.json`` (sha256 and size of every other
file, every process's files included). A checkpoint is written under a hidden temporary name
and renamed when complete, so a kill never leaves a checkpoint that looks complete but isn't;
loading verifies every checksum first, and a damaged checkpoint (truncated, byte-flipped,
missing a file) is reported and the previous one is used instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

KEEP = 2
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """No intact checkpoint could be loaded; the message names the files and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    """Record the sha256 and size of every file in ``folder`` (``checksums.json``)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    sums = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    for p in [*files, folder / CHECKSUMS]:  # on disk before the rename makes it "complete"
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def verify(folder: Path) -> list[str]:
    """Problems of a checkpoint or saved-model folder (empty when every file matches)."""
    sums_path = folder / CHECKSUMS
    if not sums_path.exists():
        return [f"{sums_path.name} is missing (written by mentor < 0.2, or damaged)"]
    try:
        sums = json.loads(sums_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [f"{sums_path.name} is not valid JSON"]
    problems = []
    for name, rec in sums.items():
        f = folder / name
        if not f.exists():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != rec["bytes"]:
            problems.append(f"{name} has {f.stat().st_size} bytes, {rec['bytes']} were written")
        elif _sha256(f) != rec["sha256"]:
            problems.append(f"{name} does not match its sha256 (corrupted)")
    return problems


def _ckpt_dir(run: Path) -> Path:
    return run / "checkpoints"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = _ckpt_dir(run)
    if not d.exists():
        return []
    return sorted(p for p in d.glob("step_*") if (p / "state.json").exists())


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))


def rank_file(folder: Path, name: str, rank: int) -> Path:
    """Where process ``rank`` keeps its tensors ``name`` in a checkpoint folder."""
    return folder / f"{name}_rank{rank}.safetensors"


def load_rank_tensors(folder: Path, name: str, rank: int) -> dict[str, torch.Tensor] | None:
    """Process ``rank``'s tensors ``name`` from a checkpoint (None when it has none)."""
    f = rank_file(folder, name, rank)
    return load_file(str(f)) if f.exists() else None


def save(
    run: Path, acc: Any, model: Any, optimizer: Any, scheduler: Any, teacher: Any, state: dict,
    *, rank_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:  # fmt: skip
    """Write the checkpoint of ``state['step']`` atomically (with checksums); prune old ones.

    ``rank_tensors``: this process's own state, ``{name: {key: tensor}}``, written as
    ``{name}_rank{r}.safetensors`` by each process before the checksums are computed.
    """
    step = state["step"]
    final = _ckpt_dir(run) / f"step_{step:08d}"
    tmp = _ckpt_dir(run) / f".tmp-step_{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    (tmp / f"rng_rank{acc.process_index}.json").write_text(json.dumps(_rng_state()))
    for name, tensors in (rank_tensors or {}).items():
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(flat, str(rank_file(tmp, name, acc.process_index)))
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model(model, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if teacher is not None and teacher.state_dict():
            save_file(teacher.state_dict(), str(tmp / "teacher.safetensors"))
        extra = model.objective.extra_state() if hasattr(model.objective, "extra_state") else {}
        (tmp / "state.json").write_text(json.dumps({**state, "objective": extra}))
        write_checksums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_latest(
    run: Path, acc: Any, model: Any, optimizer: Any, scheduler: Any, teacher: Any,
    *, restore: Callable[[Path], None] | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """Restore the newest intact checkpoint; returns its state (None when there is none).

    Each checkpoint's files are verified against ``checksums.json`` before anything is loaded;
    a damaged one is reported and the previous one tried. When checkpoints exist but none is
    intact, :class:`CheckpointError` is raised (training never silently restarts at step 0).
    ``restore(folder)`` is called last for the caller's own state (e.g. its
    :func:`load_rank_tensors`); if it fails, the checkpoint counts as damaged.
    """
    found = list_checkpoints(run)
    if not found:
        return None
    damaged = []
    for d in reversed(found):
        problems = verify(d)
        if not problems:
            try:
                state = _load(d, acc, model, optimizer, scheduler, teacher)
                if restore is not None:
                    restore(d)
            except CheckpointError:
                raise
            except Exception as e:  # e.g. a file that verifies but cannot be read
                problems = [f"cannot be loaded: {type(e).__name__}: {e}"]
            else:
                for name, why in damaged:
                    acc.print(f"checkpoint {name} is damaged ({why}): resumed from {d.name}")
                acc.print(f"resumed from {d} (step {state['step']})")
                return state
        damaged.append((d.name, "; ".join(problems)))
    raise CheckpointError(
        f"no intact checkpoint in {run / 'checkpoints'}: "
        + "; ".join(f"{n}: {w}" for n, w in damaged)
        + ". Start the run again (output.overwrite=true moves this one aside)"
    )


def _load(d: Path, acc: Any, model: Any, optimizer: Any, scheduler: Any, teacher: Any) -> dict:
    missing, unexpected = load_model(model, str(d / "trainable.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {d} does not fit this run's student/objective "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): was the recipe changed?"
        )
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
    if teacher is not None and (d / "teacher.safetensors").exists():
        teacher.load_state_dict(load_file(str(d / "teacher.safetensors")))
    rng = d / f"rng_rank{acc.process_index}.json"
    _set_rng_state(json.loads((rng if rng.exists() else d / "rng_rank0.json").read_text()))
    state = json.loads((d / "state.json").read_text())
    extra = state.pop("objective", {})
    if extra and hasattr(model.objective, "load_extra_state"):
        model.objective.load_extra_state(extra)
    return state


def finite(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with non-finite floats replaced by None (JSON has no NaN/inf)."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records logged up to ``step`` (the rest is logged again after a resume).

    A torn last line (a kill while it was being written) or any line that is not valid JSON
    is dropped. Returns how many lines were dropped.
    """
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for ln in path.read_text(errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(ln)
        else:
            dropped += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)
    return dropped


def missing_records(path: Path, step: int, every: int) -> list[int]:
    """Train steps up to ``step`` that should have a record (every ``every`` steps) but don't."""
    if not path.exists():
        return list(range(every, step + 1, every))
    have = set()
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train":
            have.add(rec.get("step"))
    return [s for s in range(every, step + 1, every) if s not in have]

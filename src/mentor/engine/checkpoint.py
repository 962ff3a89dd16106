"""Checkpoints: atomic, complete-or-absent, enough to resume bit-exactly.

Layout of ``RUN/checkpoints/step_00000100/``: ``trainable.safetensors`` (student + objective
projectors), ``optimizer.pt``, ``scheduler.pt`` (tensors and numbers only; loaded with
``weights_only=True``), ``teacher.safetensors`` (EMA teachers only), ``rng_rank{r}.json`` and
``state.json`` (step, data position, early-stopping and objective state). A checkpoint is
written under a hidden temporary name and renamed when complete, so a kill never leaves a
checkpoint that looks complete but isn't.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

KEEP = 2


def _ckpt_dir(run: Path) -> Path:
    return run / "checkpoints"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = _ckpt_dir(run)
    if not d.exists():
        return []
    return sorted(p for p in d.glob("step_*") if (p / "state.json").exists())


def clear_run(run: Path) -> None:
    """Remove a previous run's artifacts (``output.overwrite=true``)."""
    for name in ("checkpoints", "student"):
        shutil.rmtree(run / name, ignore_errors=True)
    for name in ("metrics.jsonl", "eval.json"):
        (run / name).unlink(missing_ok=True)


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


def save(
    run: Path, acc: Any, model: Any, optimizer: Any, scheduler: Any, teacher: Any, state: dict
) -> Path:
    """Write the checkpoint of ``state['step']`` atomically and prune old ones."""
    step = state["step"]
    final = _ckpt_dir(run) / f"step_{step:08d}"
    tmp = _ckpt_dir(run) / f".tmp-step_{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    (tmp / f"rng_rank{acc.process_index}.json").write_text(json.dumps(_rng_state()))
    if acc.is_main_process:
        save_model(model, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if teacher is not None and teacher.state_dict():
            save_file(teacher.state_dict(), str(tmp / "teacher.safetensors"))
        extra = model.objective.extra_state() if hasattr(model.objective, "extra_state") else {}
        (tmp / "state.json").write_text(json.dumps({**state, "objective": extra}))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_latest(
    run: Path, acc: Any, model: Any, optimizer: Any, scheduler: Any, teacher: Any
) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint; returns its state (or None when there is none)."""
    found = list_checkpoints(run)
    if not found:
        return None
    d = found[-1]
    missing, unexpected = load_model(model, str(d / "trainable.safetensors"), strict=False)
    if missing or unexpected:
        raise RuntimeError(
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
    acc.print(f"resumed from {d} (step {state['step']})")
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (they will be logged again after a resume)."""
    if not path.exists():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)

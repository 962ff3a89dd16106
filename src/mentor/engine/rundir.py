"""Run directories: what mentor may write, replace or resume — checked before anything is written.

* A directory is a mentor run when it holds the marker ``.mentor-run`` (older runs: a
  ``config.yaml`` beside ``metrics.jsonl`` or ``checkpoints/step_*``). mentor never deletes
  or replaces files in a directory that is not a run it wrote.
* ``output.overwrite=true`` moves the old run aside to ``RUN.old-<time>/`` (nothing is
  deleted), and only once the new run has been fully set up; if the new run then fails before
  its first checkpoint, its directory is removed and the old run moved back.
* ``--resume`` compares the new config with the run's ``config.yaml`` first: a changed
  teacher, student, data or objective (or any training setting that changes what a step
  computes) is refused, naming each key; longer training and a new learning rate are allowed
  and announced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MARKER = ".mentor-run"
# keys that may change when a run is resumed (everything else must match config.yaml)
RESUMABLE = {
    "name",
    "description",
    "train.max_steps",
    "train.epochs",
    "train.lr",
    "train.progress",
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "eval.every",
    "eval.batch_size",
    # a diffusion run's evaluation settings: which NFEs are scored, on how many samples
    "diffusion.student_steps",
    "diffusion.eval_teacher_steps",
    "diffusion.eval_samples",
    "diffusion.threads",
    "output.dir",  # a run directory may be moved or copied
    "output.trackers",
    "output.overwrite",
}


def is_run(out: Path) -> bool:
    """Whether ``out`` holds a run mentor wrote."""
    if (out / MARKER).exists():
        return True
    legacy = (out / "metrics.jsonl").exists() or any((out / "checkpoints").glob("step_*"))
    return (out / "config.yaml").exists() and legacy


def _foreign(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]


def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (objective terms and params stay whole below)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key.count(".") < 1:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every section key that differs between two dumped configs."""
    a, b = flat(old), flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_output(cfg: Any, resume: bool) -> list[tuple[str, Any, Any]]:
    """Refuse, before anything is built or written, a run that would lose or mix data.

    Returns the allowed changes when resuming (for the loop to announce and apply).
    """
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output.dir={str(out)!r} is a file, not a directory")
    if not out.exists() or not any(out.iterdir()):
        return []
    if not is_run(out):
        shown = ", ".join(_foreign(out)[:6])
        raise FileExistsError(
            f"output.dir={str(out)!r} holds files mentor did not write ({shown}): choose a new "
            "or empty output.dir (mentor never deletes what it did not write)"
        )
    if not resume:
        if not cfg.output.overwrite:
            raise FileExistsError(
                f"run directory {out} already holds a run: continue it with --resume, "
                f"or set output.overwrite=true (the old run is moved to {out.name}.old-<time>), "
                "or choose another output.dir"
            )
        return []
    saved = out / "config.yaml"
    if not saved.exists():
        return []
    import yaml

    from mentor.config import dump_config

    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(
            f"{saved} is not valid YAML ({e}): cannot check the resumed config"
        ) from None
    try:  # keys added to mentor since the run was saved get their defaults
        from mentor.config import validate

        old = yaml.safe_load(dump_config(validate(old)))
    except ValueError:
        pass  # compare what was saved, as it is
    new = yaml.safe_load(dump_config(cfg))
    changes = config_changes(old, new)
    refused = [c for c in changes if c[0] not in RESUMABLE]
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused[:8])
        raise ValueError(
            f"--resume: the config differs from the run's {saved} in what the run computes: "
            f"{shown}. Resume with the run's own settings, or start a new run (another "
            "output.dir, or output.overwrite=true without --resume)"
        )
    quiet = ("output.overwrite", "output.dir", "train.progress")
    return [c for c in changes if c[0] not in quiet]


def move_aside(out: Path) -> Path:
    """Rename a finished or abandoned run to ``RUN.old-<time>`` (never deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = out.with_name(f"{out.name}.old-{stamp}-{n}")
    out.rename(dest)
    return dest


def write_marker(out: Path) -> None:
    """Mark ``out`` as a directory mentor created for a run."""
    from mentor._version import __version__

    rec = {"mentor": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / MARKER).write_text(json.dumps(rec))


def prepare(out: Path, config_text: str, resume: bool, say: Any = print) -> Path | None:
    """Create (or continue) the run directory ``out`` and write its ``config.yaml``; an
    overwritten run (allowed by :func:`check_output`) is moved aside and the new place said.
    Returns where the old run went (None when nothing was moved)."""
    moved = None
    if not resume and out.exists() and any(out.iterdir()):
        moved = move_aside(out)
        say(f"output.overwrite: the previous run in {out} was moved to {moved}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        write_marker(out)
    tmp = out / "config.yaml.tmp"
    tmp.write_text(config_text)
    tmp.replace(out / "config.yaml")
    return moved


def apply_lr_change(optimizer: Any, scheduler: Any, lr: float) -> None:
    """A resumed run's new ``train.lr``: the schedule continues from its step at the new base."""
    scheduler.base_lrs = [float(lr)] * len(scheduler.base_lrs)
    for g, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        g["initial_lr"] = float(lr)
        g["lr"] = float(lr) * fn(scheduler.last_epoch)

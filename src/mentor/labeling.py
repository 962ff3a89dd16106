"""``mentor generate --task label|rationale``: teacher-labelled and teacher-explained data.

Black-box distillation data for a classifier or a small LM, written once and read back by the
``text_table`` data source (``text``/``label`` columns) or the ``rationales`` data:

* ``label`` — the recipe's classification teacher (e.g. ``teacher.builder: llm_classifier``,
  an LM scoring each class name; or any classifier) labels each text; a line keeps the class,
  its probability and every class's log-probability. One teacher call per text.
* ``rationale`` — an LM teacher (``llm_classifier``) writes an explanation ending in an answer,
  ``samples`` times per text; the answer is parsed into a class (an answer naming no class is
  a counted skip, never a guessed label) and the majority class is kept with the rationale
  of its first sample — the data of "Distilling Step-by-Step! Outperforming Larger Language
  Models with Less Training Data and Smaller Model Sizes" (Hsieh et al., 2023), with the
  self-consistency vote of Wang et al. ("Self-Consistency Improves Chain of Thought Reasoning
  in Language Models", 2023). ``samples`` teacher calls per text.

Filters: ``min_chars``/``max_chars`` and ``dedupe`` (identical text) are applied before the
teacher is called, so they cost nothing; ``min_confidence`` (``label``: the class probability;
``rationale``: the fraction of samples that agree) after. ``budget`` caps teacher calls: the
run stops before the call that would exceed it. Texts the teacher was paid for but a filter
rejected go to ``OUT.rejected.jsonl`` with the reason — paid labels are never thrown away.

Lines are appended and flushed per batch, in data order, as they arrive; ``OUT.meta.json``
(provenance: recipe, teacher weights hash, task, filters, data fingerprint) is written before
the first. Running the same command again drops a torn last line and continues after the
last example processed; a meta that differs in anything but informational keys is refused
unless ``overwrite``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mentor._console import console
from mentor._jsonl import complete_lines
from mentor._version import __version__
from mentor.assembly import (
    Assembly,
    _write_json_atomic,
    generate_meta_diff,
    generate_meta_path,
    generation_seed,
    model_spec,
)
from mentor.config import RunConfig
from mentor.progress import Progress

LABEL_KIND = "mentor-label"
TASKS = ("label", "rationale")
RATIONALE_PROMPT = (
    "{text}\n\nQuestion: which of these does the text above belong to: {classes}? Explain "
    "briefly, then give the answer as 'Answer: <class>'.\n"
)


def rejected_path(out: Path) -> Path:
    """Where paid-for but filtered examples go: ``FILE.rejected.jsonl``."""
    return out.with_name(out.stem + ".rejected.jsonl")


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of ``path`` (a torn last line is cut off the file)."""
    rows = []
    for n, line in enumerate(complete_lines(path)[0], 1):
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e}); the file is damaged") from None
        if not isinstance(r, dict) or not isinstance(r.get("index"), int):
            raise ValueError(f'{path}:{n}: not a labelled line (needs an integer "index")')
        rows.append(r)
    return rows


def label_recipe(
    cfg: RunConfig,
    out: str | Path,
    *,
    task: str = "label",
    split: str = "train",
    budget: int | None = None,
    samples: int = 1,
    min_confidence: float = 0.0,
    min_chars: int = 0,
    max_chars: int | None = None,
    dedupe: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    prompt: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Label (or explain and label) a recipe's texts with its teacher; see the module doc.

    Returns a summary: ``file``, ``task``, ``examples``, ``kept`` / ``rejected`` (lines in the
    files now), ``teacher_calls`` (paid in total, this call and earlier ones), ``calls`` (this
    call), ``skipped`` (reason -> count, this call) and ``budget_left``.
    """
    out = Path(out)
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(('continue',) + TASKS)}")
    if out.suffix.lower() != ".jsonl":
        raise ValueError(f"--out {out}: use a .jsonl file")
    if split not in ("train", "val"):
        raise ValueError(f"--split {split!r}: choose train or val")
    if budget is not None and (isinstance(budget, bool) or budget < 1):
        raise ValueError(f"--budget {budget!r}: give at least 1 teacher call (or leave it out)")
    for key, v in (("--samples", samples), ("--batch-size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} {v!r}: use a positive integer")
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"--min-confidence {min_confidence}: use a number in [0, 1]")
    if prompt is not None and "{text}" not in prompt:
        raise ValueError(f"--prompt must contain {{text}}; got {prompt!r}")
    if task == "label" and samples != 1:
        raise ValueError("--samples applies to --task rationale (a label is one teacher call)")
    meta_path = generate_meta_path(out)
    if out.exists() and not meta_path.exists():
        raise FileExistsError(
            f"{out} exists and was not written by mentor generate (no {meta_path.name}): move "
            "it away or choose another --out"
        )

    asm = Assembly(cfg)
    bundle = asm.data
    names = list(bundle.info.class_names)
    if bundle.info.task != "classification" or not names:
        raise ValueError(
            f"--task {task} labels classification data with class names; data.source="
            f"{cfg.data.source!r} gives task {bundle.info.task!r}"
        )
    data = bundle.train if split == "train" else bundle.val
    texts = getattr(data, "texts", None)
    if texts is None:
        raise ValueError(f"--task {task} needs text data (data.source={cfg.data.source!r})")
    model = asm.module()
    if task == "rationale" and not hasattr(model, "generate"):
        raise ValueError(
            "--task rationale needs a teacher that writes text: teacher.builder llm_classifier "
            f"(this recipe's teacher is {cfg.teacher.builder!r})"
        )
    from mentor.cache.format import data_fingerprint, weights_hash

    meta = {
        "kind": LABEL_KIND,
        "task": task,
        "recipe": cfg.name,
        "model": {
            "name": cfg.teacher.path or f"{cfg.teacher.builder} {model_spec(cfg.teacher.params)}",
            "weights_sha256": weights_hash(model),
        },
        "teacher": cfg.teacher.model_dump(mode="json"),
        "classes": names,
        "filters": {
            "min_confidence": min_confidence,
            "min_chars": min_chars,
            "max_chars": max_chars,
            "dedupe": dedupe,
        },  # fmt: skip
        "samples": samples,
        "max_new_tokens": max_new_tokens if task == "rationale" else None,
        "prompt": (prompt or RATIONALE_PROMPT) if task == "rationale" else None,
        "seed": cfg.train.seed,
        "split": split,
        "data": {
            "spec": cfg.data.model_dump(mode="json"),
            "fingerprint": data_fingerprint(data),
            "examples": len(data),
        },  # fmt: skip
        "mentor_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rej = rejected_path(out)
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        diff = (
            generate_meta_diff(old, meta)
            if isinstance(old, dict) and old.get("kind") == LABEL_KIND
            else [f"{meta_path.name} is not a mentor generate --task label/rationale record"]
        )
        if diff and not overwrite and (out.exists() or rej.exists()):
            raise ValueError(
                f"{out} was labelled otherwise: {'; '.join(diff)}. Use another --out, or "
                "--overwrite to replace it"
            )
        if diff:
            for p in (out, rej):
                if p.exists():
                    p.unlink()  # ours: it has our sidecar
            _write_json_atomic(meta_path, meta)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(meta_path, meta)

    kept_rows, rej_rows = _read_lines(out), _read_lines(rej)
    ids = [int(data[i]["index"]) for i in range(len(data))]
    done = {r["index"] for r in kept_rows} | {r["index"] for r in rej_rows}
    unknown = done - set(ids)
    if unknown:
        raise ValueError(
            f"{out}: examples {sorted(unknown)[:5]} are not this recipe's {split} examples; the "
            "file is damaged (use --overwrite to start again)"
        )
    paid = sum(int(r.get("calls", 1)) for r in kept_rows + rej_rows)
    skipped: Counter[str] = Counter()
    seen_text: set[str] = set()
    todo: list[int] = []
    for pos, idx in enumerate(ids):  # free filters first (recomputed identically on resume)
        t = texts[pos]
        if len(t) < min_chars:
            skipped["too_short"] += 1
        elif max_chars is not None and len(t) > max_chars:
            skipped["too_long"] += 1
        elif dedupe and t in seen_text:
            skipped["duplicate"] += 1
        elif idx not in done:
            todo.append(pos)
        seen_text.add(t)
    per_text = samples if task == "rationale" else 1
    calls = 0
    stopped = False
    bar = Progress(len(todo), enabled=progress, label=f"generate {task}", unit="texts")
    try:
        with open(out, "a") as f_keep, open(rej, "a") as f_rej:
            for lo in range(0, len(todo), batch_size):
                left = None if budget is None else budget - paid
                chunk = todo[lo : lo + batch_size]
                if left is not None and left < per_text * len(chunk):
                    chunk = chunk[: max(0, left // per_text)]
                    stopped = True
                if not chunk:
                    break
                if task == "label":
                    rows = _label_rows(model, asm, data, chunk, names, min_confidence)
                else:
                    rows = _rationale_rows(
                        model, [texts[p] for p in chunk], [ids[p] for p in chunk], names,
                        samples, min_confidence, max_new_tokens, cfg.train.seed,
                        prompt or RATIONALE_PROMPT,
                    )  # fmt: skip
                keep_lines, rej_lines = [], []
                for pos, (row, reason) in zip(chunk, rows):
                    row = {"index": ids[pos], "text": texts[pos], **row, "calls": per_text}
                    if reason is None:
                        keep_lines.append(json.dumps(row) + "\n")
                    else:
                        skipped[reason] += 1
                        rej_lines.append(json.dumps({**row, "reason": reason}) + "\n")
                f_keep.write("".join(keep_lines))
                f_rej.write("".join(rej_lines))
                f_keep.flush()
                f_rej.flush()
                calls += per_text * len(chunk)
                paid += per_text * len(chunk)
                bar.update(min(len(todo), lo + len(chunk)), {})
                if stopped:
                    break
    finally:
        bar.close()
    kept, rejected = len(_read_lines(out)), len(_read_lines(rej))
    if stopped:
        console.print(
            f"budget of {budget} teacher calls spent: {len(todo) - (kept + rejected - len(done))} "
            "texts left unlabelled (run again with a larger --budget to continue)",
            highlight=False,
        )
    return {
        "file": str(out), "task": task, "split": split, "examples": len(ids), "kept": kept,
        "rejected": rejected, "teacher_calls": paid, "calls": calls, "skipped": dict(skipped),
        "budget_left": None if budget is None else budget - paid,
    }  # fmt: skip


def _label_rows(
    model: Any, asm: Assembly, data: Any, chunk: list[int], names: list[str], min_conf: float
) -> list[tuple[dict[str, Any], str | None]]:
    from mentor.models import model_outputs

    dev = next(model.parameters()).device
    batch = asm.collate([data[p] for p in chunk])
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        logits = model_outputs(model.eval(), batch).float()
    if logits.dim() != 2 or logits.shape[-1] != len(names):
        raise ValueError(
            f"--task label needs a teacher with one logit per class ({len(names)}); it returned "
            f"shape {tuple(logits.shape)}"
        )
    logp = logits.log_softmax(-1).cpu()
    rows = []
    for lp in logp:
        k = int(lp.argmax())
        conf = float(lp[k].exp())
        row = {"label": names[k], "label_id": k, "confidence": round(conf, 6),
               "logprobs": [round(float(x), 6) for x in lp]}  # fmt: skip
        rows.append((row, None if conf >= min_conf else "low_confidence"))
    return rows


def _rationale_rows(
    model: Any, texts: list[str], ids: list[int], names: list[str], samples: int,
    min_agree: float, max_new_tokens: int, seed: int, prompt: str,
) -> list[tuple[dict[str, Any], str | None]]:  # fmt: skip
    from mentor.models.llm_labeler import RATIONALE_SEP, parse_label

    answers = list(model.answers)
    outs: list[list[str]] = []
    for k in range(samples):  # sample k of every text, each from its own seeded generator
        seeds = [generation_seed(seed, i, k) for i in ids]
        outs.append(
            model.generate(
                texts, prompt=prompt, max_new_tokens=max_new_tokens,
                temperature=0.0 if samples == 1 else 0.7, seeds=seeds,
            )
        )  # fmt: skip
    rows = []
    for j in range(len(texts)):
        gens = [outs[k][j] for k in range(samples)]
        parsed = [parse_label(g, answers) for g in gens]
        votes = Counter(p for p in parsed if p is not None)
        if not votes:
            rows.append(({"generations": gens}, "no_class_in_answer"))
            continue
        c, n = votes.most_common(1)[0]
        agree = n / samples
        first = gens[parsed.index(c)]
        row = {"label": names[c], "label_id": c, "rationale": first.split(RATIONALE_SEP)[0].strip(),
               "agreement": round(agree, 6), "generations": gens}  # fmt: skip
        rows.append((row, None if agree >= min_agree else "low_agreement"))
    return rows

"""``mentor report RUN_DIR`` and ``mentor compare RUN_DIR...``.

Reports are built afterwards from the run directory alone (config.yaml, metrics.jsonl,
eval.json), never inside training. ``report.md`` links ``plots/*.png``; ``report.html`` embeds
the same PNGs as data URIs, so it is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import yaml

from mentor.report import plots

QUALITY = {
    "classification": ("accuracy", "higher is better"),
    "causal_lm": ("perplexity", "lower is better"),
    "causal_lm_xtok": ("bits_per_byte", "lower is better"),
    "embedding": ("cosine_to_teacher", "higher is better"),
}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl (empty if absent); a corrupt line names its number."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not valid JSON ({e})") from None
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:,.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def summary_rows(ev: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (one row per evaluated model)."""
    from mentor.eval.run_eval import headline

    names = list(ev["models"])
    heads = [headline(ev, n) for n in names]
    cols: list[str] = []
    for h in heads:
        cols += [k for k in h if k not in cols]
    rows = [
        [plots.LABELS.get(n, n), *(_fmt(h.get(c, float("nan"))) for c in cols)]
        for n, h in zip(names, heads)
    ]
    return ["model", *cols], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def build_report(run_dir: str | Path, *, evaluate_if_missing: bool = True) -> Path:
    """Write report.md, report.html and plots/ for a run; returns the HTML path."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a mentor run directory")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = read_metrics(run_dir)
    ev_path = run_dir / "eval.json"
    if not ev_path.exists() and evaluate_if_missing:
        from mentor.assembly import evaluate_run

        evaluate_run(run_dir)
    ev = json.loads(ev_path.read_text()) if ev_path.exists() else None

    pdir = run_dir / "plots"
    pdir.mkdir(exist_ok=True)
    sections: list[tuple[str, str, Path | None]] = []  # (title, markdown text, plot)
    if ev and ev.get("task") == "diffusion":  # the generative task: NFE table and samples
        sections += diffusion_sections(ev, run_dir, pdir)
    elif ev:
        header, rows = summary_rows(ev)
        task = ev["task"]
        metric, direction = QUALITY.get(task, ("accuracy", ""))
        text = (
            f"Held-out split: {ev['examples']:,} examples; quality metric **{metric}** "
            f"({direction}). Latency is the median of repeated batch-1 forward passes after "
            f"warm-up; throughput uses batch {_first_cost(ev).get('throughput_batch', '?')}. "
            f"Speedup = teacher latency / model latency, measured in the same process.\n\n"
            + _md_table(header, rows)
        )
        sparse = [n for n in ev["models"]
                  if (ev["models"][n].get("cost") or {}).get("zero_fraction", 0) >= 0.3]  # fmt: skip
        if sparse:
            text += (
                f"\n\n{', '.join(plots.LABELS.get(n, n) for n in sparse)}: weights are sparse "
                "(`sparsity` = exact zeros among the weight matrices). The zeros are stored "
                "in dense matrices and PyTorch's CPU kernels do the same work for them, so "
                "unstructured and 2:4 sparsity save storage (`compressed_mb`) but give **no "
                "CPU speed-up** here; structured pruning (smaller matrices) does."
            )
        sections.append(("Results", text, None))
    sections.append(("Training loss terms", "Each named term of the objective, as logged.",
                     plots.loss_terms(records, pdir / "loss_terms.png")))  # fmt: skip
    curve = plots.eval_curve(records, pdir / "eval_metrics.png")
    if curve:
        sections.append(("Held-out metrics during training", "", curve))
    if ev and ev.get("task") != "diffusion":
        models = ev["models"]
        rel = plots.reliability(models, pdir / "reliability.png")
        if rel:
            sections.append(
                (
                    "Calibration",
                    "Reliability diagram: a calibrated model lies on the diagonal.",
                    rel,
                )
            )
        metric = QUALITY.get(ev["task"], ("accuracy", ""))[0]
        qc = plots.quality_vs_cost(models, metric, pdir / "quality_vs_cost.png")
        if qc:
            sections.append(("Quality vs size and latency", "", qc))
        conf = models.get("student", {}).get("confusion")
        if conf:
            names = ev.get("class_names") or []
            sections.append(
                ("Confusion matrix", "", plots.confusion(conf, names, pdir / "confusion.png"))
            )
    raw_html: dict[str, str] = {}
    gen = generation_section(ev) if ev else None
    if gen:
        md_text, html_text = gen
        sections.append((GENERATION_TITLE, md_text, None))
        raw_html[GENERATION_TITLE] = html_text
    gain = gain_section(ev, run_dir) if ev else None
    if gain:
        sections.append(("Did distilling pay off?", gain, None))
    sel = selection_section(ev, cfg) if ev else None
    if sel:
        sections.append(("Teacher budget and selection", sel, None))
    sections.append(("Setup", _setup_text(cfg, ev), None))

    title = f"mentor report: {cfg.get('name', run_dir.name)}"
    md = [f"# {title}", ""]
    for head, text, plot in sections:
        md += [f"## {head}", "", text, ""]
        if plot:
            md += [f"![{head}](plots/{plot.name})", ""]
    (run_dir / "report.md").write_text("\n".join(md))
    out = run_dir / "report.html"
    out.write_text(_html(title, sections, raw_html))
    return out


GENERATION_TITLE = "Generation diagnostics"
GENERATION_METRICS = (
    ("teacher_nll", "teacher NLL of own samples (lower: the teacher finds them likelier)"),
    ("kl_student_teacher_on_samples", "KL(model ‖ teacher) per token on own samples"),
    ("kl_teacher_student_on_samples", "KL(teacher ‖ model) per token on own samples"),
    ("distinct_1", "distinct-1 (unique / total unigrams)"),
    ("distinct_2", "distinct-2 (unique / total bigrams)"),
    ("mean_completion_tokens", "mean completion tokens"),
)


def _md_cell(text: str) -> str:
    """Sample text as one markdown table cell: HTML and markdown syntax escaped, lines as <br>."""
    s = html.escape(text, quote=False)
    s = re.sub(r"([\\`*_\[\]{}()#+!|~])", r"\\\1", s)
    return s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def _html_cell(text: str) -> str:
    return f"<td>{html.escape(text)}</td>"


def generation_section(ev: dict[str, Any]) -> tuple[str, str] | None:
    """Markdown and HTML of the generation diagnostics of eval.json (None when it has none).

    A table of each metric per model and, per non-teacher model, its sampled completions
    beside the teacher's for the same prompts.
    """
    blocks = {n: m["generation"] for n, m in ev["models"].items() if "generation" in m}
    if not blocks:
        return None
    settings = ev.get("generation", {})
    names = list(blocks)
    header = ["metric", *(plots.LABELS.get(n, n) for n in names)]
    rows = [
        [label, *(_fmt(blocks[n].get(key, float("nan"))) for n in names)]
        for key, label in GENERATION_METRICS
        if any(key in b for b in blocks.values())
    ]
    how = (
        "greedy"
        if float(settings.get("temperature", 1.0)) == 0
        else f"temperature {settings.get('temperature')}, top_p {settings.get('top_p')}, "
        f"top_k {settings.get('top_k')}"
    )
    intro = (
        f"Each model samples one completion per prompt for the first "
        f"{settings.get('prompts', '?')} held-out prompts ({how}, up to "
        f"{settings.get('max_new_tokens', '?')} new tokens, seed {settings.get('seed', '?')}); "
        "the teacher scores every sampled token (on-policy evaluation, Agarwal et al. 2024). "
        "Distinct-n: Li et al. 2016."
    )
    table = _md_table(header, rows)
    md = [intro, "", table]
    parts = [_md_inline(intro), _md_inline(table)]
    for name, block in blocks.items():
        examples = block.get("examples") or []
        if not examples:
            continue
        label = plots.LABELS.get(name, name)
        head = f"Samples: {label} beside the teacher"
        md += ["", f"**{_md_cell(head)}**", "", "| prompt | " + _md_cell(label) + " | teacher |"]
        md.append("|---|---|---|")
        parts.append(f"<p><b>{html.escape(head)}</b></p>")
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in ("prompt", label, "teacher"))
        rows_html = [f"<table class='samples'><tr>{cells}</tr>"]
        for ex in examples:
            texts = [str(ex.get(k, "")) for k in ("prompt", "completion", "teacher_completion")]
            md.append("| " + " | ".join(_md_cell(t) for t in texts) + " |")
            rows_html.append("<tr>" + "".join(_html_cell(t) for t in texts) + "</tr>")
        parts.append("".join(rows_html) + "</table>")
    return "\n".join(md), "\n".join(parts)


def selection_section(ev: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """What a teacher-budget run paid for, round by round (None for other runs)."""
    s = ev.get("selection")
    if not s:
        return None
    if s.get("kind") == "domains":
        return domains_section(s)
    names = ev.get("class_names") or []

    def classes(per: dict[str, int]) -> str:
        return ", ".join(f"{names[int(k)] if int(k) < len(names) else k} {v}"
                         for k, v in per.items())  # fmt: skip

    rows = [
        [
            str(r["epoch"]),
            str(r["step"]),
            r["by"],
            str(r["picked"]),
            str(r["teacher_calls"]),
            _fmt(r["val_accuracy_before"]) if r["val_accuracy_before"] is not None else "-",
            classes(r.get("picked_per_class", {})),
        ]  # fmt: skip
        for r in s.get("rounds", [])
    ]
    for row, r in zip(rows, s.get("rounds", [])):
        row.append(str(r["trained_on"]) if "trained_on" in r else "all paid")
    lab = s.get("labelled", 0)
    first = (f"the {lab:,} labelled examples first, then " if lab else "") + "random ones"
    text = (
        f"The training set was a pool of {s['pool']:,} examples"
        + (f" ({lab:,} with their own label)" if lab else " (its own labels unused)")
        + f"; the teacher was paid for {s['teacher_calls']:,} of them (budget {s['budget']:,}): "
        f"{s['initial']:,} at first ({first}), then {s['per_round']:,} every {s['every']} "
        f"epoch(s) chosen by **{s['method']}** from the current student"
        + (f" ({s['why']})" if s.get("why") else "")
        + ". Final held-out accuracy "
        f"{_fmt(s['final_val_accuracy'])}; teacher calls for held-out evaluation during "
        f"training: {s['eval_calls']:,}. Every paid label is in `{s['labels_file']}`."
    )
    if s.get("paid_per_class"):
        text += f" Teacher labels of everything paid for: {classes(s['paid_per_class'])}."
    if s.get("kd_weight") is not None:
        text += f" Teacher terms' share of the loss (from the paid fraction): {s['kd_weight']:.3f}."
    if s.get("domain_weights"):
        w = ", ".join(f"{x:.3f}" for x in s["domain_weights"])
        text += f" Last domain proportions: {w}."
    header = ["epoch", "step", "chosen by", "picked", "teacher calls", "held-out acc. before",
              "teacher labels of the picked", "trained on"]  # fmt: skip
    return text + "\n\n" + _md_table(header, rows)


def domains_section(s: dict[str, Any]) -> str:
    """DDK's domain re-weighting of LM data: proportions and perplexities per round."""
    names = s["domains"]
    text = (
        f"Training blocks were drawn by domain (`{s['domain_field']}`), re-weighted every "
        f"{s['every']} steps by **ddk** ({s['why']}; smoothing {s['smoothing']:g}). Final "
        f"held-out perplexity of the student: mean {s['mean_ppl']:.2f}, worst "
        f"{s['worst_ppl']:.2f} ({s['worst_domain']}); teacher calls {s['teacher_calls']:,} "
        f"(+{s['eval_calls']:,} on held-out blocks)."
    )
    rows = [[nm, f"{s['final_student_ppl'][nm]:.2f}", f"{s['teacher_ppl'][nm]:.2f}",
             str(s["training_blocks_per_domain"][nm])] for nm in names]  # fmt: skip
    text += "\n\n" + _md_table(["domain", "student ppl", "teacher ppl", "training blocks"], rows)
    rounds = [
        [str(r["step"])] + [f"{w:.3f}" for w in r["domain_weights"]]
        + [str(sum((r.get("blocks_per_domain") or {}).values()))]
        for r in s.get("rounds", [])
    ]  # fmt: skip
    if rounds:
        text += "\n\nProportions per round:\n\n" + _md_table(
            ["step", *names, "blocks drawn"], rounds
        )
    return text


def gain_section(ev: dict[str, Any], run_dir: Path) -> str | None:
    """The distilled student against the same student trained on labels alone (None without
    a label-only student: ``eval.label_only`` or ``mentor eval --baseline``)."""
    g = ev.get("distillation_gain")
    if not g:
        return None
    models = ev["models"]
    acc = {n: models[n].get("accuracy") for n in ("teacher", "student_no_kd", "student")
           if n in models}  # fmt: skip
    pts = lambda x: f"{100 * x:+.2f}"  # noqa: E731
    verdict = (
        "distilling **paid off**" if g["significant"] and g["gain"] > 0
        else "distilling **made the student worse**" if g["significant"]
        else "the difference is **within the noise** of this held-out set"
    )  # fmt: skip
    lines = [
        f"Distilled student minus the same student trained on labels alone (same steps): "
        f"**{pts(g['gain'])} points** of held-out accuracy (95% bootstrap interval "
        f"{pts(g['ci95'][0])} to {pts(g['ci95'][1])}, {g['n']:,} examples): {verdict}.",
        "",
        _md_table(
            ["model", "held-out accuracy"],
            [[plots.LABELS.get(n, n), _fmt(v)] for n, v in acc.items()],
        ),  # fmt: skip
    ]
    fm = run_dir / "final_metrics.json"
    if fm.exists():
        warn = json.loads(fm.read_text()).get("label_only_warning")
        if warn:
            lines += ["", f"Before distilling: {warn}"]
    return "\n".join(lines)


def _first_cost(ev: dict[str, Any]) -> dict[str, Any]:
    for m in ev["models"].values():
        if "cost" in m:
            return m["cost"]
    return {}


def _setup_text(cfg: dict[str, Any], ev: dict[str, Any] | None) -> str:
    t = cfg.get("train", {})
    lines = [
        f"- teacher: `{cfg.get('teacher', {}).get('builder') or cfg.get('teacher', {}).get('source')}`"
        f", student: `{cfg.get('student', {}).get('builder')}` {cfg.get('student', {}).get('params', {})}",
        "- objective: " + ", ".join(f"`{k}` {v}" for k, v in cfg.get("objective", {}).items())
        if not cfg.get("diffusion")
        else _diffusion_setup(cfg["diffusion"]),
        f"- train: max_steps={t.get('max_steps')}, epochs={t.get('epochs')}, batch_size={t.get('batch_size')}, "
        f"lr={t.get('lr')}, schedule={t.get('schedule')}, precision={t.get('precision')}, seed={t.get('seed')}",
    ]
    if ev:
        m = ev["machine"]
        lines.append(
            f"- measured on: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
            f"{m['device']}, {m['dtype']}, torch {m['torch']}"
        )
    return "\n".join(lines)


def _md_inline(text: str) -> str:
    """Minimal markdown → HTML for report text (tables, bullets, bold, code)."""
    out, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            cells = [
                [c.strip() for c in r.strip("|").split("|")]
                for r in table
                if not r.startswith("|-")
            ]
            head, body = cells[0], cells[1:]
            out.append(
                "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )  # fmt: skip
            table = []
        if line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "\n".join(out)


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _html(
    title: str, sections: list[tuple[str, str, Path | None]], raw: dict[str, str] | None = None
) -> str:
    """The report as one HTML file; ``raw`` maps a section title to ready HTML for its text."""
    raw = raw or {}
    css = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6;padding:0 3px}"
        "table.samples td{text-align:left;vertical-align:top;white-space:pre-wrap;"
        "font-family:ui-monospace,monospace;font-size:13px}"
    )
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{css}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for head, text, plot in sections:
        parts.append(f"<h2>{html.escape(head)}</h2>")
        if head in raw:
            parts.append(raw[head])
        elif text:
            parts.append(_md_inline(text))
        if plot:
            data = base64.b64encode(plot.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(head)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def compare_runs(
    run_dirs: list[str | Path], out: str | Path | None = None
) -> tuple[list[dict[str, Any]], Path]:
    """Rows (one per run, the distilled student's headline numbers) and a comparison plot."""
    from mentor.eval.run_eval import headline

    rows = []
    diffusion_metric = None
    for d in map(Path, run_dirs):
        ev_path = d / "eval.json"
        if not ev_path.exists():
            raise FileNotFoundError(f"{ev_path} is missing: run `mentor eval {d}` first")
        ev = json.loads(ev_path.read_text())
        if ev["task"] == "diffusion":  # the generative task: its headline numbers
            head = ev.get("headline", {})
            diffusion_metric = f"student_{ev['diffusion']['metric']}"
            rows.append({"run": d.name, "name": ev.get("name", ""), "task": "diffusion",
                         **{k: v for k, v in head.items() if isinstance(v, (int, float))}})  # fmt: skip
            continue
        rows.append(
            {
                "run": d.name,
                "name": ev.get("name", ""),
                "task": ev["task"],
                **headline(ev, "student"),
            }
        )
    tasks = {r["task"] for r in rows}
    if tasks == {"diffusion"} and diffusion_metric:
        path = Path(out) if out else Path("compare.png")
        plots.comparison(rows, diffusion_metric, path)
        return rows, path
    metric = QUALITY.get(tasks.pop() if len(tasks) == 1 else "classification", ("accuracy",))[0]
    path = Path(out) if out else Path("compare.png")
    plots.comparison(rows, metric, path)
    return rows, path


# ----------------------------------------------------------------------------- diffusion
# The generative task (docs/diffusion.md): eval.json's "diffusion" block holds one row per
# (model, NFE); RUN/eval_samples.npz a few samples of each for the plots.

_DIFF_COLS = {
    "points": [("mmd", "MMD to fresh data"), ("modes_covered", "modes covered"),
               ("high_quality", "high-quality share")],
    "images": [("fd", "FD (classifier features)"), ("precision", "precision"),
               ("recall", "recall")],
}  # fmt: skip


def diffusion_table(ev: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the NFE table of a diffusion eval.json (one row per model and NFE)."""
    d = ev["diffusion"]
    cols = _DIFF_COLS[d["kind"]]
    header = ["model", "sampler", "NFE", *(c[1] for c in cols), "latency ms/sample"]
    rows = []
    for r in d["rows"]:
        name = {"noise": "pure noise (no model)"}.get(
            r["model"], plots.LABELS.get(r["model"], r["model"])
        )
        lat = r.get("latency_ms")
        rows.append([name, str(r.get("sampler", "-")), str(r["nfe"]),
                     *(_fmt(r.get(k, float("nan"))) for k, _ in cols),
                     f"{lat:.4f}" if isinstance(lat, float) else "-"])  # fmt: skip
    floor = d.get("data_floor")
    if floor:
        what = "real data (another draw)" if d["kind"] == "points" else "training images"
        rows.append([what, "-", "-", *(_fmt(floor.get(k, float("nan"))) for k, _ in cols), "-"])
    return header, rows


def diffusion_lines(metrics: dict[str, Any]) -> list[str]:
    """What ``mentor distill`` prints for a diffusion run (from final_metrics.json)."""
    m = metrics.get("metric", "mmd")
    name = {"mmd": "MMD", "fd": "classifier-feature FD"}.get(m, m)
    lines = []
    for who in ("teacher", "student"):
        if f"{who}_{m}" in metrics:
            extra = ""
            if f"{who}_coverage" in metrics:
                extra = f", mode coverage {metrics[f'{who}_coverage']:.3f}"
            elif f"{who}_precision" in metrics:
                extra = (f", precision {metrics[f'{who}_precision']:.3f}, recall "
                         f"{metrics[f'{who}_recall']:.3f}")  # fmt: skip
            lines.append(
                f"{who} {name} at {metrics[f'{who}_nfe']} NFE: {metrics[f'{who}_{m}']:.4f}{extra}"
            )
    if f"noise_{m}" in metrics:
        lines.append(f"pure noise {name}: {metrics[f'noise_{m}']:.4f}")
    if "speedup" in metrics:
        lines.append(f"speed-up of the {metrics['student_nfe']}-step student over the "
                     f"{metrics['teacher_nfe']}-step teacher: {metrics['speedup']:.1f}x")  # fmt: skip
    if metrics.get("fake_score_diverged_at_step") is not None:
        lines.append(f"warning: the DMD2 fake score diverged at step "
                     f"{metrics['fake_score_diverged_at_step']}")  # fmt: skip
    return lines


def _diffusion_setup(d: dict[str, Any]) -> str:
    return (f"- diffusion: objective `{d.get('objective')}` {d.get('params', {})}, "
            f"{d.get('prediction_type')} on `{d.get('beta_schedule')}` "
            f"({d.get('num_train_timesteps')} timesteps); the logit `objective` is not used")  # fmt: skip


def _samples(run_dir: Path) -> dict[str, Any]:
    import numpy as np

    f = run_dir / "eval_samples.npz"
    if not f.exists():
        return {}
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


def _diffusion_panels(d: dict[str, Any], samples: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, title) of each plotted setting: the data, the teacher and student by NFE, noise."""
    out = [("data", "data")]
    for r in d["rows"]:
        if r["model"] in ("teacher", "student"):
            out.append((f"{r['model']}_nfe{r['nfe']}", f"{r['model']}, {r['nfe']} NFE"))
    out.append(("noise", "pure noise"))
    return [(k, t) for k, t in out if k in samples]


def _scatter_grid(d: dict[str, Any], samples: dict[str, Any], path: Path) -> Path | None:
    panels = _diffusion_panels(d, samples)
    if not panels:
        return None
    import numpy as np

    means = np.asarray(d.get("means", []), dtype=float).reshape(-1, 2)
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plots.plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.6 * nrows), squeeze=False)
    lim = 1.6 * max(1.0, float(np.abs(means).max()) if means.size else 1.0)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (key, title) in zip(axes.flat, panels):
        x = np.asarray(samples[key])
        ax.set_axis_on()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color="#dd8452")
        if means.size:
            ax.scatter(means[:, 0], means[:, 1], marker="x", s=30, color="k", lw=1)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    return plots._save(fig, path)


def _image_grid(
    d: dict[str, Any], samples: dict[str, Any], path: Path, per: int = 8
) -> Path | None:
    panels = _diffusion_panels(d, samples)
    if not panels:
        return None
    import numpy as np

    fig, axes = plots.plt.subplots(len(panels), 1, figsize=(1.1 * per, 1.25 * len(panels)),
                                   squeeze=False)  # fmt: skip
    for ax, (key, title) in zip(axes[:, 0], panels):
        imgs = np.asarray(samples[key])[:per]
        imgs = np.clip((imgs + 1) / 2, 0, 1)  # [-1, 1] -> [0, 1]
        row = np.concatenate([np.pad(im[0], 1, constant_values=1.0) for im in imgs], axis=1)
        ax.imshow(row, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title, fontsize=9, loc="left")
    return plots._save(fig, path)


def diffusion_sections(
    ev: dict[str, Any], run_dir: Path, pdir: Path
) -> list[tuple[str, str, Path | None]]:
    """Report sections of a diffusion run: the NFE table with the speed-up, and the samples."""
    d = ev["diffusion"]
    header, rows = diffusion_table(ev)
    points = d["kind"] == "points"
    if points:
        how = (
            f"{d['samples']:,} samples per setting, from the same initial noise; MMD (RBF, "
            f"unbiased; lower is better) against {d['reference']}; a mode is covered when a "
            "sample lies within 3 std of it, and the high-quality share is the share of samples "
            "within 3 std of some mode (Metz et al. 2017)."
        )
    else:
        how = (
            f"{d['samples']:,} samples per setting, from the same initial noise, against "
            f"{d['reference']}: Fréchet distance (lower is better) and precision/recall "
            f"(Kynkäänniemi et al. 2019). {d.get('feature_note', '')}."
        )
        fn = d.get("feature_net") or {}
        if "held_out_accuracy" in fn:
            how += f" Feature classifier held-out accuracy: {fn['held_out_accuracy']:.3f}."
    text = (
        f"Teacher sampler `{d['teacher_sampler']}`; student objective `{d['objective']}` "
        f"(sampler: {d['student_sampler']}). "
        + how
        + " Latency: median CPU wall-clock per sample of generating a batch."
    )
    sp = d.get("speedup")
    if sp:
        text += (
            f"\n\n**Speed-up**: the {sp['student_nfe']}-step student takes "
            f"{sp['student_latency_ms']:.4f} ms per sample, the {sp['teacher_nfe']}-step "
            f"teacher {sp['teacher_latency_ms']:.4f} ms: **{sp['speedup']:.1f}x** faster."
        )
    out: list[tuple[str, str, Path | None]] = [
        ("Results: samples by NFE", text + "\n\n" + _md_table(header, rows), None)
    ]
    samples = _samples(run_dir)
    if samples:
        if points:
            plot = _scatter_grid(d, samples, pdir / "samples.png")
            cap = "Samples (orange) against the mixture means (x), per model and NFE."
        else:
            plot = _image_grid(d, samples, pdir / "samples.png")
            cap = "Samples per model and NFE (the first row: held-out images)."
        if plot:
            out.append(("Samples", cap, plot))
    return out

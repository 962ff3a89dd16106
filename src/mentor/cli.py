"""The ``mentor`` command line."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from rich.table import Table

import mentor
from mentor._console import console, err


def _cmd_version(_args: argparse.Namespace) -> int:
    console.print(f"mentor {mentor.__version__}")
    return 0


def _cmd_losses(_args: argparse.Namespace) -> int:
    from mentor.losses import LOSSES, list_losses

    table = Table("loss", "inputs", "description", title="registered losses")
    for name in list_losses():
        table.add_row(name, LOSSES.get(name).inputs, LOSSES.describe(name))
    console.print(table)
    return 0


def _cmd_recipes(_args: argparse.Namespace) -> int:
    from mentor.recipes import list_recipes

    table = Table("recipe", "description", title="shipped recipes (mentor distill NAME)")
    for name, desc in list_recipes():
        table.add_row(name, desc)
    console.print(table)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from mentor.assembly import distill
    from mentor.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    result = distill(cfg, resume=args.resume)
    labels = {
        "teacher_accuracy": "teacher accuracy",
        "student_accuracy": "student accuracy",
        "agreement": "agreement with teacher",
        "teacher_perplexity": "teacher perplexity",
        "student_init_perplexity": "student perplexity before",
        "student_perplexity": "student perplexity",
        "token_agreement": "token agreement with teacher",
        "cosine_to_teacher": "cosine to teacher",
        "student_probe_accuracy": "student linear-probe accuracy",
        "teacher_bits_per_byte": "teacher bits per byte",
        "student_bits_per_byte": "student bits per byte",
    }
    for key, text in labels.items():
        if isinstance(result.metrics.get(key), float):
            console.print(f"{text}: {result.metrics[key]:.4f}")
    if result.metrics.get("task") == "diffusion":  # the generative task
        from mentor.report.build import diffusion_lines

        for line in diffusion_lines(result.metrics):
            console.print(line, highlight=False)
    sel = result.run_dir / "selection.json"
    if sel.exists():
        import json

        got = json.loads(sel.read_text())
        if got.get("kind") == "domains":  # DDK on LM data: per-domain held-out perplexity
            console.print(f"held-out perplexity per domain: mean {got['mean_ppl']:.2f}, worst "
                          f"{got['worst_ppl']:.2f} ({got['worst_domain']})")  # fmt: skip
        else:
            console.print(
                f"teacher calls: {got['teacher_calls']:,} of a budget of {got['budget']:,}"
            )
    console.print(f"run directory: {result.run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mentor.assembly import evaluate_run
    from mentor.report.build import summary_rows

    ev = evaluate_run(args.run_dir, baseline=args.baseline, data_overrides=args.data)
    if ev.get("task") == "diffusion":  # the generative task: one row per model and NFE
        from mentor.report.build import diffusion_table

        header, rows = diffusion_table(ev)
        title = f"{ev['name']}: samples by NFE ({ev['examples']} per setting)"
    else:
        header, rows = summary_rows(ev)
        title = f"{ev['name']}: held-out evaluation ({ev['examples']} examples)"
    table = Table(*header, title=title)
    for r in rows:
        table.add_row(*r)
    console.print(table)
    sp = ev.get("diffusion", {}).get("speedup")
    if sp:
        console.print(f"speed-up of the {sp['student_nfe']}-step student over the "
                      f"{sp['teacher_nfe']}-step teacher: {sp['speedup']:.1f}x")  # fmt: skip
    console.print(f"wrote {args.run_dir}/eval.json")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mentor.report.build import build_report

    path = build_report(args.run_dir)
    console.print(f"report: {path.resolve()}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mentor.report.build import compare_runs

    rows, plot = compare_runs(args.run_dirs, args.out)
    cols = [c for c in rows[0] if c != "task"]
    table = Table(*cols, title="runs compared (distilled students)")
    for r in rows:
        table.add_row(
            *(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
        )
    console.print(table)
    console.print(f"comparison plot: {plot}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mentor.demo import DEMOS, run_demo

    if args.list:
        for name, (_, desc) in DEMOS.items():
            console.print(f"{name:12s} {desc}")
        return 0
    run_demo(args.name, out=args.out, smoke=args.smoke)
    return 0


def _cache_parser(command: str) -> argparse.ArgumentParser:
    """Options of `mentor cache` / `mentor plan` (options and overrides may be intermixed)."""
    if command == "cache":
        p = argparse.ArgumentParser(
            prog="mentor cache",
            description="Run a recipe's teacher once over its data and store top-k log-probs "
            "and/or samples per example (per token for LMs) as sharded Parquet. A killed run "
            "resumes with the same command. `mentor cache verify DIR` checks a cache. "
            "Format: docs/cache-format.md",
        )
        p.add_argument("recipe", help="recipe name or YAML file (or `verify` followed by DIR)")
    else:
        p = argparse.ArgumentParser(
            prog="mentor plan",
            description="Estimate parameter counts, FLOPs per token (online vs cached KD), cache "
            "size and peak logit memory before anything runs (formulas: docs/cache-format.md).",
        )
        p.add_argument("recipe", help="recipe name or YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.batch_size=8")
    p.add_argument("--top-k", type=int, default=32, help="top-k classes to keep (0: none)")
    p.add_argument("--samples", type=int, default=0, help="teacher draws per position (0: none)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    if command == "cache":
        p.add_argument("--out", help="cache directory to write (or resume)")
        p.add_argument("--features", default="", help="comma-separated teacher modules to pool")
        p.add_argument("--sampled-logprobs", action="store_true", help="store sampled log-probs")
        p.add_argument(
            "--splits",
            default=None,
            help="train, val or train,val (default: train, plus val when the recipe evaluates "
            "during training, eval.every)",
        )
        p.add_argument("--rows-per-shard", type=int, default=1024, help="examples per shard")
        p.add_argument("--batch-size", type=int, default=16, help="teacher batch size")
        p.add_argument("--overwrite", action="store_true", help="replace a cache made otherwise")
    return p


def _cmd_cache(args: argparse.Namespace) -> int:
    from mentor.cache import CacheSettings, verify_cache

    args = _cache_parser("cache").parse_intermixed_args(args.args)
    if args.recipe == "verify":
        if len(args.overrides) != 1:
            raise ValueError("usage: mentor cache verify DIR")
        problems = verify_cache(args.overrides[0])
        for p in problems:
            err.print(f"[bold red]problem:[/] {p}", highlight=False, soft_wrap=True)
        if not problems:
            console.print(f"{args.overrides[0]}: ok (manifest, row counts and sha256 checked)")
        return 1 if problems else 0
    from mentor.assembly import cache_recipe
    from mentor.config import load_config

    if not args.out:
        raise ValueError("mentor cache RECIPE needs --out DIR (where the cache is written)")
    cfg = load_config(args.recipe, args.overrides)
    settings = CacheSettings(
        top_k=args.top_k,
        samples=args.samples,
        features=[f for f in (args.features or "").split(",") if f],
        dtype=args.dtype,
        sampled_logprobs=args.sampled_logprobs,
        rows_per_shard=args.rows_per_shard,
        batch_size=args.batch_size,
        seed=cfg.train.seed,
    )
    default = "train,val" if cfg.eval.every else "train"
    splits = tuple(s for s in (args.splits or default).split(",") if s)
    m = cache_recipe(cfg, args.out, settings, splits=splits, overwrite=args.overwrite)
    t = m["totals"]
    console.print(
        f"cache {args.out}: {t['rows']:,} examples, {t['tokens']:,} positions, "
        f"{t['bytes']:,} bytes ({t['bytes_per_token']:.1f} B/position)"
    )
    return 0


def _generate_parser() -> argparse.ArgumentParser:
    """Options of `mentor generate` (options and overrides may be intermixed)."""
    p = argparse.ArgumentParser(
        prog="mentor generate",
        description="Sample completions of a recipe's prompts (data.source=prompts) from its "
        "teacher, or from a finished run's student, with the recipe's generation: settings, for "
        "sequence-level KD (Kim & Rush, 2016). Writes FILE.jsonl (one line per example and "
        'sample: {"index", "sample", "prompt", "completion", "prompt_ids", "completion_ids"}, '
        "readable as data.source=prompts data.params.path=FILE.jsonl) and its provenance "
        "FILE.jsonl.meta.json. Seeded per (train.seed, example, sample); the same command "
        "resumes a killed run; identical completions of one prompt are written once.",
    )
    p.add_argument("recipe", help="recipe name or YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as generation.top_p=0.9")
    p.add_argument("--out", help="the .jsonl file to write (or resume)")
    p.add_argument(
        "--source",
        default="teacher",
        choices=["teacher", "student"],
        help="sample the recipe's teacher (default) or a finished run's student",
    )
    p.add_argument(
        "--run", default=None, help="run directory whose student samples (--source student)"
    )
    p.add_argument("--split", default="train", choices=["train", "val"], help="which prompts")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="completions per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts written per flush")
    p.add_argument("--overwrite", action="store_true", help="replace a file generated otherwise")
    p.add_argument(
        "--task",
        default="continue",
        choices=["continue", "label", "rationale"],
        help="continue: complete the prompts (default); label: the teacher labels the texts of "
        "classification data; rationale: an LM teacher explains and labels them "
        "(Distilling Step-by-Step)",
    )
    p.add_argument("--budget", type=int, default=None, help="label/rationale: most teacher calls")
    p.add_argument("--samples", type=int, default=1, help="rationale: samples per text (vote)")
    p.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        help="label: least class probability; rationale: least fraction of agreeing samples",
    )
    p.add_argument("--min-chars", type=int, default=0, help="label/rationale: skip shorter texts")
    p.add_argument("--max-chars", type=int, default=None, help="label/rationale: skip longer texts")
    p.add_argument("--no-dedupe", action="store_true", help="label/rationale: keep repeated texts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="rationale: tokens per sample")
    p.add_argument("--prompt", default=None, help="rationale: template with {text}, {classes}")
    return p


def _cmd_generate(args: argparse.Namespace) -> int:
    from mentor.assembly import generate_recipe
    from mentor.config import load_config

    args = _generate_parser().parse_intermixed_args(args.args)
    if not args.out:
        raise ValueError("mentor generate RECIPE needs --out FILE.jsonl (where lines are written)")
    cfg = load_config(args.recipe, args.overrides)
    if args.task != "continue":
        from mentor.labeling import label_recipe

        s = label_recipe(
            cfg, args.out, task=args.task, split=args.split, budget=args.budget,
            samples=args.samples, min_confidence=args.min_confidence, min_chars=args.min_chars,
            max_chars=args.max_chars, dedupe=not args.no_dedupe, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, prompt=args.prompt, overwrite=args.overwrite,
            progress=cfg.train.progress,
        )  # fmt: skip
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(s["skipped"].items())) or "none"
        console.print(
            f"generate --task {s['task']} {s['file']}: {s['kept']:,} kept, {s['rejected']:,} "
            f"rejected (in the files now), {s['calls']:,} teacher calls this run "
            f"({s['teacher_calls']:,} in all); skipped this run: {skipped}",
            highlight=False,
            soft_wrap=True,
        )
        return 0
    s = generate_recipe(
        cfg,
        args.out,
        source=args.source,
        run_dir=args.run,
        split=args.split,
        samples_per_prompt=args.samples_per_prompt,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=cfg.train.progress,
    )
    console.print(
        f"generate {s['file']}: {s['examples']:,} {s['split']} prompts x "
        f"{s['samples_per_prompt']}, {s['written']:,} lines written ({s['lines']:,} in the "
        f"file), {s['duplicates']:,} duplicates skipped",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from mentor.assembly import plan_recipe
    from mentor.cache.plan import plan_rows
    from mentor.config import load_config

    args = _cache_parser("plan").parse_intermixed_args(args.args)
    cfg = load_config(args.recipe, args.overrides)
    p = plan_recipe(cfg, top_k=args.top_k, samples=args.samples, dtype=args.dtype)
    table = Table("quantity", "estimate", title=f"plan for {cfg.name} (before anything runs)")
    for k, v in plan_rows(p):
        table.add_row(k, v)
    console.print(table)
    console.print("formulas: docs/cache-format.md#estimates-mentor-plan", style="dim")
    return 0


def _search_parser() -> argparse.ArgumentParser:
    """Options of `mentor search` (options and overrides may be intermixed)."""
    p = argparse.ArgumentParser(
        prog="mentor search",
        description="Score candidate students of a recipe (a grid of student settings) with a "
        "training-free DisWOT proxy and/or a short distillation, measure their cost, and report "
        "the Pareto front (search.json, search.md, search.png in --out). See docs/search.md.",
    )
    p.add_argument("recipe", help="recipe name or YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as teacher.fit.epochs=5")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=YAML_LIST",
                   help="a searched key and its values, e.g. 'student.params.hidden=[[16],[32]]' "
                   "(repeat for a Cartesian product; default: a grid per student builder)")  # fmt: skip
    p.add_argument("--proxy", default="both", choices=["diswot", "short_kd", "both"])
    p.add_argument("--proxy-steps", type=int, default=20, help="steps of the short-KD proxy")
    p.add_argument("--rank-by", default=None, choices=["diswot", "short_kd"],
                   help="proxy that ranks (default: short_kd when it runs)")  # fmt: skip
    p.add_argument("--confirm", type=int, default=0, metavar="K",
                   help="train the top K with the recipe's length; Spearman of each proxy")  # fmt: skip
    p.add_argument("--teachers", nargs="+", action="extend", default=[], metavar="OVERRIDES",
                   help="teacher variants, each a quoted set of teacher.* overrides: the best "
                   "candidate is distilled from each (capacity gap)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="DisWOT: initialisations per candidate")
    p.add_argument("--out", default=None, help="output folder (default runs/search-RECIPE)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return p


def _cmd_search(args: argparse.Namespace) -> int:
    from mentor.search import search

    args = _search_parser().parse_intermixed_args(args.args)
    res = search(
        args.recipe, args.overrides, grid=args.grid, proxy=args.proxy,
        proxy_steps=args.proxy_steps, confirm=args.confirm, teachers=args.teachers,
        out=args.out, overwrite=args.overwrite, rank_by=args.rank_by, seeds=args.seeds,
    )  # fmt: skip
    rows = sorted(res["candidates"], key=lambda r: r["rank"])
    table = Table("rank", "candidate", *res["proxies"], "params", "latency ms", "front",
                  title=f"mentor search {res['recipe']} (by {res['rank_by']})")  # fmt: skip
    for r in rows[:20]:
        front = ("P" if r["pareto_params"] else "") + ("L" if r["pareto_latency"] else "")
        lat = r.get("latency_ms")
        table.add_row(str(r["rank"]), r["label"], *(f"{r[p]['score']:.4g}" for p in res["proxies"]),
                      f"{r['params']:,}", f"{lat:.3g}" if lat is not None else "-", front)  # fmt: skip
    console.print(table)
    if "confirm" in res:
        corr = ", ".join(
            f"{k} {v:.3f}" if v is not None else f"{k} -"
            for k, v in res["confirm"]["spearman"].items()
            if "." not in k
        )
        console.print(f"Spearman with the final {res['confirm']['metric']}: {corr}")
    if "teachers" in res:
        console.print(
            f"capacity gap: the best student comes from {res['teachers']['best_teacher']}"
        )
    console.print(f"wrote {res['out']}/search.json, search.md, search.png")
    return 0


def _cmd_serve_teacher(args: argparse.Namespace) -> int:
    from mentor.serve import load_teacher, serve

    teacher = load_teacher(args.teacher, args.overrides, name=args.model_name)
    err.print(
        f"serving {teacher.name!r} at http://{args.host}:{args.port}/v1 (completions with echo "
        "and logprobs; Ctrl-C stops)",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip
    serve(
        teacher, host=args.host, port=args.port, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, max_logprobs=args.max_logprobs,
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands: version, losses, recipes, distill, eval, report,
    compare, demo, serve-teacher, cache, plan, generate)."""
    p = argparse.ArgumentParser(
        prog="mentor",
        description="Knowledge distillation: train a small student to imitate a large teacher.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("version", help="print the mentor version")
    s.set_defaults(fn=_cmd_version)
    s = sub.add_parser("losses", help="list every registered distillation loss")
    s.set_defaults(fn=_cmd_losses)
    s = sub.add_parser("recipes", help="list the shipped recipes")
    s.set_defaults(fn=_cmd_recipes)
    s = sub.add_parser(
        "distill",
        help="run a recipe: mentor distill RECIPE [key=value ...]",
        description="Run a recipe (shipped name or YAML path) with dotted overrides, "
        "e.g. mentor distill digits train.lr=3e-4 objective.kd.temperature=2",
    )
    s.add_argument("recipe", help="shipped recipe name (see `mentor recipes`) or a YAML file")
    s.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=3e-4")
    s.add_argument("--resume", action="store_true", help="continue the run in output.dir")
    s.set_defaults(fn=_cmd_distill)
    s = sub.add_parser("eval", help="evaluate a finished run: quality, fidelity, calibration, cost")
    s.add_argument("run_dir", help="a run directory (output.dir of a finished run)")
    s.add_argument("--baseline", help="run directory of a student trained without the teacher")
    s.add_argument("--data", nargs="*", default=None, help="data overrides, e.g. data.split_seed=1")
    s.set_defaults(fn=_cmd_eval)
    s = sub.add_parser("report", help="build report.md and report.html for a run")
    s.add_argument("run_dir")
    s.set_defaults(fn=_cmd_report)
    s = sub.add_parser("compare", help="compare evaluated runs in a table and a plot")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--out", default=None, help="path of the comparison plot (compare.png)")
    s.set_defaults(fn=_cmd_compare)
    s = sub.add_parser("demo", help="the end-to-end demo (teacher, baseline, distilled student)")
    s.add_argument("name", nargs="?", default=None, help="which demo (default: the main one)")
    s.add_argument("--list", action="store_true", help="list the available demos")
    s.add_argument("--out", default="runs/demo", help="where the demo writes its runs")
    s.add_argument("--smoke", action="store_true", help="a few steps only (for tests)")
    s.set_defaults(fn=_cmd_demo)
    s = sub.add_parser(
        "serve-teacher",
        help="serve a teacher over the OpenAI completions API (teacher.source=served)",
        description="Serve a recipe's teacher (shipped name or YAML, with key=value overrides) "
        "or a causal LM (folder, asset name, .gguf) through the OpenAI-compatible completions "
        "API subset vLLM exposes: POST /v1/completions (echo, logprobs, token-id prompts, "
        "return_tokens_as_token_ids) and GET /v1/models. See docs/config.md (source: served).",
    )
    s.add_argument("teacher", help="recipe (name or YAML) or model folder / asset name")
    s.add_argument("overrides", nargs="*", help="dotted recipe overrides such as data.params.n=8")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    s.add_argument("--model-name", default=None, help="served model name (default: recipe "
                   "name or folder name)")  # fmt: skip
    s.add_argument("--max-batch", type=int, default=32, help="sequences per forward pass")
    s.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a forward pass waits for more requests")  # fmt: skip
    s.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs=K accepted")
    s.set_defaults(fn=_cmd_serve_teacher)
    for name, fn, help_ in (
        ("cache", _cmd_cache, "run a recipe's teacher once and store its signals (see -h)"),
        ("plan", _cmd_plan, "estimate parameters, FLOPs, cache size and logit memory"),
        ("generate", _cmd_generate, "sample completions of a recipe's prompts (seq-KD data)"),
        ("search", _cmd_search, "score candidate students: DisWOT, short KD, Pareto front"),
    ):
        s = sub.add_parser(name, help=help_, add_help=False, prefix_chars="\0")
        s.add_argument(
            "args", nargs=argparse.REMAINDER
        )  # parsed by _cache_parser, _generate_parser
        s.set_defaults(fn=fn)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mentor`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # flags and overrides in any order: `distill digits --resume train.lr=1e-3`
        over = [a for a in extra if "=" in a and not a.startswith("-")]
        rest = [a for a in extra if a not in over]
        if rest or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest or extra)}")
        args.overrides = [*args.overrides, *over]
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except (ValueError, KeyError, OSError, TypeError) as e:
        if os.environ.get("MENTOR_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)):
            what = {
                errno.ENOSPC: "the disk is full",
                errno.EACCES: "permission denied",
                errno.EROFS: "the file system is read-only",
            }.get(e.errno, e.strerror or "")
            msg = f"cannot write or read {e.filename or 'a file'}: {what or e}"  # fmt: skip
        err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        err.print("(set MENTOR_DEBUG=1 for the full traceback)", style="dim")
        return 2


if __name__ == "__main__":
    sys.exit(main())
